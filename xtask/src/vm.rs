//! `cargo xtask vm-test`: a chosen part of the BPF_PROG_TEST_RUN, namespace
//! and host-network tests on another kernel, booted under QEMU.
//!
//! Everything comes from Debian's packages and is cached under
//! `~/.cache/lb-xtask/vm`: QEMU (bookworm-backports: bookworm's own
//! qemu-system conflicts with the machine's qemu-utils), busybox-static, and
//! the kernel package, unpacked. The guest boots from an initramfs holding
//! busybox, the test binaries, the agent, `ip`, `ethtool` and `bpftool` with
//! their libraries, and the modules the tests need; its /init runs the tests
//! and prints their exit status on the serial console, which is our stdout.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{cache_dir, cargo, output, root, run, step, which, Tally};

/// What the guest runs, a test binary and the tests of it, by exact name.
///
/// The host runs every test; the guest, under software emulation about ten
/// times slower, runs one test per kernel facility the programs lean on, so
/// that 6.1's verifier and helpers are proven without the whole suite's
/// twenty minutes there: every program loaded and driven (the corpus), the
/// translation and its checksums per protocol and family, ICMP errors made
/// and quoted, DSR wrapping and unwrapping (`bpf_xdp_adjust_head`), the FIB
/// lookup, fragments, the LPM source ranges, LRU eviction, affinity, and the
/// socket hooks with the socket diag modules.
const GUEST_TESTS: [(&str, &[&str]); 3] = [
    (
        "datapath",
        &[
            "every_map_is_pinned_with_btf_and_the_layout_of_lb_common",
            "packet_corpus_gets_the_asserted_verdict_from_every_program",
            "replies_are_reverse_translated_to_the_frontend",
            "ipv6::ipv6_replies_are_reverse_translated_to_the_frontend",
            "sctp_replies_are_reverse_translated_with_their_crc32c_updated",
            "icmp_errors_about_translated_flows_quote_what_the_sender_sent",
            "tcp_to_a_service_without_endpoints_is_reset",
            "wrapped_packets_for_this_node_are_unwrapped_to_the_backend_their_shim_names",
            "ipv6::an_ipv6_dsr_flow_is_wrapped_in_ipv6_to_the_backends_node_with_one_hop_less_inside",
            "ipv6::an_ipv6_packet_too_big_once_wrapped_gets_packet_too_big_with_the_mtu_less_the_wrap",
            "packets_the_datapath_forwards_itself_leave_with_one_hop_less",
            "ipv6::an_ipv6_nodeport_to_a_remote_backend_is_snated_to_the_node_and_forwarded_by_fib",
            "later_fragments_follow_their_first_fragment_and_untracked_ones_pass",
            "load_balancer_source_ranges_admit_only_their_sources",
            "a_flood_of_unanswered_flows_evicts_only_other_unanswered_flows",
            "client_ip_affinity_holds_within_its_timeout_and_follows_backend_changes",
        ],
    ),
    (
        "services",
        &[
            "pod_to_cluster_ip_tcp_reaches_every_backend_on_both_nodes",
            "pod_to_cluster_ip_udp_answers_from_the_cluster_ip",
            "client_to_node_port_on_each_node_reaches_local_and_remote_backends",
        ],
    ),
    (
        "hostnet",
        &[
            "the_node_reaches_a_cluster_ip_over_tcp_and_sees_the_cluster_ip_as_its_peer",
            "the_node_reaches_a_cluster_ip_over_udp_and_replies_come_from_the_cluster_ip",
            "the_node_reaches_node_ports_on_its_own_ipv6_address",
            "an_ipv6_socket_reaches_an_ipv4_service_by_its_mapped_address_and_sees_it_mapped",
            "a_service_without_endpoints_refuses_the_node_at_once",
            "a_removed_backends_connected_node_sockets_are_ended",
            "socket_hooks_outlive_the_agent_are_re_adopted_and_go_with_cleanup",
        ],
    ),
];

/// Modules the tests need, in load order (bridge needs llc and stp; the
/// diag modules let the agent find and end stale node sockets).
const MODULES: [&str; 9] = [
    "llc",
    "stp",
    "bridge",
    "veth",
    "sch_ingress",
    "cls_bpf",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// Tools the rig runs in the guest, copied with their libraries.
const GUEST_TOOLS: [&str; 3] = ["ip", "ethtool", "bpftool"];

/// The line /init prints last: the tests' combined exit status.
const EXIT_MARK: &str = "LB-VM-EXIT=";

/// The longest a guest may run (TCG is slow, but not this slow).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A kernel to boot.
struct Kernel {
    /// The image QEMU loads.
    image: PathBuf,
    /// Where its modules live (`lib/modules/<release>`), if it has any.
    modules: Option<PathBuf>,
    /// How it is named in messages.
    name: String,
}

/// Boots `kernel` (`debian-6.1`, or the path of a kernel image) and runs the
/// tests inside, counting into `tally`.
pub fn vm_test(kernel: &str, tally: &mut Tally) -> Result<()> {
    setup_vm_tools()?;
    let kernel = fetch_kernel(kernel)?;
    let binaries = build_binaries()?;
    let dir = root().join("target/vm");
    let tree = dir.join("initramfs");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("remove {}", tree.display()))?;
    }
    make_tree(&tree, &kernel, &binaries)?;
    let image = dir.join("initramfs.cpio");
    write_cpio(&tree, &image)?;
    boot(&kernel, &image, tally)
}

/// Installs QEMU and busybox-static when missing.
fn setup_vm_tools() -> Result<()> {
    let have_qemu = which("qemu-system-x86_64").is_some();
    let have_busybox = Path::new("/bin/busybox").is_file() || which("busybox").is_some();
    if have_qemu && have_busybox {
        step("vm tools", "ok");
        return Ok(());
    }
    step(
        "vm tools",
        "installing qemu-system-x86 (bookworm-backports) and busybox-static",
    );
    let sources = Path::new("/etc/apt/sources.list.d/lb-backports.sources");
    if !sources.exists() {
        fs::write(
            sources,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("write {}", sources.display()))?;
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update failed")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args([
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "busybox-static",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing QEMU and busybox-static failed")
}

/// The kernel to boot: Debian's 6.1 package, downloaded and unpacked once,
/// or an image given by path (whose modules are expected built in).
fn fetch_kernel(spec: &str) -> Result<Kernel> {
    if spec != "debian-6.1" {
        let image = PathBuf::from(spec);
        if !image.is_file() {
            bail!("--kernel {spec}: neither `debian-6.1` nor a kernel image file");
        }
        return Ok(Kernel {
            image,
            modules: None,
            name: spec.to_string(),
        });
    }
    let pkg = debian_61_package()?;
    let dir = cache_dir().join("vm").join(&pkg);
    let unpacked = dir.join("root");
    if !unpacked.join("boot").is_dir() {
        step("vm kernel", &format!("downloading {pkg}"));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // apt's sandbox user cannot write here; it then downloads as root
        // with a warning, which is fine.
        // Not `run`, which works in the workspace root.
        let status = Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(&dir)
            .status()
            .context("start apt-get")?;
        if !status.success() {
            bail!("apt-get download {pkg} failed ({status})");
        }
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("no .deb in {}", dir.display()))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))
            .context("unpack the kernel package")?;
    } else {
        step("vm kernel", &format!("{pkg} (cached)"));
    }
    let find = |sub: &str, prefix: &str| -> Result<PathBuf> {
        let d = unpacked.join(sub);
        fs::read_dir(&d)
            .with_context(|| format!("read {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in {}", d.display()))
    };
    Ok(Kernel {
        image: find("boot", "vmlinuz-")?,
        modules: Some(find("lib/modules", "6.1")?),
        name: pkg,
    })
}

/// The versioned package behind bookworm's `linux-image-amd64` 6.1 (the
/// backports suite carries a newer one under the same name).
fn debian_61_package() -> Result<String> {
    let show = output(Command::new("apt-cache").args(["show", "linux-image-amd64"]))
        .context("apt-cache show linux-image-amd64")?;
    for stanza in show.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
        };
        if !field("Version:").is_some_and(|v| v.starts_with("6.1.")) {
            continue;
        }
        if let Some(pkg) = field("Depends:").and_then(|d| {
            d.split([',', ' '])
                .find(|w| w.starts_with("linux-image-6.1"))
        }) {
            return Ok(pkg.to_string());
        }
    }
    bail!("no 6.1 linux-image-amd64 in apt's lists: run `apt-get update`")
}

/// Paths of the binaries the guest runs.
struct Binaries {
    agent: PathBuf,
    /// Each of [`GUEST_TESTS`]'s test binaries, by its name there.
    tests: Vec<(&'static str, PathBuf)>,
}

fn build_binaries() -> Result<Binaries> {
    crate::build()?;
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("build the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let exe = |name: &str| -> Result<PathBuf> {
        let target = format!("\"name\":\"{name}\"");
        text.lines()
            .filter(|l| l.contains(&target) && l.contains("\"test\":true"))
            .find_map(|l| {
                let rest = l.split("\"executable\":\"").nth(1)?;
                Some(PathBuf::from(rest.split('"').next()?))
            })
            .with_context(|| format!("cargo named no executable for the {name} tests"))
    };
    let tests = GUEST_TESTS
        .iter()
        .map(|(name, _)| Ok((*name, exe(name)?)))
        .collect::<Result<_>>()?;
    Ok(Binaries {
        agent: crate::agent_bin(),
        tests,
    })
}

/// Lays out the guest's root file system under `tree`.
fn make_tree(tree: &Path, kernel: &Kernel, bins: &Binaries) -> Result<()> {
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var",
        "lb",
        "lib/modules",
        "etc",
    ] {
        fs::create_dir_all(tree.join(d))?;
    }
    std::os::unix::fs::symlink("/run", tree.join("var/run"))?;
    let busybox = which("busybox").unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    copy_exe(&busybox, &tree.join("bin/busybox"))?;
    copy_with_libs(&bins.agent, &tree.join("lb/lb-agent"), tree)?;
    for (name, src) in &bins.tests {
        copy_with_libs(src, &tree.join("lb").join(name), tree)?;
    }
    for tool in GUEST_TOOLS {
        let path = which(tool).with_context(|| format!("{tool} is not installed"))?;
        copy_with_libs(&path, &tree.join("usr/sbin").join(tool), tree)?;
    }
    if let Some(modules) = &kernel.modules {
        for m in MODULES {
            let file = format!("{m}.ko");
            let found = find_file(modules, &file)
                .with_context(|| format!("module {file} not in {}", modules.display()))?;
            fs::copy(&found, tree.join("lib/modules").join(&file))?;
        }
    }
    let init = tree.join("init");
    fs::write(&init, init_script())?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's /init: mounts, modules, the tests, the exit mark, power off.
fn init_script() -> String {
    let modules = MODULES.join(" ");
    let runs: String = GUEST_TESTS
        .iter()
        .map(|(bin, tests)| {
            format!(
                "./{bin} --exact --test-threads=2 {} || status=1\n",
                tests.join(" ")
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf
for m in {modules}; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
ip link set lo up
echo "lb-vm: kernel $(uname -r)"
cd /lb
export LB_AGENT_BIN=/lb/lb-agent LB_TEST_SLOWDOWN=10
status=0
{runs}echo "{EXIT_MARK}$status"
poweroff -f
"#
    )
}

/// Boots the guest and relays its console; the tests' status decides.
fn boot(kernel: &Kernel, initramfs: &Path, total: &mut Tally) -> Result<()> {
    let mut tally = Tally::default();
    // /dev/kvm exists on these machines but a KVM guest hangs after the
    // BIOS, so software emulation is the default; LB_VM_KVM=1 asks for KVM.
    let kvm = std::env::var_os("LB_VM_KVM").is_some_and(|v| v == "1");
    let accel = if kvm { "kvm" } else { "tcg" };
    println!("vm: booting {} ({accel})", kernel.name);
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-smp", "2", "-m", "3072"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start qemu-system-x86_64")?;
    let started = Instant::now();
    let mut exit = None;
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r');
            let _ = writeln!(stdout, "vm| {line}");
            tally.add_line(line);
            if let Some(code) = line.strip_prefix(EXIT_MARK) {
                exit = code.trim().parse::<i32>().ok();
            }
            if started.elapsed() > GUEST_TIMEOUT {
                let _ = child.kill();
                bail!("the guest ran longer than {GUEST_TIMEOUT:?}");
            }
        }
    }
    let _ = child.wait();
    total.passed += tally.passed;
    total.failed += tally.failed;
    // An exact name that matches no test runs nothing and passes: count.
    let named: usize = GUEST_TESTS.iter().map(|(_, tests)| tests.len()).sum();
    let ran = tally.passed + tally.failed;
    match exit {
        Some(0) if ran != named as u64 => bail!(
            "the guest passed {ran} tests where GUEST_TESTS names {named}: \
             a name there matches no test"
        ),
        Some(0) => Ok(()),
        Some(code) => bail!("tests in the VM failed (status {code})"),
        None => bail!("the guest stopped without reporting the tests' status"),
    }
}

/// Copies an executable and the shared libraries `ldd` names for it, at
/// their own paths inside `tree`.
fn copy_with_libs(src: &Path, dst: &Path, tree: &Path) -> Result<()> {
    copy_exe(src, dst)?;
    let ldd = output(Command::new("ldd").arg(src)).unwrap_or_default();
    for lib in ldd.lines().filter_map(|l| {
        l.split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from)
    }) {
        let inside = tree.join(lib.strip_prefix("/").unwrap_or(&lib));
        if !inside.exists() {
            if let Some(parent) = inside.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(&lib, &inside).with_context(|| format!("copy {}", lib.display()))?;
        }
    }
    Ok(())
}

fn copy_exe(src: &Path, dst: &Path) -> Result<()> {
    fs::copy(src, dst).with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// Writes `tree` as an uncompressed newc cpio archive, the format the
/// kernel unpacks into its initial root file system.
fn write_cpio(tree: &Path, out: &Path) -> Result<()> {
    let mut file = std::io::BufWriter::new(
        fs::File::create(out).with_context(|| format!("create {}", out.display()))?,
    );
    let mut entries = Vec::new();
    collect(tree, &mut entries)?;
    for (ino, path) in (1u32..).zip(entries) {
        let rel = path.strip_prefix(tree).unwrap_or(&path);
        let meta = fs::symlink_metadata(&path)?;
        let data = if meta.file_type().is_symlink() {
            fs::read_link(&path)?
                .to_string_lossy()
                .into_owned()
                .into_bytes()
        } else if meta.is_file() {
            fs::read(&path)?
        } else {
            Vec::new()
        };
        cpio_entry(&mut file, &rel.to_string_lossy(), meta.mode(), ino, &data)?;
    }
    cpio_entry(&mut file, "TRAILER!!!", 0, 0, &[])?;
    file.flush()?;
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut children: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    children.sort();
    for path in children {
        out.push(path.clone());
        if path.is_dir() && !fs::symlink_metadata(&path)?.file_type().is_symlink() {
            collect(&path, out)?;
        }
    }
    Ok(())
}

/// One newc header, name and data, each padded to 4 bytes.
fn cpio_entry(
    w: &mut impl std::io::Write,
    name: &str,
    mode: u32,
    ino: u32,
    data: &[u8],
) -> Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let pad = |n: usize| (4 - n % 4) % 4;
    w.write_all(&vec![0; pad(110 + namesize)])?;
    w.write_all(data)?;
    w.write_all(&vec![0; pad(data.len())])?;
    Ok(())
}
