//! `cargo xtask`: set-up, build, demo and tests of the lb load balancer.
//!
//! Every command runs `setup` first, which installs what a fresh machine of
//! this kind lacks and does nothing when all is present.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

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
    /// Run every test: unit tests, BPF_PROG_TEST_RUN tests and the
    /// namespace scenarios (as root).
    Test {
        /// Run only the tests that need neither root nor the kernel.
        #[arg(long)]
        no_integration: bool,
        /// Extra arguments for the integration test binaries (a filter, …).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (not yet implemented).
    Bench,
    /// Tests in a VM on another kernel (not yet implemented).
    VmTest,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Task::Setup => setup(),
        Task::Build => setup().and_then(|()| build()),
        Task::Demo => setup().and_then(|()| build()).and_then(|()| demo()),
        Task::Test {
            no_integration,
            args,
        } => test(no_integration, &args),
        Task::Bench => Err(anyhow::anyhow!(
            "`cargo xtask bench` is not implemented yet (issue 7)"
        )),
        Task::VmTest => Err(anyhow::anyhow!(
            "`cargo xtask vm-test` is not implemented yet (issue 8)"
        )),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs a command in the workspace root, failing with its name on error.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` if it cannot run or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn step(name: &str, what: &str) {
    println!("setup: {name:<12} {what}");
}

fn setup() -> Result<()> {
    setup_packages()?;
    setup_rust_src()?;
    setup_bpf_linker()?;
    setup_bpffs()
}

/// Tools the tests and the rig call, by the Debian package that has them.
const PACKAGES: [(&str, &str); 4] = [
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("tcpdump", "tcpdump"),
];

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn setup_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step("packages", "ok");
        return Ok(());
    }
    if !is_root() {
        bail!("packages {missing:?} are missing and installing them needs root: run as root");
    }
    step("packages", &format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn setup_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("no nightly toolchain: the eBPF programs need one (`rustup toolchain list`)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src", "ok");
        return Ok(());
    }
    step("rust-src", "installing for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// What the bpf-linker build depends on: the nightly's commit and LLVM.
fn nightly_fingerprint() -> Result<(String, String, PathBuf)> {
    let vv =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let field = |key: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no `{key}` in rustc +nightly -vV"))
    };
    let stamp = format!("{}\n{}\n", field("commit-hash:")?, field("LLVM version:")?);
    let major = field("LLVM version:")?
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("nightly sysroot")?;
    Ok((stamp, major, PathBuf::from(sysroot.trim())))
}

fn cache_dir() -> PathBuf {
    env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/lb-xtask")
}

/// Whether the installed bpf-linker runs and loads the nightly's own libLLVM.
fn linker_matches(sysroot: &Path, major: &str) -> bool {
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        return false;
    }
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    let Some(ldd) = output(Command::new("ldd").arg(path.trim())) else {
        return false;
    };
    let lib = sysroot.join("lib");
    ldd.lines().any(|l| {
        l.contains("libLLVM")
            && l.contains(&*lib.to_string_lossy())
            && l.contains(&format!("libLLVM.so.{major}"))
    }) || ldd
        .lines()
        .any(|l| l.contains(&format!("libLLVM-{major}")) && l.contains(&*lib.to_string_lossy()))
}

fn setup_bpf_linker() -> Result<()> {
    let (fingerprint, major, sysroot) = nightly_fingerprint()?;
    let cache = cache_dir();
    let stamp = cache.join("bpf-linker.stamp");
    let stamped = fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint);
    if stamped && output(Command::new("bpf-linker").arg("--version")).is_some() {
        step("bpf-linker", "ok");
        return Ok(());
    }
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    if linker_matches(&sysroot, &major) {
        step("bpf-linker", "ok (links the nightly's LLVM; stamped)");
        return fs::write(&stamp, fingerprint).context("write bpf-linker stamp");
    }
    step(
        "bpf-linker",
        &format!("building against the nightly's LLVM {major} (about a minute)"),
    );
    // bpf-linker must use the LLVM of the rustc that emits the bitcode.
    // Debian has no matching LLVM, so link it to the nightly's own libLLVM.
    let llvm = cache.join("llvm");
    let llvm_lib = llvm.join("lib");
    fs::create_dir_all(&llvm_lib).context("create LLVM prefix")?;
    let libdir = sysroot.join("lib");
    let so = fs::read_dir(&libdir)
        .with_context(|| format!("read {}", libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM"))
        })
        .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
    let link = llvm_lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&so, &link).context("link libLLVM")?;
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &llvm)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", libdir.display()),
        ))?;
    fs::write(&stamp, fingerprint).context("write bpf-linker stamp")
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
            "not mounted on /sys/fs/bpf (needs root; the agent mounts its own)",
        );
        return Ok(());
    }
    step("bpffs", "mounting on /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn agent_bin() -> PathBuf {
    root().join("target/release/lb-agent")
}

fn build() -> Result<()> {
    println!("build: lb-agent (builds and embeds the eBPF object)");
    run(cargo().args(["build", "--release", "-p", "lb-agent"]))?;
    println!("build: test binaries");
    run(cargo().args(["build", "--release", "-p", "lb-tests", "--tests", "--bins"]))?;
    println!("build: {}", agent_bin().display());
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} loads BPF programs and makes network namespaces: run it as root");
    }
    Ok(())
}

fn demo() -> Result<()> {
    require_root("the demo")?;
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

/// Runs `cargo test`, echoing its output, and closes with one line that
/// totals every binary's "test result" (cargo's own last line is that of the
/// last doc-test binary, which usually has nothing to run).
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("read test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().with_context(|| format!("wait for {shown}"))?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Network namespaces of this project's rig (prefix `lb`) that exist now.
fn rig_namespaces() -> Vec<String> {
    output(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("lb"))
        .map(str::to_string)
        .collect()
}

fn test(no_integration: bool, args: &[String]) -> Result<()> {
    // The agent's build script compiles the eBPF object, so even unit tests
    // need the BPF toolchain.
    setup()?;
    if no_integration {
        println!("test: unit tests only (no root needed)");
        return run_tests(cargo().args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "lb-tests",
        ]));
    }
    require_root("`cargo xtask test`")?;
    build()?;
    let before = rig_namespaces();
    println!("test: unit, BPF_PROG_TEST_RUN and namespace tests");
    // Namespace tests mostly wait on the network: more threads than cores.
    let res = run_tests(
        cargo()
            .args([
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--",
                "--test-threads=4",
            ])
            .args(args)
            .env("LB_AGENT_BIN", agent_bin()),
    );
    let left: Vec<String> = rig_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    res?;
    if !left.is_empty() {
        bail!("tests left network namespaces behind: {left:?}");
    }
    Ok(())
}
