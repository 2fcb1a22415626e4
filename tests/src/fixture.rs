//! One loaded datapath for BPF_PROG_TEST_RUN tests: programs loaded but not
//! attached, maps pinned in a private bpffs, seeded through the agent's own
//! reconciler, removed on drop.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use lb_agent::{
    datapath::{
        bpffs,
        maps::Maps,
        programs::{MapSizes, Programs, TestProgram},
        xdp_mode::XdpPolicy,
    },
    model::{Endpoint, Frontend, FrontendKind, Model, Protocol, ServicePort, ServicePortRef},
    reconcile::Reconciler,
};
use lb_common::{addr::addr_be, Config};

/// Maglev table size of the fixtures: the smallest supported, for speed.
pub const TABLE_SIZE: u32 = 251;

/// The node address the fixture's config map holds (the SNAT source).
pub const NODE_ADDR: &str = "10.99.0.1";
/// The node's IPv6 address the fixture's config map holds.
pub const NODE_ADDR6: &str = "fd00:99::1";

/// A private, loaded, unattached datapath.
pub struct Datapath {
    /// The programs.
    pub progs: Programs,
    /// The maps.
    pub maps: Maps,
    reconciler: Reconciler,
    // Last, so that maps and programs are closed before it is unmounted.
    dir: BpffsDir,
}

/// A private bpffs, unmounted and removed on drop, also when `new` panics
/// half-way.
struct BpffsDir(PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Datapath {
    /// Loads the programs into a fresh bpffs under /run/lb-tests.
    pub fn new() -> Self {
        Self::with_sizes(
            MapSizes {
                services: 1024,
                backends: 1024,
                conntrack: 4096,
                embryonic: 1024,
                affinity: 1024,
                src_ranges: 1024,
                maglev_slots: 1 << 18,
            },
            TABLE_SIZE,
        )
    }

    /// [`Self::new`] with other map capacities and Maglev table size (the
    /// benchmarks load up to 100 000 Services).
    pub fn with_sizes(sizes: MapSizes, table_size: u32) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = BpffsDir(PathBuf::from(format!(
            "/run/lb-tests/unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        bpffs::ensure(&dir.0).expect("mount a bpffs for the test (run as root)");
        let mut progs = Programs::load(&dir.0, sizes, XdpPolicy::Auto).expect("load programs");
        progs.install_sctp().expect("fill the SCTP program arrays");
        let mut maps = Maps::open(&dir.0).expect("open maps");
        let node: IpAddr = NODE_ADDR.parse().expect("addr");
        let node6: IpAddr = NODE_ADDR6.parse().expect("addr");
        maps.config
            .set(
                0,
                Config {
                    node_addr4_be: addr_be(node).0[0],
                    snat_port_min: 61000,
                    snat_port_max: 65535,
                    node_addr6_be: addr_be(node6).0,
                    tcp_timeout_s: 3600,
                    tcp_closing_timeout_s: 60,
                    udp_timeout_s: 30,
                    flags: 0,
                    // None, as the other timeouts' tests expect; the
                    // embryonic tests set one.
                    embryonic_timeout_s: 0,
                    snat_skip_min: 0,
                    snat_skip_max: 0,
                },
                0,
            )
            .expect("write config");
        Self {
            progs,
            maps,
            reconciler: Reconciler::new(table_size),
            dir,
        }
    }

    /// Makes the maps hold exactly these Service ports.
    pub fn apply(&mut self, services: &[(ServicePortRef, ServicePort)]) {
        let model = Model {
            services: services.iter().cloned().collect(),
        };
        let report = self.reconciler.apply(&model, &mut self.maps);
        assert!(report.failures.is_empty(), "apply failed: {report:?}");
        let reconciler = &self.reconciler;
        self.maps
            .purge_affinity(|svc, backend| reconciler.is_active(svc, backend))
            .expect("purge affinity");
    }

    /// The bpffs directory the maps are pinned under.
    pub fn bpffs(&self) -> &std::path::Path {
        &self.dir.0
    }

    /// Where the maps are pinned.
    pub fn maps_dir(&self) -> PathBuf {
        bpffs::maps_dir(&self.dir.0)
    }

    /// Makes every tracked flow, established or embryonic, look idle for
    /// `secs` seconds. The datapath subtracts timestamps with wrapping
    /// arithmetic, so this holds even when the machine has been up for less
    /// than `secs`.
    pub fn age_flows(&mut self, secs: u64) {
        let then = monotonic_ns().wrapping_sub(secs * 1_000_000_000);
        for map in [&mut self.maps.conntrack, &mut self.maps.ct_embryo] {
            let entries: Vec<_> = map.iter().map(|e| e.expect("read conntrack")).collect();
            for (k, mut v) in entries {
                v.last_seen_ns = then;
                map.insert(k, v, 0).expect("age conntrack entry");
            }
        }
    }

    /// Sets the embryonic timeout of the config map.
    pub fn set_embryonic_timeout(&mut self, secs: u32) {
        let mut cfg = self.maps.config.get(&0, 0).expect("read config");
        cfg.embryonic_timeout_s = secs;
        self.maps.config.set(0, cfg, 0).expect("write config");
    }

    /// Sets the SNAT port range of the config map, and the ports inside it
    /// left out (0, 0: none).
    pub fn set_snat_ports(&mut self, ports: (u16, u16), skip: (u16, u16)) {
        let mut cfg = self.maps.config.get(&0, 0).expect("read config");
        (cfg.snat_port_min, cfg.snat_port_max) = ports;
        (cfg.snat_skip_min, cfg.snat_skip_max) = skip;
        self.maps.config.set(0, cfg, 0).expect("write config");
    }

    /// Sets the config map's `CONFIG_F_*` bits (for example DSR mode).
    pub fn set_config_flags(&mut self, flags: u32) {
        let mut cfg = self.maps.config.get(&0, 0).expect("read config");
        cfg.flags = flags;
        self.maps.config.set(0, cfg, 0).expect("write config");
    }

    /// Runs a program on a packet; returns its verdict and output bytes.
    pub fn run(&mut self, prog: TestProgram, packet: &[u8]) -> (u32, Vec<u8>) {
        self.progs
            .test_run(prog, packet)
            .expect("BPF_PROG_TEST_RUN")
    }
}

/// `bpf_ktime_get_ns`'s clock, read from user space.
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

impl Default for Datapath {
    fn default() -> Self {
        Self::new()
    }
}

/// A Service port for fixtures: `frontends` as (address, port, kind),
/// `endpoints` as (address, port, on this node).
pub fn service(
    name: &str,
    protocol: Protocol,
    frontends: &[(&str, u16, FrontendKind)],
    endpoints: &[(&str, u16, bool)],
) -> (ServicePortRef, ServicePort) {
    let r = ServicePortRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: String::new(),
        protocol,
    };
    let sp = ServicePort {
        frontends: frontends
            .iter()
            .map(|(a, port, kind)| Frontend {
                addr: a.parse().expect("addr"),
                port: *port,
                kind: *kind,
            })
            .collect(),
        endpoints: endpoints
            .iter()
            .map(|(a, port, local)| Endpoint {
                addr: a.parse().expect("addr"),
                port: *port,
                local: *local,
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect(),
        ..ServicePort::default()
    };
    (r, sp)
}

impl Datapath {
    /// Makes every reply-direction conntrack entry (established or
    /// embryonic) look idle for `secs` seconds.
    pub fn age_replies(&mut self, secs: u64) {
        let then = monotonic_ns().wrapping_sub(secs * 1_000_000_000);
        for map in [&mut self.maps.conntrack, &mut self.maps.ct_embryo] {
            let entries: Vec<_> = map
                .iter()
                .map(|e| e.expect("read conntrack"))
                .filter(|(_, v)| v.flags & lb_common::conntrack::CT_F_REPLY != 0)
                .collect();
            for (k, mut v) in entries {
                v.last_seen_ns = then;
                map.insert(k, v, 0).expect("age conntrack entry");
            }
        }
    }

    /// Makes the conntrack entry of `key` (established or embryonic) look
    /// idle for `secs` seconds; panics when there is none.
    pub fn age_entry(&mut self, key: &lb_common::CtKey, secs: u64) {
        let then = monotonic_ns().wrapping_sub(secs * 1_000_000_000);
        for map in [&mut self.maps.conntrack, &mut self.maps.ct_embryo] {
            if let Ok(mut v) = map.get(key, 0) {
                v.last_seen_ns = then;
                map.insert(key, v, 0).expect("age conntrack entry");
                return;
            }
        }
        panic!("no conntrack entry {key:?}");
    }

    /// Makes every affinity entry look `secs` seconds old.
    pub fn age_affinity(&mut self, secs: u64) {
        let then = monotonic_ns().wrapping_sub(secs * 1_000_000_000);
        let entries: Vec<_> = self
            .maps
            .affinity
            .iter()
            .map(|e| e.expect("read affinity"))
            .collect();
        for (k, mut v) in entries {
            v.last_seen_ns = then;
            self.maps
                .affinity
                .insert(k, v, 0)
                .expect("age affinity entry");
        }
    }
}

/// The packets a datapath counter has counted so far.
pub fn counter(dp: &Datapath, name: &str) -> u64 {
    dp.maps
        .counters()
        .expect("read counters")
        .iter()
        .find(|(n, _)| *n == name)
        .map_or_else(|| panic!("no counter {name}"), |(_, c)| c.packets)
}

/// The counters of the Service port named `name` (`default/NAME/PROTO` as
/// the reconciler names fixture Services), summed over CPUs.
pub fn service_counters(dp: &Datapath, name: &str) -> lb_common::stats::SvcCounters {
    dp.maps
        .service_counters()
        .expect("read per-Service counters")
        .into_iter()
        .find(|(_, n, _)| n == name)
        .map_or_else(|| panic!("no Service port {name}"), |(_, _, c)| c)
}

/// Runs `f` on a thread in a private, unnamed network namespace, gone when
/// the thread ends, after running each of `setup` there (`ip` arguments) and
/// turning forwarding on: programs run there see its routes and neighbours
/// in their FIB lookups (BPF_PROG_TEST_RUN runs them on its loopback).
pub fn in_private_netns<T: Send>(setup: &[&[&str]], f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare a network namespace (run as root)");
            // Children and /proc/sys/net see the namespace of the thread
            // that forks or opens them.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                .expect("enable IPv6 forwarding");
            for args in
                std::iter::once(&["link", "set", "lo", "up"][..]).chain(setup.iter().copied())
            {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .expect("run ip");
                assert!(
                    out.status.success(),
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
