//! SCTP over raw sockets, for the rig: a responder in a pod and a client
//! that sends one packet and reads the answer.
//!
//! The development kernel has no SCTP stack (`CONFIG_IP_SCTP` unset: no
//! module, `socket(…, IPPROTO_SCTP)` fails), so the rig speaks SCTP's
//! wire format itself: packets built with their CRC32c, sent and read on
//! raw IPv4 sockets of protocol 132, which the kernel hands every SCTP
//! packet to (and, having a raw socket for it, answers none with an ICMP
//! protocol unreachable). What the datapath sees is the same: addresses,
//! ports, chunks and checksums. (A kernel with an SCTP stack also answers
//! each packet, with an ABORT for an unknown association; the client here
//! waits for the DATA answer.)

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_common::{crc32c, proto};

use crate::{packet::sctp_chunk, rig::in_ns};

/// A raw IPv4 socket of protocol SCTP in namespace `ns`, reads timing out
/// after `timeout`.
fn raw_socket(ns: &str, timeout: Duration) -> io::Result<OwnedFd> {
    let fd = in_ns(ns, || {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, i32::from(proto::SCTP)) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened and owned by no one else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` outlives the call, and its size is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// An SCTP packet (no IP header) from port `sport` to `dport` with one
/// DATA chunk carrying `payload`, its CRC32c computed.
pub fn data_packet(sport: u16, dport: u16, vtag: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let chunk_len = u16::try_from(16 + payload.len()).expect("a small payload");
    p.extend_from_slice(&[sctp_chunk::DATA, 0x03]);
    p.extend_from_slice(&chunk_len.to_be_bytes());
    // TSN, stream id, stream sequence, payload protocol id.
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    p.resize(p.len().next_multiple_of(4), 0);
    let crc = crc32c::of_bytes(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An SCTP packet as received on a raw socket.
#[derive(Debug)]
pub struct Received {
    /// Source address and port.
    pub from: SocketAddrV4,
    /// Destination address and port.
    pub to: SocketAddrV4,
    /// Whether its CRC32c is right.
    pub crc_ok: bool,
    /// The first chunk's payload, when it is a DATA chunk.
    pub payload: Vec<u8>,
}

/// Parses an IPv4 packet as a raw socket returns it (IP header first).
fn parse(buf: &[u8]) -> Option<Received> {
    let ihl = usize::from(*buf.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])).min(buf.len());
    let ip = |at: usize| {
        Some(Ipv4Addr::new(
            *buf.get(at)?,
            buf[at + 1],
            buf[at + 2],
            buf[at + 3],
        ))
    };
    let sctp = buf.get(ihl..total)?;
    let port = |at: usize| Some(u16::from_be_bytes([*sctp.get(at)?, *sctp.get(at + 1)?]));
    let payload = if sctp.get(12) == Some(&sctp_chunk::DATA) {
        let len = usize::from(port(14)?);
        sctp.get(28..12 + len).unwrap_or_default().to_vec()
    } else {
        Vec::new()
    };
    Some(Received {
        from: SocketAddrV4::new(ip(12)?, port(0)?),
        to: SocketAddrV4::new(ip(16)?, port(2)?),
        crc_ok: crate::packet::sctp_checksum_ok(sctp),
        payload,
    })
}

/// Sends SCTP packet `sctp` to `dst` on raw socket `fd`.
fn send(fd: &OwnedFd, dst: Ipv4Addr, sctp: &[u8]) -> io::Result<()> {
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffers outlive the call, and their sizes are passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            sctp.as_ptr().cast(),
            sctp.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads one packet from raw socket `fd`; `Ok(None)` on a timeout.
fn recv(fd: &OwnedFd) -> io::Result<Option<Received>> {
    let mut buf = [0u8; 2048];
    // SAFETY: the buffer outlives the call, and its size is passed.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
            _ => Err(e),
        };
    }
    Ok(parse(&buf[..n as usize]))
}

/// Answers every SCTP packet to `port` in its namespace with a DATA chunk
/// saying `name` and the source the packet came from (`"b0 10.0.0.1:4000"`),
/// and counts packets whose CRC32c was wrong (answered with nothing).
/// Stops on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    bad_crc: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    /// Starts answering SCTP packets to `port` in `ns`.
    pub fn start(ns: &str, port: u16, name: &str) -> Self {
        let fd = raw_socket(ns, Duration::from_millis(100))
            .unwrap_or_else(|e| panic!("raw SCTP socket in {ns}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let bad_crc = Arc::new(AtomicU32::new(0));
        let (flag, bad) = (stop.clone(), bad_crc.clone());
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok(Some(p)) = recv(&fd) else {
                    continue;
                };
                if p.to.port() != port {
                    continue;
                }
                if !p.crc_ok {
                    bad.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let text = format!("{name} {}", p.from);
                let answer = data_packet(port, p.from.port(), 1, text.as_bytes());
                let _ = send(&fd, *p.from.ip(), &answer);
            }
        });
        Self {
            stop,
            bad_crc,
            thread: Some(thread),
        }
    }

    /// Packets to its port whose CRC32c was wrong, so far.
    pub fn bad_crc(&self) -> u32 {
        self.bad_crc.load(Ordering::Relaxed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one DATA packet from source port `sport` in `ns` to `dst` and
/// returns the first DATA packet back to that port from `dst`'s address
/// within `timeout`, with its text; `Err(TimedOut)` when none comes.
pub fn hello(
    ns: &str,
    sport: u16,
    dst: SocketAddrV4,
    timeout: Duration,
) -> io::Result<(Received, String)> {
    let fd = raw_socket(ns, Duration::from_millis(50))?;
    send(&fd, *dst.ip(), &data_packet(sport, dst.port(), 0, b"hello"))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(p) = recv(&fd)? {
            // Only a DATA answer: a kernel with an SCTP stack of its own
            // also answers the packet, with an ABORT (no association).
            if p.to.port() == sport && p.from.ip() == dst.ip() && !p.payload.is_empty() {
                let text = String::from_utf8_lossy(&p.payload)
                    .trim_end_matches('\0')
                    .to_string();
                return Ok((p, text));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no SCTP answer from {dst} to port {sport}"),
    ))
}
