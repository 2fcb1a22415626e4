//! The agent's bpffs directory: mounting it, and seeing the same one from
//! every process that runs under `ip netns exec`.

use std::{
    cell::Cell,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, CloneFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use tracing::{info, warn};

/// Where maps are pinned below the agent's directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

/// Where links are pinned below the agent's directory.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Moves this process into the mount namespace it was started from, when
/// something (such as `ip netns exec`) gave it a private one.
///
/// `ip netns exec` gives each process a private mount namespace, so a bpffs
/// mounted there would vanish with the process, taking the pins and with
/// them the attached programs, and a restarted agent would find nothing.
/// Mounting and pinning from the outer namespace keeps them for the next
/// agent. The network namespace is untouched.
///
/// The outer namespace is PID 1's when it can be read (a host or a pod with
/// host PID), else the parent process's (where PID 1 is out of reach, as in
/// a sandbox; the parent of `ip netns exec` is the shell or supervisor that
/// ran it). In a pod whose PID 1 is the agent or its init, nothing changes.
/// Must run before any thread starts (setns of a mount namespace requires a
/// single-threaded caller).
pub fn enter_outer_mount_ns() -> Result<()> {
    let ours = fs::read_link("/proc/self/ns/mnt").context("read /proc/self/ns/mnt")?;
    let parent = format!("/proc/{}/ns/mnt", nix::unistd::getppid());
    for candidate in ["/proc/1/ns/mnt", parent.as_str()] {
        let Ok(theirs) = fs::read_link(candidate) else {
            continue;
        };
        if theirs == ours {
            return Ok(());
        }
        let ns = fs::File::open(candidate).with_context(|| format!("open {candidate}"))?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNS).with_context(|| {
            format!("setns into the mount namespace of {candidate} (needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)")
        })?;
        return Ok(());
    }
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
        mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount bpffs on {} (needs CAP_SYS_ADMIN)", dir.display()))?;
        if !is_bpffs(dir) {
            bail!("{} is still not a bpffs after mounting one", dir.display());
        }
    }
    for sub in [maps_dir(dir), links_dir(dir)] {
        fs::create_dir_all(&sub).with_context(|| format!("create {}", sub.display()))?;
    }
    Ok(())
}

/// Undoes, when dropped before [`StartGuard::keep`], what a first start
/// made under the agent's bpffs directory: a start that fails before its
/// first sync leaves nothing behind that was not there before (pins, the
/// bpffs it mounted, the directory it made). A directory that already
/// held an agent's maps or links is left as it is: those pins are a
/// running datapath's.
#[derive(Debug)]
pub struct StartGuard {
    dir: PathBuf,
    made_dir: bool,
    was_bpffs: bool,
    fresh: bool,
    keep: Cell<bool>,
    /// Directories outside the bpffs the start may make (the agent's state).
    also: Vec<PathBuf>,
}

impl StartGuard {
    /// Notes what is under `dir` before the agent touches it.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            made_dir: !dir.exists(),
            was_bpffs: is_bpffs(dir),
            fresh: !maps_dir(dir).exists() && !links_dir(dir).exists(),
            keep: Cell::new(false),
            also: Vec::new(),
        }
    }

    /// Also removes `dir` (made by this start) when the start fails.
    pub fn also_remove(mut self, dir: PathBuf) -> Self {
        self.also.push(dir);
        self
    }

    /// The start succeeded: keep everything.
    pub fn keep(&self) {
        self.keep.set(true);
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.keep.get() || !self.fresh {
            return;
        }
        let dir = self.dir.display();
        for also in &self.also {
            if let Err(e) = fs::remove_dir_all(also) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(
                        "removing {}, made by the failed start, failed: {e}",
                        also.display()
                    );
                }
            }
        }
        if let Err(e) = super::programs::cleanup(&self.dir) {
            warn!("removing the pins of the failed start under {dir} failed: {e:#}");
            return;
        }
        if !self.was_bpffs && is_bpffs(&self.dir) {
            if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
                warn!("unmounting the bpffs the failed start mounted on {dir} failed: {e}");
                return;
            }
        }
        if self.made_dir {
            if let Err(e) = fs::remove_dir(&self.dir) {
                warn!("removing {dir}, made by the failed start, failed: {e}");
                return;
            }
        }
        info!("the failed start left nothing under {dir}");
    }
}
