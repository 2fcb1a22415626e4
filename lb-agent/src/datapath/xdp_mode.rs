//! Which XDP mode each node interface gets, and why.
//!
//! A veth delivers the frames XDP sends in native mode (XDP_TX, or a
//! redirect into it) only when its peer runs an XDP program of its own:
//! they go to the peer's NAPI queue, which nothing else turns on, and are
//! dropped or left waiting otherwise. A node whose interface is a veth (a
//! kind, k3d or containerlab node, any container) has nothing on the far
//! side, so `--xdp-mode auto` attaches in generic (skb) mode there: its
//! frames are sent as socket buffers, which the peer takes like any other.
//! Generic mode costs less on a veth than keeping native mode and handing
//! every frame to TC (measured: README, "XDP attach modes"), because what a
//! veth receives is a socket buffer either way. Every other driver gets
//! native mode, or generic mode when it has no native XDP.

use std::{fmt, io};

use anyhow::{bail, Context as _, Result};
use aya::programs::XdpMode;

/// What `--xdp-mode` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpPolicy {
    /// Per interface: generic mode on a veth, native elsewhere when the
    /// driver has it, generic otherwise.
    #[default]
    Auto,
    /// Native (driver) mode everywhere; attaching fails where the driver
    /// lacks it.
    Native,
    /// Generic (skb) mode everywhere.
    Skb,
}

/// An XDP attach mode the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Run by the driver on its receive path.
    Native,
    /// Run by the stack on socket buffers (generic XDP).
    Skb,
}

impl Mode {
    /// The name logs, metrics and `--xdp-mode` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Skb => "skb",
        }
    }

    /// The mode as aya's attach flag.
    pub fn aya(self) -> XdpMode {
        match self {
            Mode::Native => XdpMode::Driver,
            Mode::Skb => XdpMode::Skb,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a veth gets generic mode.
pub const REASON_VETH: &str =
    "veth: native XDP_TX/redirect frames are only delivered when the peer runs XDP";
/// Why any other driver gets native mode.
pub const REASON_NATIVE: &str = "the driver has native XDP";
/// Why a driver without native XDP gets generic mode (the native attempt's
/// error follows).
pub const REASON_NO_NATIVE: &str = "the driver lacks native XDP";
/// Why an interface gets native mode when the flag forces it.
pub const REASON_FORCED_NATIVE: &str = "forced by --xdp-mode native";
/// Why an interface gets generic mode when the flag forces it.
pub const REASON_FORCED_SKB: &str = "forced by --xdp-mode skb";

/// The mode to try first on an interface, the one to fall back to when
/// the first fails, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The mode tried first.
    pub mode: Mode,
    /// The mode tried when the first fails (auto on a driver that may lack
    /// native XDP).
    pub fallback: Option<Mode>,
    /// Why, for the log and the metrics.
    pub reason: &'static str,
}

/// Decides an interface's mode from the flag and its link kind (netlink's
/// `IFLA_INFO_KIND`, as `ip -d link` shows it; `None` for a physical NIC).
pub fn plan(policy: XdpPolicy, kind: Option<&str>) -> Plan {
    let (mode, fallback, reason) = match policy {
        XdpPolicy::Native => (Mode::Native, None, REASON_FORCED_NATIVE),
        XdpPolicy::Skb => (Mode::Skb, None, REASON_FORCED_SKB),
        XdpPolicy::Auto if kind == Some("veth") => (Mode::Skb, None, REASON_VETH),
        XdpPolicy::Auto => (Mode::Native, Some(Mode::Skb), REASON_NATIVE),
    };
    Plan {
        mode,
        fallback,
        reason,
    }
}

/// The XDP attachment of one interface, as decided and made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The interface's name.
    pub iface: String,
    /// The mode it runs in.
    pub mode: Mode,
    /// Why (see the `REASON_` constants; a fallback carries the error).
    pub reason: String,
}

/// Which XDP program slot of an interface is in use (netlink's
/// `IFLA_XDP_ATTACHED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// No XDP program.
    None,
    /// Native mode.
    Native,
    /// Generic mode.
    Skb,
    /// Offloaded to the NIC, or programs in several modes.
    Other,
}

impl Attached {
    /// Whether this is `mode`.
    pub fn is(self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (Attached::Native, Mode::Native) | (Attached::Skb, Mode::Skb)
        )
    }
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::None => "none",
            Attached::Native => "native",
            Attached::Skb => "skb",
            Attached::Other => "offload or several modes",
        })
    }
}

/// What netlink says about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    /// Its link kind (`veth`, `bridge`, …); `None` for a physical NIC.
    pub kind: Option<String>,
    /// Its XDP program slot.
    pub xdp: Attached,
}

// rtnetlink constants (uapi/linux/rtnetlink.h, if_link.h, netlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
/// Attribute type bits that are flags, not the type (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// Asks netlink, in the calling thread's network namespace, for the link
/// kind and XDP state of interface `ifindex`. Robust inside a namespace,
/// unlike `/sys/class/net`, which shows the namespace that mounted /sys.
pub fn link_facts(ifindex: u32) -> Result<LinkFacts> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let index = i32::try_from(ifindex).context("interface index out of range")?;
    let mut socket = Socket::new(NETLINK_ROUTE).context("open netlink socket")?;
    socket.bind_auto().context("bind netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connect netlink socket")?;
    let mut req = Vec::with_capacity(NLMSG_HDR + IFINFOMSG);
    req.extend_from_slice(&((NLMSG_HDR + IFINFOMSG) as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // ifinfomsg: family, pad, type, index, flags, change.
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&index.to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    socket.send(&req, 0).context("send RTM_GETLINK")?;
    let (reply, _) = socket.recv_from_full().context("receive RTM_GETLINK")?;
    parse_link_reply(&reply).with_context(|| format!("RTM_GETLINK of interface {ifindex}"))
}

/// Parses the answer to one RTM_GETLINK.
fn parse_link_reply(msg: &[u8]) -> Result<LinkFacts> {
    let u16_at = |b: &[u8], off: usize| {
        b.get(off..off + 2)
            .map(|s| u16::from_ne_bytes([s[0], s[1]]))
    };
    let len = msg
        .get(..4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .context("short netlink message")?;
    let ty = u16_at(msg, 4).context("short netlink message")?;
    let msg = msg.get(..len).context("truncated netlink message")?;
    if ty == NLMSG_ERROR {
        let errno = msg
            .get(NLMSG_HDR..NLMSG_HDR + 4)
            .map_or(0, |s| i32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
        return Err(io::Error::from_raw_os_error(-errno).into());
    }
    if ty != RTM_NEWLINK {
        bail!("unexpected netlink message type {ty}");
    }
    let mut facts = LinkFacts {
        kind: None,
        xdp: Attached::None,
    };
    for (ty, payload) in attributes(msg.get(NLMSG_HDR + IFINFOMSG..).unwrap_or_default()) {
        match ty {
            IFLA_LINKINFO => {
                for (ty, value) in attributes(payload) {
                    if ty == IFLA_INFO_KIND {
                        let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                        facts.kind = Some(String::from_utf8_lossy(&value[..end]).into_owned());
                    }
                }
            }
            IFLA_XDP => {
                for (ty, value) in attributes(payload) {
                    if ty == IFLA_XDP_ATTACHED {
                        facts.xdp = match value.first() {
                            None | Some(0) => Attached::None,
                            Some(1) => Attached::Native,
                            Some(2) => Attached::Skb,
                            Some(_) => Attached::Other,
                        };
                    }
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// The (type, payload) of each netlink attribute in `buf`.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]));
        let ty = u16::from_ne_bytes([*buf.get(2)?, *buf.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((ty, payload))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_a_veth_generic_mode_and_other_drivers_native_first() {
        let veth = plan(XdpPolicy::Auto, Some("veth"));
        assert_eq!(
            (veth.mode, veth.fallback, veth.reason),
            (Mode::Skb, None, REASON_VETH)
        );
        let nic = plan(XdpPolicy::Auto, None);
        assert_eq!(
            (nic.mode, nic.fallback, nic.reason),
            (Mode::Native, Some(Mode::Skb), REASON_NATIVE)
        );
        let bond = plan(XdpPolicy::Auto, Some("bond"));
        assert_eq!(bond.mode, Mode::Native);
    }

    #[test]
    fn a_forced_mode_applies_everywhere_without_fallback() {
        for kind in [None, Some("veth")] {
            let p = plan(XdpPolicy::Native, kind);
            let want = (Mode::Native, None, REASON_FORCED_NATIVE);
            assert_eq!((p.mode, p.fallback, p.reason), want);
            let p = plan(XdpPolicy::Skb, kind);
            assert_eq!(
                (p.mode, p.fallback, p.reason),
                (Mode::Skb, None, REASON_FORCED_SKB)
            );
        }
    }

    /// An RTM_NEWLINK as the kernel sends it: header, ifinfomsg, then
    /// `attrs` (type, payload).
    fn newlink(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG];
        for (ty, payload) in attrs {
            body.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&ty.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    fn nested(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        newlink(attrs)[NLMSG_HDR + IFINFOMSG..].to_vec()
    }

    #[test]
    fn link_replies_give_the_kind_and_the_xdp_slot() {
        const NESTED: u16 = 0x8000;
        let veth = newlink(&[
            (3, b"eth0\0".to_vec()),
            (
                IFLA_LINKINFO | NESTED,
                nested(&[(IFLA_INFO_KIND, b"veth\0".to_vec())]),
            ),
            (
                IFLA_XDP | NESTED,
                nested(&[
                    (IFLA_XDP_ATTACHED, vec![2]),
                    (4, 7u32.to_ne_bytes().to_vec()),
                ]),
            ),
        ]);
        let facts = parse_link_reply(&veth).expect("parse");
        assert_eq!(facts.kind.as_deref(), Some("veth"));
        assert_eq!(facts.xdp, Attached::Skb);

        let nic = newlink(&[(IFLA_XDP | NESTED, nested(&[(IFLA_XDP_ATTACHED, vec![1])]))]);
        let facts = parse_link_reply(&nic).expect("parse");
        assert_eq!((facts.kind, facts.xdp), (None, Attached::Native));

        let mut error = vec![0u8; NLMSG_HDR + 4];
        error[..4].copy_from_slice(&((NLMSG_HDR + 4) as u32).to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[NLMSG_HDR..].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let err = parse_link_reply(&error).expect_err("an error reply");
        assert!(format!("{err:#}").contains("No such device"), "{err:#}");

        // A truncated attribute ends the walk instead of reading past it.
        let mut bad = newlink(&[(IFLA_XDP, vec![1, 2, 3, 4])]);
        bad[NLMSG_HDR + IFINFOMSG] = 200;
        assert_eq!(parse_link_reply(&bad).expect("parse").xdp, Attached::None);
    }
}
