//! The raw `bpf()` commands aya 0.14 does not offer for our links (opening
//! a pin as an fd, updating and detaching a link), in one place.

use std::{
    ffi::CString,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

/// `enum bpf_cmd`'s `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `enum bpf_cmd`'s `BPF_LINK_DETACH`.
const BPF_LINK_DETACH: libc::c_long = 34;

/// A `union bpf_attr` as the commands here use it: zeroed past the fields a
/// command reads, as the kernel requires.
pub type Attr = [u8; 128];

/// The `bpf()` system call with a zero-padded attribute buffer.
pub fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i32> {
    // SAFETY: the buffer outlives the call and is as large as the kernel's
    // `union bpf_attr` of the commands used here; the pointers the caller
    // put in it point at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(|_| std::io::Error::other("bpf() returned an out-of-range fd"))
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).context("pin path has a NUL byte")?;
    let mut attr: Attr = [0; 128];
    // union bpf_attr, obj get: pathname, bpf_fd, file_flags.
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("open pin {}", path.display()))?;
    // SAFETY: a successful BPF_OBJ_GET returns a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaches the link pinned at `path` now and removes the pin.
///
/// Removing the pin alone detaches the program only once the kernel drops
/// the link's last reference, which it does later, from a work queue (bpffs
/// frees its inodes after an RCU grace period): until then the hook keeps
/// running, and an interface takes an XDP program of another mode only once
/// the old one is gone. A link kind that cannot be detached by command
/// (`EOPNOTSUPP`) is left to the pin's removal.
pub fn detach_link_pin(path: &Path) -> Result<()> {
    let fd = obj_get(path)?;
    std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    // union bpf_attr, link detach: link_fd.
    let mut attr: Attr = [0; 128];
    let link_fd = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    attr[..4].copy_from_slice(&link_fd.to_ne_bytes());
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("detach the link pinned at {}", path.display())),
    }
}

/// `enum bpf_cmd`'s `BPF_MAP_CREATE`.
const BPF_MAP_CREATE: libc::c_long = 0;
/// `enum bpf_cmd`'s `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `enum bpf_map_type`'s `BPF_MAP_TYPE_ARRAY`.
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `enum bpf_map_type`'s `BPF_MAP_TYPE_ARRAY_OF_MAPS`.
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// Waits for RCU grace periods: after [`GraceWaiter::wait`] returns, every
/// BPF program (other than sleepable ones, which the agent has none of)
/// that was running when it was called has finished.
///
/// The kernel offers no direct call for that, but it waits for exactly
/// this after every update of a map of maps, so that user space knows no
/// program still uses the old inner map (`maybe_wait_bpf_programs` in
/// kernel/bpf/syscall.c). The waiter is a private one-entry array of maps.
#[derive(Debug)]
pub struct GraceWaiter {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GraceWaiter {
    /// Creates the private maps.
    pub fn new() -> Result<Self> {
        let create = |map_type: u32, inner_fd: u32| -> Result<OwnedFd> {
            let mut attr: Attr = [0; 128];
            // union bpf_attr, map create: map_type, key_size, value_size,
            // max_entries, map_flags, inner_map_fd.
            for (i, v) in [map_type, 4, 4, 1, 0, inner_fd].into_iter().enumerate() {
                attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
            }
            let fd = bpf(BPF_MAP_CREATE, &mut attr).context("create a map for grace periods")?;
            // SAFETY: the kernel just returned this fd, owned by no one else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        use std::os::fd::AsRawFd as _;
        let inner = create(BPF_MAP_TYPE_ARRAY, 0)?;
        let raw = u32::try_from(inner.as_raw_fd()).context("negative fd")?;
        let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, raw)?;
        Ok(Self { outer, inner })
    }

    /// Returns once an RCU grace period has passed since the call.
    pub fn wait(&self) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        let key: u32 = 0;
        let value = u32::try_from(self.inner.as_raw_fd()).context("negative fd")?;
        let mut attr: Attr = [0; 128];
        // union bpf_attr, map element: map_fd, pad, key, value, flags.
        let map_fd = u32::try_from(self.outer.as_raw_fd()).context("negative fd")?;
        attr[0..4].copy_from_slice(&map_fd.to_ne_bytes());
        attr[8..16].copy_from_slice(&(std::ptr::from_ref(&key) as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(std::ptr::from_ref(&value) as u64).to_ne_bytes());
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("wait for an RCU grace period")?;
        Ok(())
    }
}
