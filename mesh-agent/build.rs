//! Builds `mesh-ebpf` for `bpfel-unknown-none` and hands the object to the agent (`include_bytes_aligned!`).
//!
//! Two toolchains work, both with `bpf-linker` on PATH or in ~/.cargo/bin:
//! * Debian's `rustc-web` + `libstd-rust-web-dev-bpf` (precompiled `core` for bpfel; needs RUSTC_BOOTSTRAP=1
//!   because aya-ebpf uses an unstable feature) — what `cargo xtask setup` installs;
//! * a rustup nightly with `rust-src` (`-Z build-std=core`), the usual aya route.
//!
//! `NODEMESH_EBPF_OBJECT=/path/to/object` skips the build and embeds that file instead.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_STD: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const INSTALL_HINT: &str = "run `cargo xtask setup` (as root on Debian), or install by hand:\n  \
     apt-get install rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev\n  \
     LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22\n\
     or, with rustup: rustup toolchain install nightly --component rust-src && cargo install bpf-linker";

fn main() {
    println!("cargo:rerun-if-env-changed=NODEMESH_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");

    if let Some(prebuilt) = env::var_os("NODEMESH_EBPF_OBJECT") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        std::fs::copy(&prebuilt, &out)
            .unwrap_or_else(|e| fail(&format!("cannot copy NODEMESH_EBPF_OBJECT {}: {e}", prebuilt.display())));
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("mesh-agent lives in the workspace").to_path_buf();
    for input in ["mesh-ebpf/src", "mesh-ebpf/Cargo.toml", "mesh-common/src", "mesh-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    // A separate target dir: the outer cargo holds the lock on its own.
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target")).join("bpf");

    let linker_dir = find_bpf_linker().unwrap_or_else(|| fail("bpf-linker not found on PATH or in ~/.cargo/bin"));
    let path =
        env::join_paths(std::iter::once(linker_dir).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())))
            .expect("PATH entries are valid");

    let mut cmd = toolchain_command().unwrap_or_else(|| {
        fail("no toolchain that can build for bpfel-unknown-none (Debian rustc-web + libstd-rust-web-dev-bpf, or nightly + rust-src)")
    });
    // The outer build's compiler settings must not leak into the BPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(key);
        }
    }
    if cmd.get_program() == DEBIAN_CARGO {
        cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.current_dir(&workspace)
        .env("PATH", path)
        .args(["build", "--package", "mesh-ebpf", "--release", "--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| fail(&format!("cannot run {:?}: {e}", cmd.get_program())));
    if !status.success() {
        fail(&format!("building mesh-ebpf failed ({status}); see the compiler output above"));
    }
    let object = target_dir.join("bpfel-unknown-none/release/mesh-ebpf");
    std::fs::copy(&object, &out).unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", object.display())));
}

fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) =
        env::var_os("CARGO_HOME").or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into()))
    {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.into_iter().find(|d| d.join("bpf-linker").is_file())
}

/// Debian's toolchain first (it needs nothing from outside the registries), then rustup nightly with rust-src.
fn toolchain_command() -> Option<Command> {
    if Path::new(DEBIAN_CARGO).is_file() && Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_BPF_STD).is_dir() {
        return Some(Command::new(DEBIAN_CARGO));
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output().ok()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout).ok()?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/Cargo.lock").is_file() {
        return None;
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "-Z", "build-std=core"]);
    Some(cmd)
}

fn fail(what: &str) -> ! {
    panic!("\n\nmesh-agent embeds its eBPF programs and cannot build them: {what}.\nTo fix: {INSTALL_HINT}\n\n");
}
