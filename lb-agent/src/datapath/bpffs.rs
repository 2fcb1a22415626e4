//! The agent's bpffs directory: mounting it, and seeing the same one from
//! every process that runs under `ip netns exec`.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    mount::{mount, MsFlags},
    sched::{setns, CloneFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Where maps are pinned below the agent's directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

/// Where links are pinned below the agent's directory.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Moves this process into PID 1's mount namespace when it is in another one.
///
/// `ip netns exec` gives each process a private mount namespace, so a bpffs
/// mounted there would vanish with the process and a restarted agent would
/// find none of its pins. Mounting and pinning from PID 1's namespace keeps
/// them for the next agent. The network namespace is untouched. In a pod
/// without host PID, PID 1 is the container's own init and this is a no-op.
/// Must run before any thread starts (setns of a mount namespace requires a
/// single-threaded caller).
pub fn enter_host_mount_ns() -> Result<()> {
    let ours = fs::read_link("/proc/self/ns/mnt").context("read /proc/self/ns/mnt")?;
    let host = match fs::read_link("/proc/1/ns/mnt") {
        Ok(link) => link,
        // Without access to PID 1 there is nothing better to do than stay.
        Err(_) => return Ok(()),
    };
    if ours == host {
        return Ok(());
    }
    let ns = fs::File::open("/proc/1/ns/mnt").context("open /proc/1/ns/mnt")?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNS)
        .context("setns into PID 1's mount namespace (the agent needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)")?;
    Ok(())
}

/// Whether `dir` is on a bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists and is on a bpffs, mounting one there if not, and
/// creates the `maps` and `links` subdirectories.
pub fn ensure(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if !is_bpffs(dir) {
        mount(Some("bpf"), dir, Some("bpf"), MsFlags::empty(), None::<&str>).with_context(|| {
            format!("mount bpffs on {} (needs CAP_SYS_ADMIN)", dir.display())
        })?;
        if !is_bpffs(dir) {
            bail!("{} is still not a bpffs after mounting one", dir.display());
        }
    }
    for sub in [maps_dir(dir), links_dir(dir)] {
        fs::create_dir_all(&sub).with_context(|| format!("create {}", sub.display()))?;
    }
    Ok(())
}
