//! `cargo xtask`: set-up, build, demo and tests of the lb load balancer.
//!
//! ```text
//! cargo xtask setup                      # install what is missing; quick when all is there
//! cargo xtask build                      # target/release/lb-agent with its eBPF object
//! cargo xtask demo                       # namespace cluster, agents, traffic (root)
//! cargo xtask test                       # unit, privileged, then VM tests (root)
//! cargo xtask test --no-integration      # unit tests only
//! cargo xtask test -- nodeport           # cargo test arguments for the privileged tests
//! cargo xtask test -- --test datapath -- --nocapture
//! cargo xtask test --no-vm               # all but the tests in a VM (Debian's 6.1)
//! cargo xtask vm-test [--kernel debian-6.1|PATH]
//! cargo xtask bench [--quick]           # benchmarks: target/bench/report.md (root)
//! ```
//!
//! `build`, `demo` and `test` run `setup` first, which installs what a fresh
//! machine of this kind (Debian 12, root, rustup with stable and a nightly)
//! lacks and does nothing when all is present.

use std::{
    env, fmt, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod vm;

/// Developer tasks for lb.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src,
    /// bpf-linker against the nightly's LLVM, bpffs).
    Setup,
    /// Build the agent (with its embedded eBPF object) and the test binaries.
    Build,
    /// Build a namespace cluster, run the agents on examples/manifests, send
    /// traffic and show where it went (as root).
    Demo,
    /// Run the unit tests, the privileged tests (BPF_PROG_TEST_RUN fixtures
    /// and namespace scenarios) and the tests in a VM on 6.1, as root.
    Test {
        /// Run only the unit tests, which need neither root nor the kernel.
        #[arg(long)]
        no_integration: bool,
        /// Leave out the tests in a VM on Debian's 6.1 kernel (`vm-test`),
        /// which otherwise run last; CI never passes this.
        #[arg(long)]
        no_vm: bool,
        /// Arguments for `cargo test` of the privileged tests (of the unit
        /// tests with --no-integration): a filter, `--test NAME`, and after
        /// a second `--` arguments for the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (as root): per-packet cost, Maglev, control plane; writes
    /// target/bench/report.md and plots and prints the summary.
    Bench {
        /// A smoke run of a few minutes at most: fewer runs, smaller scales.
        #[arg(long)]
        quick: bool,
    },
    /// Boot another kernel under QEMU and run the BPF_PROG_TEST_RUN tests
    /// and a namespace smoke test inside it (as root).
    VmTest {
        /// `debian-6.1` (downloaded from Debian and cached), or the path of
        /// a kernel image with the modules it needs built in.
        #[arg(long, default_value = "debian-6.1")]
        kernel: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Task::Setup => setup(),
        Task::Build => setup().and_then(|()| build()),
        Task::Demo => setup().and_then(|()| build()).and_then(|()| demo()),
        Task::Test {
            no_integration,
            no_vm,
            args,
        } => test(no_integration, !no_vm, &args),
        Task::Bench { quick } => setup().and_then(|()| build()).and_then(|()| bench(quick)),
        Task::VmTest { kernel } => vm_test(&kernel),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            // A failed child's own exit code passes through (the demo's, …).
            e.chain()
                .find_map(|c| c.downcast_ref::<Failed>())
                .and_then(|f| f.status.code())
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .map_or(ExitCode::FAILURE, ExitCode::from)
        }
    }
}

/// A command that ran and exited unsuccessfully.
#[derive(Debug)]
struct Failed {
    shown: String,
    status: ExitStatus,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed ({})", self.shown, self.status)
    }
}

impl std::error::Error for Failed {}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// How a command is shown in messages: program and arguments, no env.
fn shown(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command in the workspace root with inherited output; fails with
/// the command line and a [`Failed`] carrying its status.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = shown(cmd);
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start `{shown}`: is it installed and on PATH?"))?;
    if !status.success() {
        return Err(Failed { shown, status }.into());
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or `None` if it cannot
/// start or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a command runs and succeeds (its output discarded).
fn cmd_ok(cmd: &mut Command) -> bool {
    output(cmd).is_some()
}

/// The cargo that runs xtask (so nested builds use the same toolchain).
fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Where a program is found on PATH.
fn which(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// One line per set-up step: what it found or what it did.
fn step(name: &str, what: &str) {
    println!("setup: {name:<11} {what}");
}

fn setup() -> Result<()> {
    setup_packages()?;
    setup_rust_src()?;
    setup_bpf_linker()?;
    setup_bpffs()
}

/// Tools the tests, the rig, the benchmarks and `bpftool` inspection call,
/// with the Debian package that has each. `nft` and `iptables-restore` load
/// the kube-proxy rule sets the benchmarks compare against.
const PACKAGES: [(&str, &str); 6] = [
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("iptables-restore", "iptables"),
];

/// Whether a tool is installed (PATH, plus the sbin directories a non-login
/// root shell may lack).
fn have_tool(tool: &str) -> bool {
    which(tool).is_some()
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

fn setup_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(tool, _)| !have_tool(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step("packages", "ok");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "packages {} are missing and installing them needs root: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    step("packages", &format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update failed: check the network and /etc/apt/sources.list")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

fn setup_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "no nightly toolchain: the eBPF programs need one; try `rustup toolchain install nightly`",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src", "ok");
        return Ok(());
    }
    step("rust-src", "installing for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src to the nightly toolchain")
}

/// What the bpf-linker build depends on.
struct Nightly {
    /// `commit-hash` and `LLVM version` of `rustc +nightly -vV`: the stamp.
    fingerprint: String,
    /// LLVM major version (`22`), for the `llvm-<major>` feature.
    major: String,
    /// `<sysroot>/lib`, which holds the nightly's libLLVM.
    libdir: PathBuf,
}

fn nightly() -> Result<Nightly> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed: is the nightly toolchain installed?")?;
    let field = |key: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no `{key}` line in `rustc +nightly -vV`"))
    };
    let commit = field("commit-hash:")?;
    let llvm = field("LLVM version:")?;
    let major = llvm
        .split('.')
        .next()
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("unexpected LLVM version `{llvm}` in `rustc +nightly -vV`"))?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    Ok(Nightly {
        fingerprint: format!("commit-hash: {commit}\nLLVM version: {llvm}\n"),
        major,
        libdir: Path::new(sysroot.trim()).join("lib"),
    })
}

/// Holds `llvm/lib/libLLVM.so` (the LLVM prefix for the bpf-linker build)
/// and, next to it, the stamp of the nightly it was built for.
fn cache_dir() -> PathBuf {
    env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/lb-xtask")
}

/// Whether a file name is the nightly's libLLVM of this major
/// (`libLLVM.so.22.1-rust-…` or `libLLVM-22-rust-….so`).
fn is_libllvm(name: &str, major: &str) -> bool {
    name.starts_with(&format!("libLLVM.so.{major}."))
        || name.starts_with(&format!("libLLVM-{major}-"))
        || name.starts_with(&format!("libLLVM-{major}."))
}

/// Whether `ldd` output shows the nightly's own libLLVM of this major
/// loaded from `libdir`, and no library missing.
fn ldd_uses(ldd: &str, libdir: &Path, major: &str) -> bool {
    let dir = libdir.to_string_lossy();
    !ldd.contains("not found")
        && ldd.lines().any(|l| {
            let Some((_, target)) = l.split_once("=>") else {
                return false;
            };
            let path = Path::new(target.split_whitespace().next().unwrap_or_default());
            path.parent().is_some_and(|p| p.to_string_lossy() == dir)
                && path
                    .file_name()
                    .is_some_and(|n| is_libllvm(&n.to_string_lossy(), major))
        })
}

fn linker_runs() -> bool {
    cmd_ok(Command::new("bpf-linker").arg("--version"))
}

/// Whether the bpf-linker on PATH runs and loads the nightly's own libLLVM.
fn linker_uses_nightly_llvm(n: &Nightly) -> bool {
    let Some(bin) = which("bpf-linker") else {
        return false;
    };
    linker_runs()
        && output(Command::new("ldd").arg(&bin)).is_some_and(|l| ldd_uses(&l, &n.libdir, &n.major))
}

fn setup_bpf_linker() -> Result<()> {
    let n = nightly()?;
    let cache = cache_dir();
    let stamp = cache.join("bpf-linker.stamp");
    let stamped = fs::read_to_string(&stamp).ok();
    match &stamped {
        Some(s) if *s == n.fingerprint && linker_runs() => {
            step("bpf-linker", "ok");
            return Ok(());
        }
        // Built by hand before this set-up existed: accept it if it loads
        // the nightly's libLLVM, and stamp it.
        None if linker_uses_nightly_llvm(&n) => {
            fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
            fs::write(&stamp, &n.fingerprint)
                .with_context(|| format!("write {}", stamp.display()))?;
            step(
                "bpf-linker",
                &format!(
                    "ok (loads the nightly's LLVM {} from {}; stamped)",
                    n.major,
                    n.libdir.display()
                ),
            );
            return Ok(());
        }
        _ => {}
    }
    let why = match &stamped {
        None if which("bpf-linker").is_none() => "not installed",
        None => "not built against the nightly's LLVM",
        Some(s) if *s != n.fingerprint => "the nightly changed since it was built",
        Some(_) => "it does not run",
    };
    step(
        "bpf-linker",
        &format!(
            "{why}: building against the nightly's LLVM {} (about a minute)",
            n.major
        ),
    );
    // bpf-linker must use the LLVM of the rustc that emits the bitcode, and
    // Debian has no LLVM of that major: link it to the nightly's own libLLVM
    // and find that at run time through an rpath.
    let llvm = cache.join("llvm");
    let llvm_lib = llvm.join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("create {}", llvm_lib.display()))?;
    let so = fs::read_dir(&n.libdir)
        .with_context(|| format!("read {}", n.libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: does this nightly ship libLLVM? try `rustup update nightly`",
                n.libdir.display()
            )
        })?;
    let link = llvm_lib.join("libLLVM.so");
    match fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", link.display())),
    }
    std::os::unix::fs::symlink(&so, &link)
        .with_context(|| format!("link {} to {}", link.display(), so.display()))?;
    // A stale stamp must not survive a failed build.
    let _ = fs::remove_file(&stamp);
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{}", n.major))
        .env("LLVM_PREFIX", &llvm)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", n.libdir.display()),
        ))
    .context("building bpf-linker failed; its output above says why")?;
    if !linker_runs() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    fs::write(&stamp, &n.fingerprint).with_context(|| format!("write {}", stamp.display()))
}

fn setup_bpffs() -> Result<()> {
    let fs_type =
        output(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"])).unwrap_or_default();
    if fs_type.trim() == "bpf_fs" {
        step("bpffs", "ok");
        return Ok(());
    }
    if !is_root() {
        step(
            "bpffs",
            "not mounted on /sys/fs/bpf (mounting needs root; the agent mounts its own)",
        );
        return Ok(());
    }
    step("bpffs", "mounting on /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("cannot mount bpffs on /sys/fs/bpf: is CONFIG_BPF_SYSCALL set?")
}

/// `target/release/lb-agent`, under `CARGO_TARGET_DIR` when that is set.
fn agent_bin() -> PathBuf {
    let target =
        env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |t| root().join(t));
    target.join("release/lb-agent")
}

fn build() -> Result<()> {
    println!("build: lb-agent (builds and embeds the eBPF object)");
    run(cargo().args(["build", "--release", "-p", "lb-agent"]))
        .context("building lb-agent failed; `cargo xtask setup` checks the BPF toolchain")?;
    println!("build: test binaries and the demo");
    run(cargo().args(["build", "--release", "-p", "lb-tests", "--tests", "--bins"]))
        .context("building the lb-tests crate failed")?;
    let bin = agent_bin();
    if !bin.is_file() {
        bail!(
            "the build succeeded but {} is missing: is CARGO_TARGET_DIR or a build.target set?",
            bin.display()
        );
    }
    println!("build: {}", bin.display());
    Ok(())
}

fn require_root(what: &str, alternative: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} loads BPF programs and makes network namespaces: run it as root{alternative}"
        );
    }
    Ok(())
}

fn demo() -> Result<()> {
    require_root("the demo", "")?;
    println!("demo: lb-demo with LB_AGENT_BIN={}", agent_bin().display());
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "lb-tests",
            "--bin",
            "lb-demo",
        ])
        .env("LB_AGENT_BIN", agent_bin()))
}

/// `target/bench` (under `CARGO_TARGET_DIR` when that is set).
fn bench_dir() -> PathBuf {
    agent_bin()
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root().join("target"), Path::to_path_buf)
        .join("bench")
}

fn bench(quick: bool) -> Result<()> {
    require_root("bench", "")?;
    // A bench run killed half-way leaves what a killed test run leaves.
    sweep_leftovers();
    let out = bench_dir();
    println!("bench: lb-bench, report in {}", out.display());
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "lb-tests",
        "--bin",
        "lb-bench",
        "--",
        "--out",
    ])
    .arg(&out)
    .env("LB_AGENT_BIN", agent_bin());
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

/// Passed and failed test counts over several `cargo test` runs.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Adds a libtest summary line (`test result: ok. 3 passed; 0 failed; …`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, echoing its output and counting into `tally` (cargo's
/// own last line is that of the last doc-test binary, which usually has
/// nothing to run, so xtask prints the totals itself).
fn run_tests(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = shown(cmd);
    println!("test: {shown}");
    let mut child = cmd
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut read_err = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(line) => {
                    println!("{line}");
                    tally.add_line(&line);
                }
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("wait for `{shown}`"))?;
    if !status.success() {
        return Err(Failed { shown, status }.into());
    }
    match read_err {
        Some(e) => Err(e).context("read test output"),
        None => Ok(()),
    }
}

/// `cargo test` arguments for the privileged tests: the user's, with
/// `--test-threads=4` for the test binaries unless the user set it (the
/// namespace scenarios mostly wait on the network, so more than the cores).
fn integration_args(user: &[String]) -> Vec<String> {
    let (cargo_args, harness) = match user.iter().position(|a| a == "--") {
        Some(i) => (&user[..i], &user[i + 1..]),
        None => (user, &[][..]),
    };
    let mut args = cargo_args.to_vec();
    args.push("--".into());
    if !harness.iter().any(|a| a.starts_with("--test-threads")) {
        args.push("--test-threads=4".into());
    }
    args.extend_from_slice(harness);
    args
}

/// The network namespaces of the test rig (`lb…`) that exist now.
fn rig_namespaces() -> Vec<String> {
    output(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("lb"))
        .map(str::to_string)
        .collect()
}

/// The pid in a rig namespace name (`lb<pid in hex>-<n>-…`), whose test
/// process owns it.
fn owner_pid(ns: &str) -> Option<u32> {
    let hex = ns.strip_prefix("lb")?.split('-').next()?;
    u32::from_str_radix(hex, 16).ok()
}

/// Rig namespaces that nothing will remove: their test process is gone (or
/// the name is not the rig's). Namespaces of a test process that is still
/// running (another engineer's, at the same time) are not counted.
fn leaked(namespaces: Vec<String>, alive: impl Fn(u32) -> bool) -> Vec<String> {
    namespaces
        .into_iter()
        .filter(|ns| owner_pid(ns).is_none_or(|pid| !alive(pid)))
        .collect()
}

/// Removes what test processes that no longer exist left behind (a run
/// killed with SIGKILL never runs its Drop): their namespaces, and their
/// directories under /run/lb-tests with any bpffs mounted there. Without
/// this, one killed run would fail every later one.
fn sweep_leftovers() {
    for ns in leaked_namespaces() {
        println!("test: removing network namespace {ns} left by a test run that is gone");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    let Ok(entries) = fs::read_dir("/run/lb-tests") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Rig directories are named like their namespaces (`lb<hex pid>-…`),
        // fixture ones `unit-<decimal pid>-<n>`.
        let pid = match name.strip_prefix("unit-") {
            Some(rest) => rest.split('-').next().and_then(|p| p.parse::<u32>().ok()),
            None => owner_pid(&name),
        };
        if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        let path = entry.path();
        println!(
            "test: removing {} left by a test run that is gone",
            path.display()
        );
        // Unmount every bpffs below it, deepest first.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut targets: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|t| Path::new(t).starts_with(&path))
            .collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            let _ = Command::new("umount").args(["-l", t]).status();
        }
        let _ = fs::remove_dir_all(&path);
    }
}

fn leaked_namespaces() -> Vec<String> {
    leaked(rig_namespaces(), |pid| {
        Path::new(&format!("/proc/{pid}")).exists()
    })
}

fn vm_test(kernel: &str) -> Result<()> {
    require_root("`cargo xtask vm-test`", "")?;
    setup()?;
    let mut tally = Tally::default();
    let res = vm::vm_test(kernel, &mut tally);
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    res
}

fn test(no_integration: bool, vm: bool, args: &[String]) -> Result<()> {
    if !no_integration {
        // Fail before minutes of building, not after.
        require_root(
            "`cargo xtask test`",
            ", or `cargo xtask test --no-integration` for the unit tests alone",
        )?;
    }
    // The agent's build script compiles the eBPF object, so even the unit
    // tests need the BPF toolchain.
    setup()?;
    let mut tally = Tally::default();
    // --release: the same profile as `build`, so nothing compiles twice.
    // --no-fail-fast: one failing test file must not hide the others'
    // results (cargo stops at the first failing binary otherwise).
    let mut unit = cargo();
    unit.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--exclude",
        "lb-tests",
    ]);
    if no_integration {
        println!("test: unit tests (no root needed)");
        let res = run_tests(unit.args(args), &mut tally);
        println!("tests: {} passed, {} failed", tally.passed, tally.failed);
        return res;
    }
    build()?;
    sweep_leftovers();
    let before = rig_namespaces();
    println!("test: unit tests");
    let unit_res = run_tests(&mut unit, &mut tally);
    println!("test: privileged tests (BPF_PROG_TEST_RUN fixtures, namespace scenarios)");
    let priv_res = run_tests(
        cargo()
            .args(["test", "--release", "--no-fail-fast", "-p", "lb-tests"])
            .args(integration_args(args))
            .env("LB_AGENT_BIN", agent_bin()),
        &mut tally,
    );
    let vm_res = if vm {
        println!("test: tests in a VM on Debian's 6.1 kernel");
        vm::vm_test("debian-6.1", &mut tally)
    } else {
        println!("test: tests in a VM left out (--no-vm)");
        Ok(())
    };
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    let leaked = leaked_namespaces();
    let mut errors = Vec::new();
    if let Err(e) = unit_res {
        errors.push(format!("unit tests: {e:#}"));
    }
    if let Err(e) = priv_res {
        errors.push(format!("privileged tests: {e:#}"));
    }
    if let Err(e) = vm_res {
        errors.push(format!("tests in a VM: {e:#}"));
    }
    if !leaked.is_empty() {
        let old = leaked.iter().filter(|n| before.contains(n)).count();
        errors.push(format!(
            "{} network namespaces left behind ({old} of them already there before this run): {}; \
             remove each with `ip netns del NAME`",
            leaked.len(),
            leaked.join(" ")
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn integration_args_add_threads_after_the_separator() {
        assert_eq!(integration_args(&[]), strings(&["--", "--test-threads=4"]));
        assert_eq!(
            integration_args(&strings(&["nodeport"])),
            strings(&["nodeport", "--", "--test-threads=4"])
        );
        assert_eq!(
            integration_args(&strings(&["--test", "datapath", "--", "--nocapture"])),
            strings(&[
                "--test",
                "datapath",
                "--",
                "--test-threads=4",
                "--nocapture"
            ])
        );
        assert_eq!(
            integration_args(&strings(&["--", "--test-threads=1"])),
            strings(&["--", "--test-threads=1"])
        );
    }

    #[test]
    fn test_args_keep_a_second_separator() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--",
            "--test",
            "datapath",
            "--",
            "--nocapture",
        ]);
        let Ok(Cli {
            command:
                Task::Test {
                    no_integration,
                    no_vm,
                    args,
                },
        }) = cli
        else {
            panic!("`xtask test -- … -- …` does not parse");
        };
        assert!(!no_integration && !no_vm);
        assert_eq!(args, strings(&["--test", "datapath", "--", "--nocapture"]));
    }

    #[test]
    fn tally_sums_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 5 tests");
        assert_eq!((t.passed, t.failed), (15, 2));
    }

    #[test]
    fn rig_namespace_owner() {
        assert_eq!(owner_pid("lb44a0-5-pod-b0"), Some(0x44a0));
        assert_eq!(owner_pid("lb1f-0-maglev-client"), Some(0x1f));
        assert_eq!(owner_pid("lbx-node"), None);
    }

    #[test]
    fn namespaces_of_running_tests_are_not_leaks() {
        let names = strings(&["lb10-0-client", "lb20-1-node-a", "lbtest", "lb-x"]);
        assert_eq!(
            leaked(names, |pid| pid == 0x10),
            strings(&["lb20-1-node-a", "lbtest", "lb-x"])
        );
    }

    #[test]
    fn ldd_must_show_the_nightly_libllvm() {
        let dir = Path::new("/root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib");
        let good = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)";
        assert!(ldd_uses(good, dir, "22"));
        assert!(!ldd_uses(good, dir, "2"));
        assert!(!ldd_uses(good, Path::new("/usr/lib"), "22"));
        let debian = "\tlibLLVM-22.so.1 => /usr/lib/x86_64-linux-gnu/libLLVM-22.so.1 (0x1)";
        assert!(!ldd_uses(debian, dir, "22"));
        let missing = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found";
        assert!(!ldd_uses(missing, dir, "22"));
    }
}
