//! Builds the eBPF object (lb-ebpf) with the nightly toolchain for the BPF
//! target and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! This does what aya-build does, but keeps the inner cargo quiet on success
//! (aya-build re-prints every line of it as a warning) and prints all of it on
//! failure.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .parent()
        .expect("lb-agent lives in the workspace")
        .to_path_buf();
    for dir in ["lb-ebpf", "lb-common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    // A prebuilt object (for example from a VM image build) skips the build.
    if let Some(obj) = env::var_os("LB_EBPF_OBJECT") {
        std::fs::copy(&obj, out_dir.join("lb-ebpf")).expect("copy LB_EBPF_OBJECT");
        return;
    }
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--quiet",
            "--package",
            "lb-ebpf",
        ])
        .args([
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
                // Lets LLVM expand memset/memcpy into stores. With the
                // in-order expansion bpf-linker asks for by default, every
                // memset (even of 3 bytes) is a call to a BPF subprogram,
                // which costs a stack frame that 6.1's verifier counts
                // against the 512 bytes (README, Requirements).
                "-Clink-arg=--disable-expand-memcpy-in-order",
            ]
            .join("\x1f"),
        );
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo`: {e}; run `cargo xtask setup` first")
    });
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        panic!("building lb-ebpf failed; `cargo xtask setup` installs the BPF toolchain");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&obj, out_dir.join("lb-ebpf"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
