//! The identity of one Maglev table: a Service port, the scope its traffic
//! policy gives the frontends, and their address family.
//!
//! A Service port has one table per address family of its frontends, times
//! two when a Local traffic policy applies to some of them (those lead to a
//! table of this node's endpoints only). The identity is stored as text in
//! the Service port's record (`LB_SVC_INFO_V2`), where a restarted agent
//! finds its tables again, `lb-agent services` prints it and the metrics
//! split it into labels:
//!
//! ```text
//! namespace/name[:port]/PROTO[@local][@v6]
//! demo/web:http/TCP        the table of every endpoint, IPv4 frontends
//! demo/web:http/TCP@local  this node's endpoints (a Local traffic policy)
//! demo/dns/UDP@local@v6    the same for IPv6 frontends, unnamed port
//! ```
//!
//! [`TableId`]'s `Display` writes that text and its `FromStr` reads it; no
//! other code does either. Kubernetes names hold neither `/` nor `:` (nor
//! `@`), which is what makes the text unambiguous.

use std::{cmp::Ordering, fmt, hash::Hash, str::FromStr};

use crate::model::{Protocol, ServicePortRef};

/// Which endpoints a table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every ready endpoint of the Service port.
    Cluster,
    /// This node's endpoints only: the frontends under a Local traffic policy.
    Local,
}

impl fmt::Display for Scope {
    /// `cluster` or `local`, as the metrics label them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cluster => "cluster",
            Self::Local => "local",
        })
    }
}

/// The address family of a table's frontends (and so of its backends: the
/// datapath rewrites addresses in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: std::net::IpAddr) -> Self {
        if addr.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }
}

impl fmt::Display for Family {
    /// `IPv4` or `IPv6`, as the metrics label them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Suffix of the table of a Service port's frontends under a Local traffic
/// policy.
const LOCAL_SUFFIX: &str = "@local";
/// Suffix of the table of a Service port's IPv6 frontends.
const V6_SUFFIX: &str = "@v6";

/// One table of a Service port (see the module documentation).
///
/// Compared, ordered and hashed as its text, so that collections keyed by
/// it iterate in the order of the names in the maps (the order in which a
/// sync allocates ids and, at capacity, decides which Service ports fit).
#[derive(Clone, Debug)]
pub struct TableId {
    /// The Service port.
    pub port: ServicePortRef,
    /// Which of its endpoints the table holds.
    pub scope: Scope,
    /// The address family of its frontends.
    pub family: Family,
}

impl TableId {
    /// The table of `port` for `scope` and `family`.
    pub fn new(port: ServicePortRef, scope: Scope, family: Family) -> Self {
        Self {
            port,
            scope,
            family,
        }
    }

    /// Every table a Service port may have.
    pub fn all_of(port: &ServicePortRef) -> [Self; 4] {
        [
            (Scope::Cluster, Family::V4),
            (Scope::Local, Family::V4),
            (Scope::Cluster, Family::V6),
            (Scope::Local, Family::V6),
        ]
        .map(|(scope, family)| Self::new(port.clone(), scope, family))
    }

    /// The text, in pieces.
    fn pieces(&self) -> [&str; 9] {
        let p = &self.port;
        [
            &p.namespace,
            "/",
            &p.name,
            if p.port_name.is_empty() { "" } else { ":" },
            &p.port_name,
            "/",
            p.protocol.as_str(),
            match self.scope {
                Scope::Cluster => "",
                Scope::Local => LOCAL_SUFFIX,
            },
            match self.family {
                Family::V4 => "",
                Family::V6 => V6_SUFFIX,
            },
        ]
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pieces().iter().try_for_each(|p| f.write_str(p))
    }
}

impl PartialEq for TableId {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for TableId {}

impl PartialOrd for TableId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TableId {
    /// The order of the texts, compared a run of bytes at a time without
    /// building them.
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.pieces(), other.pieces());
        let (mut a, mut b) = (
            a.iter().map(|p| p.as_bytes()),
            b.iter().map(|p| p.as_bytes()),
        );
        let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
        loop {
            while x.is_empty() {
                match a.next() {
                    Some(p) => x = p,
                    None => break,
                }
            }
            while y.is_empty() {
                match b.next() {
                    Some(p) => y = p,
                    None => break,
                }
            }
            if x.is_empty() || y.is_empty() {
                return x.len().cmp(&y.len());
            }
            let n = x.len().min(y.len());
            match x[..n].cmp(&y[..n]) {
                Ordering::Equal => (x, y) = (&x[n..], &y[n..]),
                other => return other,
            }
        }
    }
}

impl Hash for TableId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The text in chunks of a fixed size, so that equal texts cut into
        // different pieces hash alike.
        let mut buf = [0u8; 64];
        let mut n = 0;
        for mut piece in self.pieces().map(str::as_bytes) {
            while !piece.is_empty() {
                let k = piece.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&piece[..k]);
                (n, piece) = (n + k, &piece[k..]);
                if n == buf.len() {
                    state.write(&buf);
                    n = 0;
                }
            }
        }
        state.write(&buf[..n]);
    }
}

/// Text that is not a [`TableId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a table name (namespace/name[:port]/PROTO[@local][@v6]): {why}")]
pub struct ParseTableIdError {
    /// The text.
    pub text: String,
    /// What is wrong with it.
    pub why: String,
}

impl FromStr for TableId {
    type Err = ParseTableIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| ParseTableIdError {
            text: s.to_owned(),
            why: why.to_owned(),
        };
        // The protocol follows the last `/`, the namespace precedes the
        // first: a name holding a `/` (which Kubernetes refuses, but a
        // manifest may carry) still reads back whole.
        let (port, tail) = s.rsplit_once('/').ok_or_else(|| err("no protocol"))?;
        let (namespace, rest) = port.split_once('/').ok_or_else(|| err("no namespace"))?;
        let (protocol, suffixes) = match tail.find('@') {
            Some(i) => tail.split_at(i),
            None => (tail, ""),
        };
        let protocol: Protocol = protocol.parse().map_err(|e: String| err(&e))?;
        let (scope, family) = match suffixes {
            "" => (Scope::Cluster, Family::V4),
            LOCAL_SUFFIX => (Scope::Local, Family::V4),
            V6_SUFFIX => (Scope::Cluster, Family::V6),
            _ if suffixes == [LOCAL_SUFFIX, V6_SUFFIX].concat() => (Scope::Local, Family::V6),
            _ => return Err(err("unknown suffix")),
        };
        let (name, port_name) = match rest.split_once(':') {
            Some((_, "")) => return Err(err("empty port name after `:`")),
            Some((name, port_name)) => (name, port_name),
            None => (rest, ""),
        };
        Ok(Self {
            port: ServicePortRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port_name: port_name.to_owned(),
                protocol,
            },
            scope,
            family,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn port(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> ServicePortRef {
        ServicePortRef {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }
    }

    /// Field by field: `==` compares the text.
    fn same(a: &TableId, b: &TableId) -> bool {
        a.port == b.port && a.scope == b.scope && a.family == b.family
    }

    #[test]
    fn the_text_is_what_the_maps_have_always_held() {
        let web = port("demo", "web", "http", Protocol::Tcp);
        let cases = [
            (Scope::Cluster, Family::V4, "demo/web:http/TCP"),
            (Scope::Local, Family::V4, "demo/web:http/TCP@local"),
            (Scope::Cluster, Family::V6, "demo/web:http/TCP@v6"),
            (Scope::Local, Family::V6, "demo/web:http/TCP@local@v6"),
        ];
        for (scope, family, text) in cases {
            let id = TableId::new(web.clone(), scope, family);
            assert_eq!(id.to_string(), text);
            let back: TableId = text.parse().expect("parses");
            assert!(same(&back, &id), "{back:?}");
        }
        let dns = TableId::new(
            port("kube-system", "dns", "", Protocol::Udp),
            Scope::Cluster,
            Family::V4,
        );
        assert_eq!(dns.to_string(), "kube-system/dns/UDP");
        assert!(same(&"kube-system/dns/UDP".parse().expect("parses"), &dns));
    }

    #[test]
    fn text_that_is_no_table_name_is_refused() {
        for bad in [
            "",
            "demo",
            "demo/web",
            "demo/web/tcp",
            "demo/web/TCP@",
            "demo/web/TCP@v6@local",
            "demo/web/TCP@remote",
            "demo/web:/TCP",
            // A name cut short where the record's 120 bytes end.
            "demo/web:http/TC",
        ] {
            assert!(bad.parse::<TableId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn order_and_equality_are_those_of_the_text() {
        let id = |name: &str| {
            TableId::new(
                port("d", name, "", Protocol::Tcp),
                Scope::Cluster,
                Family::V4,
            )
        };
        // `-` sorts before `/`: "d/web-2/TCP" < "d/web/TCP".
        assert!(id("web-2") < id("web"));
        assert_eq!(id("web-2").cmp(&id("web")), "d/web-2/TCP".cmp("d/web/TCP"));
        let mut all = TableId::all_of(&port("d", "web", "p", Protocol::Udp)).to_vec();
        all.sort();
        let texts: Vec<String> = all.iter().map(ToString::to_string).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
    }

    #[test]
    fn equal_texts_cut_differently_are_equal_and_hash_alike() {
        use std::hash::BuildHasher as _;
        // A name holding a `/` (no valid Kubernetes name does) makes two
        // ids one text: they are one table, as their records are.
        let a = TableId::new(
            port("a/b", "c", "", Protocol::Tcp),
            Scope::Cluster,
            Family::V4,
        );
        let b = TableId::new(
            port("a", "b/c", "", Protocol::Tcp),
            Scope::Cluster,
            Family::V4,
        );
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(a, b);
        let s = std::collections::hash_map::RandomState::new();
        assert_eq!(s.hash_one(&a), s.hash_one(&b));
        // Long names span several chunks.
        let x = |n: usize| "x".repeat(n);
        let c = TableId::new(
            port(&format!("{}/{}", x(100), x(49)), "y", "", Protocol::Tcp),
            Scope::Local,
            Family::V6,
        );
        let d = TableId::new(
            port(&x(100), &format!("{}/y", x(49)), "", Protocol::Tcp),
            Scope::Local,
            Family::V6,
        );
        assert_eq!(c, d);
        assert_eq!(s.hash_one(&c), s.hash_one(&d));
        assert_ne!(s.hash_one(&c), s.hash_one(&a));
    }

    /// DNS labels: what Kubernetes allows for namespaces (RFC 1123, may
    /// start with a digit) and Service names (RFC 1035); port names are
    /// IANA service names (letters, digits, inner `-`, at least a letter).
    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
    }

    fn port_name() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z0-9]([a-z0-9-]{0,13}[a-z])?"]
    }

    fn protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ]
    }

    proptest! {
        #[test]
        fn every_name_kubernetes_allows_round_trips(
            namespace in label(),
            name in label(),
            port_name in port_name(),
            protocol in protocol(),
            local in any::<bool>(),
            v6 in any::<bool>(),
        ) {
            let id = TableId::new(
                port(&namespace, &name, &port_name, protocol),
                if local { Scope::Local } else { Scope::Cluster },
                if v6 { Family::V6 } else { Family::V4 },
            );
            let text = id.to_string();
            let back: TableId = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert!(same(&back, &id), "{text}: {back:?}");
        }

        #[test]
        fn names_with_slashes_and_at_signs_read_back_too(
            name in "[a-z@/.-]{1,20}",
            port_name in port_name(),
        ) {
            // Not valid in Kubernetes, but a manifest may hold them.
            let id = TableId::new(port("ns", &name, &port_name, Protocol::Tcp), Scope::Local, Family::V6);
            let back: TableId = id.to_string().parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert!(same(&back, &id), "{back:?}");
        }

        #[test]
        fn text_order_and_id_order_agree(
            a in label(), b in label(), pa in port_name(), pb in port_name(),
        ) {
            let x = TableId::new(port("ns", &a, &pa, Protocol::Tcp), Scope::Cluster, Family::V4);
            let y = TableId::new(port("ns", &b, &pb, Protocol::Tcp), Scope::Cluster, Family::V4);
            prop_assert_eq!(x.cmp(&y), x.to_string().cmp(&y.to_string()));
            prop_assert_eq!(x == y, x.to_string() == y.to_string());
            prop_assert_eq!(y.cmp(&x), x.cmp(&y).reverse());
        }
    }
}
