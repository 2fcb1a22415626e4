//! The real kube-proxy v1.32.13 (from `../shared/k8s/kube-proxy.zst`), run
//! in a rig node's namespace against the real kube-apiserver: figure 4 puts
//! its first sync, its memory and its change propagation beside the
//! agent's on the same objects, and figures 2 and 3 measure packets through
//! the rules it programs.

use std::{
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Instant,
};

use crate::kubeapi::{debian_bin, k8s_bin};

/// The line kube-proxy logs (at `--v=2`) after each sync of its rules.
pub const SYNCED: &str = "SyncProxyRules complete";
/// How the line names the IPv4 proxier (it runs one per family, IPv4
/// first; the objects here are all IPv4).
const IPV4: &str = "ipFamily=\"IPv4\"";

/// kube-proxy's `--proxy-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Table `kube-proxy`, verdict maps.
    Nftables,
    /// KUBE-SERVICES and per-Service chains.
    Iptables,
}

impl Mode {
    /// As the flag spells it.
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
        }
    }
}

/// A running kube-proxy; killed, and its nftables tables removed, on drop
/// (unless [`RealProxy::leave_rules`]).
pub struct RealProxy {
    child: Child,
    ns: String,
    mode: Mode,
    log: PathBuf,
    clean: bool,
}

impl RealProxy {
    /// Starts kube-proxy in `mode` in namespace `ns` as node `node`,
    /// reading the API through `kubeconfig`, logging to
    /// `dir/kube-proxy-NODE.log` (appended, so that syncs can be counted
    /// across restarts); `Err` says why it cannot run here.
    pub fn start(
        mode: Mode,
        ns: &str,
        dir: &Path,
        kubeconfig: &Path,
        node: &str,
    ) -> Result<Self, String> {
        let bin = k8s_bin("kube-proxy")?;
        // What kube-proxy runs: nft for its rules, iptables-restore for
        // cleaning up after the iptables mode, conntrack for UDP flows.
        debian_bin("/usr/sbin/nft", "nftables")?;
        debian_bin("/usr/sbin/iptables-restore", "iptables")?;
        debian_bin("/usr/sbin/conntrack", "conntrack")?;
        let log = dir.join(format!("kube-proxy-{node}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--hostname-override",
                node,
                &format!("--proxy-mode={}", mode.flag()),
                &format!("--cluster-cidr={}", crate::kubeproxy::CLUSTER_CIDR),
                // It would otherwise write the host's nf_conntrack_max.
                "--conntrack-max-per-core=0",
                "--v=2",
            ])
            .stdout(out)
            .stderr(err)
            // A group of its own: it is killed with the `nft` or
            // `iptables-restore` it may be running.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start kube-proxy: {e}"))?;
        Ok(Self {
            child,
            ns: ns.to_owned(),
            mode,
            log,
            clean: true,
        })
    }

    /// Its process id (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Syncs of its IPv4 rules logged so far, by this and earlier runs.
    pub fn syncs(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(SYNCED) && l.contains(IPV4))
            .count()
    }

    /// Waits until it has logged more than `before` syncs of its IPv4
    /// rules, until `deadline`; `Err` says it did not, with its log's tail.
    pub fn wait_sync(&self, before: usize, deadline: Instant) -> Result<(), String> {
        while self.syncs() <= before {
            if Instant::now() > deadline {
                return Err(format!(
                    "no sync by the deadline; its log ends:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }

    /// The log's last lines, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// How long each sync of its IPv4 rules took, by its own account (the
    /// `elapsed` of its log line), in order, in ms.
    pub fn sync_ms(&self) -> Vec<f64> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(SYNCED) && l.contains(IPV4))
            .filter_map(|l| {
                let v = l.split("elapsed=\"").nth(1)?.split('"').next()?;
                go_duration_ms(v)
            })
            .collect()
    }

    /// The Service frontends (address, protocol, port) of its IPv4 rules:
    /// the elements of the `service-ips` map (nftables), or the jumps from
    /// KUBE-SERVICES to a Service's chain (iptables).
    pub fn frontends(&self) -> Result<usize, String> {
        let (args, needle): (&[&str], &str) = match self.mode {
            Mode::Nftables => (
                &["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
                "goto ",
            ),
            Mode::Iptables => (&["iptables-save", "-t", "nat"], "-j KUBE-SVC-"),
        };
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .map_err(|e| format!("{args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(match self.mode {
            Mode::Nftables => text.matches(needle).count(),
            Mode::Iptables => text
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains(needle))
                .count(),
        })
    }

    /// Stops it and leaves the rules it programmed in the kernel, as a
    /// stopped kube-proxy does: they keep working, and no resync of its
    /// takes CPU from what is measured next.
    pub fn leave_rules(mut self) {
        self.clean = false;
    }
}

/// A Go `time.Duration` as kube-proxy logs it (`33.04ms`, `1.2s`, `950µs`),
/// in ms.
fn go_duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_alphabetic() || c == 'µ')?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-6,
        "µs" | "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(n * scale)
}

impl Drop for RealProxy {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
        if !self.clean {
            return;
        }
        // `kube-proxy --cleanup` would do this too, but fails without
        // ipset (its IPVS teardown) after removing them.
        for family in ["ip", "ip6"] {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.ns, "nft", "delete", "table", family])
                .arg("kube-proxy")
                .output();
        }
    }
}

/// `nft monitor` in a namespace: the kernel's notice of each committed
/// change to its rulesets, as nft prints it, with the time it was read.
pub struct Monitor {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Monitor {
    /// Starts watching namespace `ns`; only lines containing `filter` are
    /// kept (a full resync of 10 000 Services prints many thousands).
    pub fn start(ns: &str, filter: &str) -> Result<Self, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start nft monitor: {e}"))?;
        let stdout = child.stdout.take().ok_or("nft monitor has no stdout")?;
        let (tx, lines) = mpsc::channel();
        let filter = filter.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&filter) && tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// When the first line containing `needle` was read, waiting until
    /// `deadline`; lines read before it that do not match are dropped.
    pub fn wait_for(&self, needle: &str, deadline: Instant) -> Option<Instant> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(needle) => return Some(at),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::go_duration_ms;

    #[test]
    fn go_durations_read_as_ms() {
        assert_eq!(go_duration_ms("33.5ms"), Some(33.5));
        assert_eq!(go_duration_ms("1.25s"), Some(1250.0));
        assert!(go_duration_ms("950µs").is_some_and(|v| (v - 0.95).abs() < 1e-9));
        assert_eq!(go_duration_ms("1m2s"), None);
        assert_eq!(go_duration_ms("fast"), None);
    }
}
