//! The Services of figures 2 and 3, as manifests for the agent and as the
//! rule sets kube-proxy would program for them: its nftables mode (table
//! `kube-proxy`: per-Service chains, verdict maps dispatching on address,
//! protocol and port, `numgen random` choosing the endpoint, DNAT and
//! masquerade by mark) and its iptables mode (KUBE-SERVICES, KUBE-SVC-*,
//! KUBE-SEP-* with `statistic` probabilities, KUBE-MARK-MASQ and
//! KUBE-POSTROUTING). Written from the shape of what kube-proxy programs,
//! not from its code; comments are left out, as kube-proxy itself does
//! above 1 000 endpoints.

use std::{fmt::Write as _, net::Ipv4Addr};

use lb_tests::manifests::{docs, ready_on, service, slice};

/// The namespace every Service lives in.
const NAMESPACE: &str = "test";
/// The port name of every Service (`p`, as the manifests builder writes it).
const PORT_NAME: &str = "p";
/// Pod addresses: traffic from inside is not masqueraded for ClusterIPs.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Where ClusterIPs are allocated from.
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The nftables table, as nft commands name it.
const T: &str = "ip kube-proxy";
/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";

/// One Service with one port.
#[derive(Clone, Debug)]
pub struct Svc {
    /// Name, in namespace `test`.
    pub name: String,
    /// Its ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// `udp` or `tcp`.
    pub proto: &'static str,
    /// The NodePort, if any.
    pub node_port: Option<u16>,
    /// The endpoints' port.
    pub target: u16,
    /// Endpoint addresses (all on node-b).
    pub endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    fn key(&self) -> String {
        format!("{NAMESPACE}/{}/{}/{PORT_NAME}", self.name, self.proto)
    }

    /// The manifest file body: the Service and its EndpointSlice.
    pub fn manifest(&self) -> String {
        docs(&self.objects())
    }

    /// The Service and its EndpointSlice, one YAML document each.
    pub fn objects(&self) -> [String; 2] {
        let addrs: Vec<String> = self.endpoints.iter().map(ToString::to_string).collect();
        let eps = ready_on("node-b", &addrs);
        let proto = self.proto.to_ascii_uppercase();
        [
            service(
                &self.name,
                &self.cluster_ip.to_string(),
                self.port,
                self.target,
                self.node_port,
                &proto,
            ),
            slice(
                &self.name,
                &format!("{}-1", self.name),
                self.target,
                &proto,
                &eps,
            ),
        ]
    }
}

/// A stable 16-character name part (`[A-Z2-7]`) for `s`, as kube-proxy
/// derives its chain names from a hash of the Service port.
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let v = u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64 | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| ALPHABET[((v >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// Services per `nft -f` transaction: nft 1.0 (Debian 12) takes time
/// quadratic in the chains of one transaction, so 10 000 Services in one
/// take minutes; in chunks, about a minute.
const SERVICES_PER_NFT_TX: usize = 500;

/// The nftables rule set, in `nft -f` command form, as transactions to
/// load in turn: the table, its base chains, maps and shared chains first,
/// then the Services' chains and rules in chunks (chains before the rules
/// that jump to them), and the map elements pointing at them last.
pub fn nft(svcs: &[Svc]) -> Vec<String> {
    let mut s = String::new();
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    let mut txs = Vec::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    let mut cluster_ips = Vec::new();
    let _ = writeln!(s, "add table {T}");
    for (name, hook) in [
        (
            "filter-prerouting",
            "type filter hook prerouting priority -110",
        ),
        ("filter-input", "type filter hook input priority -110"),
        ("filter-forward", "type filter hook forward priority -110"),
        ("filter-output", "type filter hook output priority -110"),
        (
            "filter-output-post-dnat",
            "type filter hook output priority -90",
        ),
        ("nat-prerouting", "type nat hook prerouting priority -100"),
        ("nat-output", "type nat hook output priority -100"),
        ("nat-postrouting", "type nat hook postrouting priority 100"),
    ] {
        let _ = writeln!(s, "add chain {T} {name} {{ {hook} ; }}");
    }
    for name in [
        "firewall-check",
        "service-endpoints-check",
        "nodeport-endpoints-check",
        "cluster-ips-check",
        "mark-for-masquerade",
        "masquerading",
        "services",
    ] {
        chains.push(name.to_string());
    }
    for (chain, rule) in [
        ("filter-prerouting", "ct state new jump firewall-check"),
        ("filter-input", "ct state new jump nodeport-endpoints-check"),
        ("filter-input", "ct state new jump service-endpoints-check"),
        ("filter-forward", "ct state new jump service-endpoints-check"),
        ("filter-forward", "ct state new jump cluster-ips-check"),
        ("filter-output", "ct state new jump service-endpoints-check"),
        ("filter-output", "ct state new jump firewall-check"),
        ("filter-output-post-dnat", "ct state new jump cluster-ips-check"),
        ("nat-prerouting", "jump services"),
        ("nat-output", "jump services"),
        ("nat-postrouting", "jump masquerading"),
        (
            "firewall-check",
            "ip daddr . meta l4proto . th dport vmap @firewall-ips",
        ),
        (
            "service-endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        ),
        (
            "nodeport-endpoints-check",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        ),
        ("cluster-ips-check", "ip daddr @cluster-ips reject"),
        ("cluster-ips-check", &format!("ip daddr {SERVICE_CIDR} drop")),
        (
            "mark-for-masquerade",
            &format!("meta mark set meta mark | {MASQ_MARK}"),
        ),
        (
            "masquerading",
            &format!("meta mark & {MASQ_MARK} == 0 return"),
        ),
        (
            "masquerading",
            &format!("meta mark set meta mark ^ {MASQ_MARK}"),
        ),
        ("masquerading", "masquerade fully-random"),
        (
            "services",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
        ),
        (
            "services",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
        ),
    ] {
        rules.push(format!("add rule {T} {chain} {rule}"));
    }
    for c in &chains {
        let _ = writeln!(s, "add chain {T} {c}");
    }
    let _ = writeln!(s, "add set {T} cluster-ips {{ type ipv4_addr ; }}");
    for (name, ty) in [
        (
            "service-ips",
            "ipv4_addr . inet_proto . inet_service : verdict",
        ),
        ("service-nodeports", "inet_proto . inet_service : verdict"),
        (
            "no-endpoint-services",
            "ipv4_addr . inet_proto . inet_service : verdict",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service : verdict",
        ),
        (
            "firewall-ips",
            "ipv4_addr . inet_proto . inet_service : verdict",
        ),
    ] {
        let _ = writeln!(s, "add map {T} {name} {{ type {ty} ; }}");
    }
    for r in &rules {
        let _ = writeln!(s, "{r}");
    }
    txs.push(std::mem::take(&mut s));
    for chunk in svcs.chunks(SERVICES_PER_NFT_TX) {
        chains.clear();
        rules.clear();
        for svc in chunk {
            nft_service(
                svc,
                &mut chains,
                &mut rules,
                &mut cluster_ips,
                &mut service_ips,
                &mut node_ports,
            );
        }
        for c in &chains {
            let _ = writeln!(s, "add chain {T} {c}");
        }
        for r in &rules {
            let _ = writeln!(s, "{r}");
        }
        txs.push(std::mem::take(&mut s));
    }
    for (set, elems) in [
        ("cluster-ips", &cluster_ips),
        ("service-ips", &service_ips),
        ("service-nodeports", &node_ports),
    ] {
        if !elems.is_empty() {
            let _ = writeln!(s, "add element {T} {set} {{ {} }}", elems.join(", "));
        }
    }
    txs.push(s);
    txs
}

/// One Service's chains and rules, and its map elements.
fn nft_service(
    svc: &Svc,
    chains: &mut Vec<String>,
    rules: &mut Vec<String>,
    cluster_ips: &mut Vec<String>,
    service_ips: &mut Vec<String>,
    node_ports: &mut Vec<String>,
) {
    let key = svc.key();
    let h = &hash16(&key)[..8];
    let chain = format!("service-{h}-{key}");
    let (p, cip) = (svc.proto, svc.cluster_ip);
    chains.push(chain.clone());
    cluster_ips.push(cip.to_string());
    service_ips.push(format!("{cip} . {p} . {} : goto {chain}", svc.port));
    rules.push(format!(
        "add rule {T} {chain} ip daddr {cip} meta l4proto {p} th dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.port
    ));
    let mut vmap = Vec::new();
    for (j, ep) in svc.endpoints.iter().enumerate() {
        let ep_key = format!("{key}__{ep}/{}", svc.target);
        let ep_chain = format!("endpoint-{}-{ep_key}", &hash16(&ep_key)[..8]);
        chains.push(ep_chain.clone());
        rules.push(format!(
            "add rule {T} {ep_chain} ip saddr {ep} jump mark-for-masquerade"
        ));
        rules.push(format!(
            "add rule {T} {ep_chain} meta l4proto {p} dnat to {ep}:{}",
            svc.target
        ));
        vmap.push(format!("{j} : goto {ep_chain}"));
    }
    if !vmap.is_empty() {
        rules.push(format!(
            "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(", ")
        ));
    }
    if let Some(np) = svc.node_port {
        let ext = format!("external-{h}-{key}");
        chains.push(ext.clone());
        rules.push(format!("add rule {T} {ext} jump mark-for-masquerade"));
        rules.push(format!("add rule {T} {ext} goto {chain}"));
        node_ports.push(format!("{p} . {np} : goto {ext}"));
    }
}

/// The iptables rule set, in `iptables-restore` form.
pub fn iptables(svcs: &[Svc]) -> String {
    let mut s = String::from("*filter\n");
    for c in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(
        "-A INPUT -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let _ = writeln!(
        s,
        "-A KUBE-FORWARD -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n*nat"
    );
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
    ];
    let mut rules = vec![
        "-A PREROUTING -j KUBE-SERVICES".to_string(),
        "-A OUTPUT -j KUBE-SERVICES".to_string(),
        "-A POSTROUTING -j KUBE-POSTROUTING".to_string(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully".to_string(),
    ];
    let mut services = Vec::new();
    let mut nodeports = Vec::new();
    for svc in svcs {
        let key = svc.key();
        let h = hash16(&key);
        let (svc_chain, ext_chain) = (format!("KUBE-SVC-{h}"), format!("KUBE-EXT-{h}"));
        let (p, cip, port) = (svc.proto, svc.cluster_ip, svc.port);
        chains.push(svc_chain.clone());
        services.push(format!(
            "-A KUBE-SERVICES -d {cip}/32 -p {p} -m {p} --dport {port} -j {svc_chain}"
        ));
        rules.push(format!(
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {cip}/32 -p {p} -m {p} --dport {port} -j KUBE-MARK-MASQ"
        ));
        let n = svc.endpoints.len();
        for (j, ep) in svc.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                hash16(&format!("{key}__{ep}/{}", svc.target))
            );
            chains.push(sep.clone());
            if j + 1 < n {
                // Each rule takes its share of what the rules before it left.
                rules.push(format!(
                    "-A {svc_chain} -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / (n - j) as f64
                ));
            } else {
                rules.push(format!("-A {svc_chain} -j {sep}"));
            }
            rules.push(format!("-A {sep} -s {ep}/32 -j KUBE-MARK-MASQ"));
            rules.push(format!(
                "-A {sep} -p {p} -m {p} -j DNAT --to-destination {ep}:{}",
                svc.target
            ));
        }
        if let Some(np) = svc.node_port {
            chains.push(ext_chain.clone());
            nodeports.push(format!(
                "-A KUBE-NODEPORTS -p {p} -m {p} --dport {np} -j {ext_chain}"
            ));
            rules.push(format!("-A {ext_chain} -j KUBE-MARK-MASQ"));
            rules.push(format!("-A {ext_chain} -j {svc_chain}"));
        }
    }
    // NodePorts are matched only after every ClusterIP rule.
    services.push("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_string());
    for c in &chains {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for r in rules.iter().chain(&services).chain(&nodeports) {
        let _ = writeln!(s, "{r}");
    }
    s.push_str("COMMIT\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svcs() -> Vec<Svc> {
        vec![Svc {
            name: "svc-0".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 0),
            port: 80,
            proto: "udp",
            node_port: Some(20000),
            target: 8080,
            endpoints: vec![Ipv4Addr::new(10, 244, 2, 10), Ipv4Addr::new(10, 244, 2, 11)],
        }]
    }

    #[test]
    fn iptables_splits_endpoints_evenly_and_nodeports_come_last() {
        let r = iptables(&svcs());
        assert!(r.contains("--probability 0.50000000000 -j KUBE-SEP-"));
        assert!(r.contains("-j DNAT --to-destination 10.244.2.11:8080"));
        let last_svc = r.rfind("-A KUBE-SERVICES").expect("services");
        assert!(r[last_svc..].starts_with("-A KUBE-SERVICES -m addrtype --dst-type LOCAL"));
    }

    #[test]
    fn nft_dispatches_through_verdict_maps() {
        let txs = nft(&svcs());
        let r = txs.join("");
        assert!(r.contains(
            "add element ip kube-proxy service-ips { 10.96.0.0 . udp . 80 : goto service-"
        ));
        assert!(r.contains(
            "add element ip kube-proxy service-nodeports { udp . 20000 : goto external-"
        ));
        assert!(r.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        // In each transaction the chains come before the rules; the map
        // elements that jump to them come last.
        for tx in &txs {
            if let (Some(chain), Some(rule)) = (tx.rfind("add chain"), tx.find("add rule")) {
                assert!(chain < rule, "{tx}");
            }
        }
        assert!(txs.last().expect("txs").starts_with("add element"));
    }
}
