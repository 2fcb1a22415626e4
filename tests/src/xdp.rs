//! Tiny XDP programs of the tests' and the benchmark's own: packet
//! generators (UDP for figure 2's throughput, TCP SYNs from random sources
//! for the SYN flood), the MAC-rewriting forwarder that is the machine's
//! limit, and the sink that counts delivered packets. Not part of the
//! datapath's object: each is a handful of BPF instructions assembled
//! here, with the addresses it needs written into the instructions, and
//! loaded, attached and run through the `bpf()` syscall directly.
//!
//! A generator is BPF_PROG_TEST_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, what xdp-trafficgen uses): the kernel
//! runs the program over `repeat` copies of one frame, and each XDP_TX
//! sends the frame out of the ingress device named in the context. Run in
//! the fabric namespace on a node's port, that puts the frames straight
//! onto the node's `eth0` as a NIC would; that needs the node's `eth0` to
//! take XDP frames (a program or GRO on it). Each XDP_PASS instead hands
//! the frame to the ingress device's stack as a socket buffer: on a bridge
//! port, the bridge forwards it as it forwards any frame, which is how a
//! container node's `eth0` receives.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_PROG_TYPE_XDP` and the `BPF_XDP` attach type.
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux 5.18).
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// `XDP_FLAGS_SKB_MODE`: generic XDP, run by the stack on socket buffers.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// Helper ids: `bpf_get_prandom_u32`, `bpf_redirect`.
const HELPER_PRANDOM: i32 = 7;
const HELPER_REDIRECT: i32 = 23;

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
#[cfg(test)]
const XDP_REDIRECT: i32 = 4;

/// Frames the kernel runs per batch in live-frames mode; below a veth's
/// 256-frame ring, so that a batch never overflows it.
const BATCH: u32 = 64;

// Opcodes (class | mode/op | size/source).
const LDXW: u8 = 0x61;
const LDXH: u8 = 0x69;
const LDXB: u8 = 0x71;
const STW: u8 = 0x62;
const STH: u8 = 0x6a;
const STXH: u8 = 0x6b;
const MOV_K: u8 = 0xb7;
const MOV_X: u8 = 0xbf;
const ADD_K: u8 = 0x07;
const ADD_X: u8 = 0x0f;
const SUB_X: u8 = 0x1f;
const RSH_K: u8 = 0x77;
const AND_K: u8 = 0x57;
const BE: u8 = 0xdc;
const JGT_X: u8 = 0x2d;
const JNE_K: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// One instruction; `to_fail` marks a jump to the program's fail tail,
/// whose offset is filled in when the program is finished.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
    to_fail: bool,
}

fn op(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
        to_fail: false,
    }
}

fn to_fail(code: u8, dst: u8, src: u8, imm: i32) -> Insn {
    Insn {
        to_fail: true,
        ..op(code, dst, src, 0, imm)
    }
}

/// `head` (which may jump to the fail tail), then `body` and `exit` (the
/// body leaves its verdict in `r0`), then the fail tail
/// `r0 = fail_verdict; exit`, encoded.
fn assemble(head: Vec<Insn>, body: &[Insn], fail_verdict: i32) -> Vec<u64> {
    let mut all = head;
    all.extend_from_slice(body);
    all.push(op(EXIT, 0, 0, 0, 0));
    let fail = all.len();
    all.push(op(MOV_K, 0, 0, 0, fail_verdict));
    all.push(op(EXIT, 0, 0, 0, 0));
    all.iter()
        .enumerate()
        .map(|(i, x)| {
            let off = if x.to_fail {
                (fail - i - 1) as i16
            } else {
                x.off
            };
            u64::from(x.code)
                | u64::from(x.dst | (x.src << 4)) << 8
                | u64::from(off as u16) << 16
                | u64::from(x.imm as u32) << 32
        })
        .collect()
}

/// `r2` = data (also in `r6`, which survives helper calls), `r3` =
/// data_end; to the fail tail unless the frame has `min_len` bytes.
fn bounds(min_len: i32) -> Vec<Insn> {
    vec![
        op(LDXW, 2, 1, 0, 0),
        op(LDXW, 3, 1, 4, 0),
        op(MOV_X, 6, 2, 0, 0),
        op(MOV_X, 4, 2, 0, 0),
        op(ADD_K, 4, 0, 0, min_len),
        to_fail(JGT_X, 4, 3, 0),
    ]
}

/// [`bounds`], and to the fail tail unless the frame is Ethernet + IPv4 +
/// UDP.
fn ipv4_udp(min_len: i32) -> Vec<Insn> {
    let mut head = bounds(min_len);
    head.extend([
        op(LDXH, 5, 2, 12, 0),
        // EtherType 0x0800 as a little-endian load of its two bytes.
        to_fail(JNE_K, 5, 0, 0x0008),
        op(LDXB, 5, 2, 23, 0),
        to_fail(JNE_K, 5, 0, 17),
    ]);
    head
}

/// [`ipv4_udp`], and to the fail tail unless the payload starts with
/// `magic` too (the generator's frames). Assumes a 20-byte IP header, as
/// the generator sends.
fn marked(magic: &[u8; 4]) -> Vec<Insn> {
    let magic = u32::from_le_bytes(*magic);
    // The comparison sign-extends its immediate.
    assert!(magic < 0x8000_0000, "magic must fit a positive immediate");
    let mut head = ipv4_udp(46);
    head.push(op(LDXW, 5, 2, 42, 0));
    head.push(to_fail(JNE_K, 5, 0, magic as i32));
    head
}

/// The sink: drops the generator's frames (marked with `magic`; the veth
/// counts them as `xdp_drops`), passes everything else.
pub fn sink(magic: &[u8; 4]) -> Vec<u64> {
    assemble(marked(magic), &[op(MOV_K, 0, 0, 0, XDP_DROP)], XDP_PASS)
}

/// A wire for the fabric: the generator's frames (marked with `magic`) go
/// straight to interface `to` (`bpf_redirect`), everything else passes
/// to the bridge.
pub fn wire(magic: &[u8; 4], to: u32) -> Vec<u64> {
    assemble(
        marked(magic),
        &[
            op(MOV_K, 1, 0, 0, to as i32),
            op(MOV_K, 2, 0, 0, 0),
            op(CALL, 0, 0, 0, HELPER_REDIRECT),
        ],
        XDP_PASS,
    )
}

/// The forwarder, the limit of the machine: IPv4 UDP frames get `dst` and
/// `src` as MACs and go back out (XDP_TX); everything else passes.
pub fn forwarder(dst: [u8; 6], src: [u8; 6]) -> Vec<u64> {
    let w = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let h = |b: &[u8]| i32::from(u16::from_le_bytes([b[0], b[1]]));
    assemble(
        ipv4_udp(34),
        &[
            op(STW, 6, 0, 0, w(&dst[..4])),
            op(STH, 6, 0, 4, h(&dst[4..])),
            op(STW, 6, 0, 6, w(&src[..4])),
            op(STH, 6, 0, 10, h(&src[4..])),
            op(MOV_K, 0, 0, 0, XDP_TX),
        ],
        XDP_PASS,
    )
}

/// Bytes of Ethernet + IPv4 (no options) + UDP headers.
pub const HEADERS: usize = 42;

/// How the generator's frames leave the port it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    /// XDP_TX: out of the port, straight onto its peer as XDP frames.
    Tx,
    /// XDP_PASS: into the port's stack as socket buffers (on a bridge port,
    /// the bridge forwards them).
    Pass,
}

/// Instructions that write `bytes` (an even count) at the frame's start
/// (`r6`): live frames are recycled pages, so a frame that a node rewrote
/// (NAT, MACs) would otherwise come round again as it left.
fn template(bytes: &[u8]) -> Vec<Insn> {
    let mut out: Vec<Insn> = bytes
        .chunks_exact(4)
        .enumerate()
        .map(|(k, w)| {
            let v = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            op(STW, 6, 0, (4 * k) as i16, v)
        })
        .collect();
    let rest = bytes.chunks_exact(4).remainder();
    if let [a, b] = rest {
        let at = (bytes.len() - 2) as i16;
        out.push(op(STH, 6, 0, at, i32::from(u16::from_le_bytes([*a, *b]))));
    }
    out
}

/// The UDP generator: writes `headers` (a frame's first [`HEADERS`] bytes)
/// over each frame, gives it a random UDP source port in
/// `base..base + ports` (`ports` a power of two; the UDP checksum must be
/// zero, "none" in IPv4) and sends it as `inject` says.
pub fn generator(headers: &[u8; HEADERS], base: u16, ports: u16, inject: Inject) -> Vec<u64> {
    let verdict = inject.verdict();
    assert!(ports.is_power_of_two(), "ports must be a power of two");
    let head = bounds(HEADERS as i32);
    let mut body = template(headers);
    body.extend([
        op(CALL, 0, 0, 0, HELPER_PRANDOM),
        op(AND_K, 0, 0, 0, i32::from(ports - 1)),
        op(ADD_K, 0, 0, 0, i32::from(base)),
        op(BE, 0, 0, 0, 16),
        op(STXH, 6, 0, 34, 0),
        op(MOV_K, 0, 0, 0, verdict),
    ]);
    assemble(head, &body, verdict)
}

impl Inject {
    fn verdict(self) -> i32 {
        match self {
            Inject::Tx => XDP_TX,
            Inject::Pass => XDP_PASS,
        }
    }
}

/// Bytes of Ethernet + IPv4 (no options) + TCP (no options) headers.
pub const TCP_HEADERS: usize = 54;

/// Offsets in a [`TCP_HEADERS`] frame (the first three also in a UDP one):
/// the IP identification, the low half of the source address, the source
/// port and the sequence number's halves.
const IP_ID: i16 = 18;
const SADDR_LO: i16 = 28;
const SPORT: i16 = 34;
const SEQ_HI: i16 = 38;
const SEQ_LO: i16 = 40;

/// The 16-bit word of `frame` at `off`, as a little-endian load reads it.
fn word(frame: &[u8], off: i16) -> u32 {
    let o = off as usize;
    u32::from(u16::from_le_bytes([frame[o], frame[o + 1]]))
}

/// One's complement sum of two 16-bit words, folded.
fn fold_add(a: u32, b: u32) -> u32 {
    let s = a + b;
    (s & 0xffff) + (s >> 16)
}

/// Stores at `at` the word that, beside the random word in `r0`, keeps the
/// one's complement sum of the pair `sum`: `sum + !r0`, folded once (it is
/// at most 0x1fffe). A checksum covering both words then holds unchanged
/// (one's complement sums are the same in either byte order). Uses r2, r3.
fn balance(at: i16, sum: u32) -> [Insn; 8] {
    [
        op(MOV_K, 2, 0, 0, 0xffff),
        op(SUB_X, 2, 0, 0, 0),
        op(ADD_K, 2, 0, 0, sum as i32),
        op(MOV_X, 3, 2, 0, 0),
        op(RSH_K, 3, 0, 0, 16),
        op(AND_K, 2, 0, 0, 0xffff),
        op(ADD_X, 2, 3, 0, 0),
        op(STXH, 6, 2, at, 0),
    ]
}

/// `r0` = a random 16-bit word, stored at `at`.
fn random_at(at: i16) -> [Insn; 3] {
    [
        op(CALL, 0, 0, 0, HELPER_PRANDOM),
        op(AND_K, 0, 0, 0, 0xffff),
        op(STXH, 6, 0, at, 0),
    ]
}

/// The SYN flood generator: writes `headers` (a TCP SYN's first
/// [`TCP_HEADERS`] bytes, checksums right) over each frame, gives it a
/// random source address within the /16 of the one in `headers` and a
/// random source port, and sends it as `inject` says. Each random word is
/// balanced by another in the same checksums (the address by the IP
/// identification in the IP header's and by the sequence number's low half
/// in the TCP one's; the port by the sequence number's high half), so that
/// every frame's checksums hold as the template's did, with nothing summed
/// per frame.
pub fn syn_flood(headers: &[u8; TCP_HEADERS], inject: Inject) -> Vec<u64> {
    let verdict = inject.verdict();
    let head = bounds(TCP_HEADERS as i32);
    let mut body = template(headers);
    let addr = word(headers, SADDR_LO);
    body.extend(random_at(SADDR_LO));
    body.extend(balance(IP_ID, fold_add(addr, word(headers, IP_ID))));
    body.extend(balance(SEQ_LO, fold_add(addr, word(headers, SEQ_LO))));
    body.extend(random_at(SPORT));
    body.extend(balance(
        SEQ_HI,
        fold_add(word(headers, SPORT), word(headers, SEQ_HI)),
    ));
    body.push(op(MOV_K, 0, 0, 0, verdict));
    assemble(head, &body, verdict)
}

/// The UDP flood generator: as [`generator`], but each frame also gets a
/// random source address within the /16 of the one in `headers`, so that
/// nearly every frame is a flow never seen (a DNS storm, or a flood from
/// spoofed sources). The address's random word is balanced by the IP
/// identification in the IP header's checksum; the UDP checksum must be
/// zero ("none" in IPv4), so it needs nothing.
pub fn udp_flood(headers: &[u8; HEADERS], inject: Inject) -> Vec<u64> {
    let verdict = inject.verdict();
    let head = bounds(HEADERS as i32);
    let mut body = template(headers);
    let addr = word(headers, SADDR_LO);
    body.extend(random_at(SADDR_LO));
    body.extend(balance(IP_ID, fold_add(addr, word(headers, IP_ID))));
    body.extend(random_at(SPORT));
    body.push(op(MOV_K, 0, 0, 0, verdict));
    assemble(head, &body, verdict)
}

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<i32> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed,
    // laid out for `cmd` by the caller; every pointer in it points at memory
    // that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as i32)
}

/// A loaded XDP program.
pub struct Prog {
    fd: OwnedFd,
}

impl Prog {
    /// Loads `insns` as an XDP program named `name`; the verifier's log is
    /// in the error when it refuses.
    pub fn load(name: &str, insns: &[u64]) -> Result<Self, String> {
        let license = b"GPL\0";
        let mut log = vec![0u8; 1 << 16];
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        // Without a log first (the kernel formats none); with one to say why
        // when the verifier refuses.
        for log_level in [0u32, 1] {
            // union bpf_attr, prog load: prog_type, insn_cnt, insns, license,
            // log_level, log_size, log_buf, kern_version, prog_flags,
            // prog_name[16], prog_ifindex, expected_attach_type.
            let mut attr = [0u64; 16];
            attr[0] = u64::from(BPF_PROG_TYPE_XDP) | (insns.len() as u64) << 32;
            attr[1] = insns.as_ptr() as u64;
            attr[2] = license.as_ptr() as u64;
            if log_level > 0 {
                attr[3] = u64::from(log_level) | (log.len() as u64) << 32;
                attr[4] = log.as_mut_ptr() as u64;
            }
            attr[6] = u64::from_le_bytes(prog_name[..8].try_into().unwrap_or_default());
            attr[7] = u64::from_le_bytes(prog_name[8..].try_into().unwrap_or_default());
            attr[8] = u64::from(BPF_XDP) << 32;
            match bpf(BPF_PROG_LOAD, &mut attr) {
                // SAFETY: a successful BPF_PROG_LOAD returns a new fd we own.
                Ok(fd) => {
                    return Ok(Self {
                        fd: unsafe { OwnedFd::from_raw_fd(fd) },
                    })
                }
                Err(_) if log_level == 0 => {}
                Err(e) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    return Err(format!(
                        "load XDP program {name}: {e}: {}",
                        String::from_utf8_lossy(&log[..end])
                    ));
                }
            }
        }
        Err(format!("load XDP program {name}: refused"))
    }

    /// Attaches the program to interface `ifindex` of the calling thread's
    /// network namespace; it stays attached while the link lives.
    pub fn attach(&self, ifindex: u32) -> io::Result<Link> {
        // Flags 0: native XDP where the driver has it, as veth does.
        self.attach_with(ifindex, 0)
    }

    /// [`Self::attach`] in generic (skb) mode.
    pub fn attach_generic(&self, ifindex: u32) -> io::Result<Link> {
        self.attach_with(ifindex, XDP_FLAGS_SKB_MODE)
    }

    fn attach_with(&self, ifindex: u32, flags: u32) -> io::Result<Link> {
        // union bpf_attr, link create: prog_fd, target_ifindex, attach_type,
        // flags.
        let mut attr = [0u64; 8];
        attr[0] = self.fd.as_raw_fd() as u64 | u64::from(ifindex) << 32;
        attr[1] = u64::from(BPF_XDP) | u64::from(flags) << 32;
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: a successful BPF_LINK_CREATE returns a new fd we own.
        Ok(Link {
            _fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Runs the program in live-frames mode over `count` copies of `frame`
    /// as if they arrived on `ifindex` (of the calling thread's network
    /// namespace), so that XDP_TX sends them out of that interface; returns
    /// how long the kernel took.
    pub fn send(&self, ifindex: u32, frame: &[u8], count: u32) -> io::Result<Duration> {
        // struct xdp_md: data, data_end (the frame's length), data_meta,
        // ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        // union bpf_attr, test: prog_fd, retval, data_size_in,
        // data_size_out, data_in, data_out, repeat, duration, ctx_size_in,
        // ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size.
        let mut attr = [0u64; 10];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = frame.len() as u64;
        attr[2] = frame.as_ptr() as u64;
        attr[4] = u64::from(count);
        attr[5] = std::mem::size_of_val(&ctx) as u64;
        attr[6] = ctx.as_ptr() as u64;
        attr[8] = u64::from(BPF_F_TEST_XDP_LIVE_FRAMES);
        attr[9] = u64::from(BATCH);
        let t = Instant::now();
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(t.elapsed())
    }
}

#[cfg(test)]
impl Prog {
    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN, no device):
    /// its verdict and the frame as it left.
    pub fn run(&self, frame: &[u8]) -> io::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = [0u64; 10];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = frame.len() as u64 | (out.len() as u64) << 32;
        attr[2] = frame.as_ptr() as u64;
        attr[3] = out.as_mut_ptr() as u64;
        attr[4] = 1;
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        out.truncate((attr[1] >> 32) as usize);
        Ok(((attr[0] >> 32) as u32, out))
    }
}

/// An attachment; dropping it detaches the program.
pub struct Link {
    _fd: OwnedFd,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{flags, Packet, L4};
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut p = Packet::udp(
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 100), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 20000),
            payload,
        );
        if let L4::Udp { no_checksum, .. } = &mut p.l4 {
            *no_checksum = true;
        }
        p.bytes()
    }

    // Needs root (BPF_PROG_LOAD), as the whole benchmark does.
    #[test]
    fn programs_do_what_they_say() {
        let marked = frame(b"LBGNxxxxxxxxxxxxxx");
        let other = frame(b"hello");
        let sink = Prog::load("t_sink", &sink(b"LBGN")).expect("load sink");
        assert_eq!(sink.run(&marked).expect("run").0, XDP_DROP as u32);
        assert_eq!(sink.run(&other).expect("run").0, XDP_PASS as u32);

        let wire = Prog::load("t_wire", &wire(b"LBGN", 1)).expect("load wire");
        assert_eq!(wire.run(&marked).expect("run").0, XDP_REDIRECT as u32);
        assert_eq!(wire.run(&other).expect("run").0, XDP_PASS as u32);

        let (dst, src) = ([2, 0, 0, 0, 0, 0xb], [2, 0, 0, 0, 0, 0xe]);
        let fwd = Prog::load("t_fwd", &forwarder(dst, src)).expect("load forwarder");
        let (verdict, out) = fwd.run(&marked).expect("run");
        assert_eq!(verdict, XDP_TX as u32);
        assert_eq!((&out[..6], &out[6..12]), (&dst[..], &src[..]));
        assert_eq!(out[12..], marked[12..]);

        let headers: [u8; HEADERS] = marked[..HEADERS].try_into().expect("headers");
        let gen = Prog::load("t_gen", &generator(&headers, 40000, 256, Inject::Tx))
            .expect("load generator");
        let pass = Prog::load("t_gen_pass", &generator(&headers, 40000, 256, Inject::Pass))
            .expect("load generator");
        assert_eq!(pass.run(&marked).expect("run").0, XDP_PASS as u32);
        // A frame a node rewrote comes back whole.
        let mut rewritten = marked.clone();
        rewritten[..34].fill(0xaa);
        let ports: std::collections::HashSet<u16> = (0..64)
            .map(|_| {
                let (verdict, out) = gen.run(&rewritten).expect("run");
                assert_eq!(verdict, XDP_TX as u32);
                assert_eq!(out[..34], marked[..34]);
                assert_eq!(out[36..], marked[36..]);
                u16::from_be_bytes([out[34], out[35]])
            })
            .collect();
        assert!(ports.len() > 8, "source ports vary: {ports:?}");
        assert!(ports.iter().all(|p| (40000..40256).contains(p)));
    }

    // Needs root (BPF_PROG_LOAD).
    #[test]
    fn syn_flood_frames_vary_their_source_and_keep_valid_checksums() {
        let syn = Packet::tcp(
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 30080),
            flags::SYN,
            b"",
        )
        .bytes();
        let headers: [u8; TCP_HEADERS] = syn[..TCP_HEADERS].try_into().expect("headers");
        let gen = Prog::load("t_synflood", &syn_flood(&headers, Inject::Pass)).expect("load");
        let mut rewritten = syn.clone();
        rewritten[..TCP_HEADERS].fill(0xaa);
        let sources: std::collections::HashSet<(u32, u16)> = (0..256)
            .map(|_| {
                let (verdict, out) = gen.run(&rewritten).expect("run");
                assert_eq!(verdict, XDP_PASS as u32);
                crate::packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
                assert_eq!(out[26..28], [10, 77], "within the template's /16");
                assert_eq!(out[30..34], syn[30..34], "same destination");
                assert_eq!(out[36..38], syn[36..38], "same destination port");
                assert_eq!(out[47], flags::SYN);
                (
                    u32::from_be_bytes([out[26], out[27], out[28], out[29]]),
                    u16::from_be_bytes([out[34], out[35]]),
                )
            })
            .collect();
        assert!(sources.len() > 250, "sources vary: {}", sources.len());
    }

    // Needs root (BPF_PROG_LOAD).
    #[test]
    fn udp_flood_frames_vary_their_source_and_keep_valid_checksums() {
        let mut p = Packet::udp(
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 30080),
            b"LBGN\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        );
        if let L4::Udp { no_checksum, .. } = &mut p.l4 {
            *no_checksum = true;
        }
        let frame = p.bytes();
        let headers: [u8; HEADERS] = frame[..HEADERS].try_into().expect("headers");
        let gen = Prog::load("t_udpflood", &udp_flood(&headers, Inject::Pass)).expect("load");
        let mut rewritten = frame.clone();
        rewritten[..HEADERS].fill(0xaa);
        let sources: std::collections::HashSet<(u32, u16)> = (0..256)
            .map(|_| {
                let (verdict, out) = gen.run(&rewritten).expect("run");
                assert_eq!(verdict, XDP_PASS as u32);
                crate::packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
                assert_eq!(out[40..42], [0, 0], "no UDP checksum");
                assert_eq!(out[26..28], [10, 77], "within the template's /16");
                assert_eq!(out[30..34], frame[30..34], "same destination");
                assert_eq!(out[36..38], frame[36..38], "same destination port");
                assert_eq!(out[HEADERS..], frame[HEADERS..], "same payload");
                (
                    u32::from_be_bytes([out[26], out[27], out[28], out[29]]),
                    u16::from_be_bytes([out[34], out[35]]),
                )
            })
            .collect();
        assert!(sources.len() > 250, "sources vary: {}", sources.len());
    }

    #[test]
    fn jumps_land_on_the_fail_tail() {
        let p = sink(b"LBGN");
        // The tail is the last two instructions: r0 = XDP_PASS; exit.
        let tail = p.len() - 2;
        assert_eq!(p[tail] & 0xff, u64::from(MOV_K));
        assert_eq!(p[tail] >> 32, XDP_PASS as u64);
        for (i, x) in p.iter().enumerate() {
            let code = (*x & 0xff) as u8;
            if code == JGT_X || code == JNE_K {
                let off = ((*x >> 16) & 0xffff) as u16 as i16;
                assert_eq!(i as i64 + 1 + i64::from(off), tail as i64, "jump at {i}");
            }
        }
    }
}
