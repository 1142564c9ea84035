//! Project tasks: `cargo xtask demo | test | bench | fuzz | setup | gen-manifests | build-ebpf`.
//!
//! `demo` builds everything and runs Bookinfo on a two-node mesh on this machine (`mesh-demo`). `test` is what CI
//! runs (`.ci/run`): it installs what a fresh Debian machine lacks (when run as root), then runs formatting,
//! clippy, every unit and end-to-end test, and the demo's non-interactive walk-through.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    // eBPF toolchain: Debian's rustc with a precompiled `core` for bpfel, and the LLVM bpf-linker links against.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    // Network namespaces and policy routing in tests and in enrolled pods.
    "iproute2",
    // protoc, for the gRPC API between controller and agents (tonic-prost-build).
    "protobuf-compiler",
    // promtool, which checks the agents' and the controller's metrics in the observability tests.
    "prometheus",
    // libcni (Go), which the CNI tests drive nodemesh-cni through as containerd does, after the real bridge and
    // host-local plugins.
    "golang-go",
    "golang-github-appc-cni-dev",
    "containernetworking-plugins",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("demo") => demo(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("control-plane") => bench_control_plane(),
        Some("bench") => bench(),
        Some("fuzz") => fuzz(&args[1..]),
        Some("gen-manifests") => gen_manifests(),
        Some("build-ebpf") => step("build the agent with its eBPF object", cargo(&["build", "-p", "mesh-agent"])),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  demo [--smoke]  Bookinfo on a two-node mesh on this machine (root); --smoke: walk through once and exit\n  \
                 setup        install missing build and test prerequisites (Debian, as root)\n  \
                 test         setup, then fmt --check, clippy -D warnings, build, all tests\n  \
                 gen-manifests  CRDs from the Rust types (manifests/crds, the chart's crds/), manifests/base from the chart\n  \
                 bench        direct vs plaintext-via-agents vs mTLS-via-agents; JSON in target/bench/\n  \
                 bench control-plane  1000 simulated agents, 10000 pods: change propagation, bytes, CPU, memory\n  \
                 fuzz [TARGET...] [--seconds N]  each fuzz target (default all) N seconds (600), growing fuzz/corpus\n  \
                 build-ebpf   build mesh-agent and the eBPF object it embeds"
            );
            std::process::exit(2);
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace());
    // `cargo run` gave this process the variables of the xtask package; passed on, build scripts that watch
    // them (ring's watches CARGO_MANIFEST_DIR) would see a change and rebuild half the tree after a plain
    // `cargo build`, and again after.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_package = key.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key.as_ref());
        if per_package {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// Runs one step, printing what it is and how long it took.
fn step(what: &str, mut cmd: Command) -> Result<()> {
    eprintln!("==> {what}");
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    eprintln!(
        "    {what}: {} in {:.1}s",
        if status.success() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    dirs.push(home.join("bin"));
    dirs.into_iter().map(|d| d.join("bpf-linker")).find(|p| p.is_file())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
            bail!("missing Debian packages {missing:?}; install them (as root: apt-get install {})", missing.join(" "));
        }
        let mut update = Command::new("apt-get");
        update.arg("update").arg("-qq");
        step("apt-get update", update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        step(&format!("apt-get install {}", missing.join(" ")), install)?;
    }
    if bpf_linker().is_none() {
        let mut install =
            cargo(&["install", "--locked", "bpf-linker", "--no-default-features", "--features", "llvm-22"]);
        install.env("LLVM_PREFIX", LLVM_PREFIX);
        step("cargo install bpf-linker (LLVM 22)", install)?;
    }
    if is_root() && !is_bpffs_mounted() {
        std::fs::create_dir_all("/sys/fs/bpf")?;
        let mut mount = Command::new("mount");
        mount.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
        step("mount bpffs at /sys/fs/bpf", mount)?;
    }
    if !venv_python().is_file() {
        let venv = workspace().join("target/venv");
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv);
        step("python3 -m venv target/venv", create)?;
    }
    let mut pip = Command::new(venv_python());
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PYTHON_PACKAGES);
    if !python_packages_installed() {
        step(&format!("pip install {} (into target/venv)", PYTHON_PACKAGES.join(" ")), pip)?;
    }
    eprintln!("==> prerequisites in place");
    Ok(())
}

/// From PyPI, pinned: a real Helm engine (Helm v4's Go SDK as a library; Debian has no helm) for the chart's
/// render and lint tests and for rendering the kustomize base; checkov, the policy linter the install is held to.
const PYTHON_PACKAGES: &[&str] = &["helm-python-sdk==0.2.2", "checkov==3.3.30"];

/// The venv's interpreter (`NODEMESH_VENV` overrides the venv's place), which the chart tests use too.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("NODEMESH_VENV").map_or_else(|| workspace().join("target/venv"), PathBuf::from);
    venv.join("bin/python")
}

fn python_packages_installed() -> bool {
    let mut freeze = Command::new(venv_python());
    freeze.args(["-m", "pip", "freeze", "--disable-pip-version-check"]);
    let listed = freeze.output().map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase()).unwrap_or_default();
    PYTHON_PACKAGES.iter().all(|p| listed.lines().any(|l| l == p.to_lowercase()))
}

/// The generated install files: the CRDs from the Rust types, into the kustomize install and the chart; the
/// kustomize base rendered from the chart with its default values (the chart is the one source of both).
fn gen_manifests() -> Result<()> {
    for dir in ["manifests/crds", "charts/nodemesh/crds"] {
        step(
            &format!("write {dir} from the CRD types"),
            cargo(&["run", "--quiet", "-p", "mesh-controller", "--bin", "mesh-controller", "--", "crds", dir]),
        )?;
    }
    setup()?;
    let mut render = Command::new(venv_python());
    render.arg("xtask/helm.py").args(["kustomize-base", "charts/nodemesh", "nodemesh-system", "manifests/base"]);
    render.current_dir(workspace());
    step("render manifests/base from charts/nodemesh", render)
}

fn is_bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf ")))
        .unwrap_or(false)
}

/// Builds what the demo needs, then becomes `mesh-demo` (so Ctrl-C reaches it directly and it cleans up).
fn demo(args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        bail!("the demo creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    setup()?;
    step(
        "cargo build --bins (agent with its eBPF programs, CNI plugin, controller, meshctl, Bookinfo)",
        cargo(&["build", "--bins", "--locked"]),
    )?;
    let mut run = Command::new(workspace().join("target/debug/mesh-demo"));
    run.args(args).current_dir(workspace());
    Err(run.exec()).context("starting target/debug/mesh-demo")
}

fn bench() -> Result<()> {
    setup()?;
    step("cargo build --release --bins", cargo(&["build", "--release", "--bins", "--locked"]))?;
    let mut run = Command::new(workspace().join("target/release/mesh-bench"));
    run.current_dir(workspace()).env("NODEMESH_BENCH_DIR", workspace().join("target/bench"));
    step("mesh-bench", run)
}

fn bench_control_plane() -> Result<()> {
    setup()?;
    step("cargo build --release --bins", cargo(&["build", "--release", "--bins", "--locked"]))?;
    let mut run = Command::new(workspace().join("target/release/mesh-cp-bench"));
    run.current_dir(workspace()).env("NODEMESH_BENCH_DIR", workspace().join("target/bench"));
    step("mesh-cp-bench", run)
}

/// The fuzz targets in fuzz/fuzz_targets/.
const FUZZ_TARGETS: &[&str] =
    &["hbone_connect", "detect_http1", "cni_request", "node_config", "mesh_objects", "trace_context"];

/// Runs fuzz targets with cargo-fuzz (libFuzzer, AddressSanitizer) for `--seconds` each (default 600: ten CPU
/// minutes), as many at once as there are CPUs, each growing its corpus in fuzz/corpus/. A crash stops with the
/// reproducer under fuzz/artifacts/. Not part of `cargo xtask test`.
fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = 600u64;
    let mut targets: Vec<String> = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => seconds = rest.next().context("--seconds needs a number")?.parse()?,
            t if FUZZ_TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz target {other:?}; targets: {}", FUZZ_TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.iter().map(|t| t.to_string()).collect();
    }
    if !Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success()) {
        step("cargo install cargo-fuzz", cargo(&["install", "--locked", "cargo-fuzz"]))?;
    }
    // The fuzz targets never load eBPF: an empty object stands in, so the build needs no eBPF toolchain and
    // the sanitizer flags never reach the BPF build.
    let placeholder = workspace().join("target/fuzz-ebpf-placeholder.o");
    std::fs::create_dir_all(workspace().join("target"))?;
    std::fs::write(&placeholder, b"")?;
    // libFuzzer's instrumentation needs nightly flags: a rustup nightly if there is one, else the stable compiler
    // told to accept them.
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let fuzz_cmd = |sub: &str, target: Option<&str>| {
        // rustup's `cargo`, which understands `+nightly` (the `CARGO` this task was started with does not).
        let mut cmd = Command::new("cargo");
        cmd.current_dir(workspace());
        for inherited in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_MANIFEST_DIR", "CARGO_PKG_NAME"] {
            cmd.env_remove(inherited);
        }
        if nightly {
            cmd.arg("+nightly");
        } else {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd.args(["fuzz", sub]).args(target).env("NODEMESH_EBPF_OBJECT", &placeholder);
        cmd
    };
    step("cargo fuzz build", fuzz_cmd("build", None))?;
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut running: Vec<(String, std::process::Child)> = Vec::new();
    let mut failed = Vec::new();
    let mut queue = targets.into_iter();
    loop {
        while running.len() < parallel {
            let Some(target) = queue.next() else { break };
            eprintln!("==> fuzzing {target} for {seconds} s");
            let mut cmd = fuzz_cmd("run", Some(&target));
            cmd.args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=4096", "-print_final_stats=1"]);
            running.push((target, cmd.spawn().context("starting cargo fuzz run")?));
        }
        if running.is_empty() {
            break;
        }
        let (target, mut child) = running.remove(0);
        let status = child.wait()?;
        eprintln!("    {target}: {}", if status.success() { "no crash" } else { "FAILED (see fuzz/artifacts/)" });
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    let start = Instant::now();
    setup()?;
    step("cargo fmt --check", cargo(&["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings", cargo(&["clippy", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    // The end-to-end tests start these binaries; build them before the tests run.
    step("cargo build --bins", cargo(&["build", "--bins", "--locked"]))?;
    let mut test = cargo(&["test", "--locked", "--no-fail-fast"]);
    if !extra.is_empty() {
        test.arg("--").args(extra);
    }
    let mut totals = run_tests(test)?;
    // The demo's walk-through counts as one more end-to-end test.
    let mut demo = Command::new(workspace().join("target/debug/mesh-demo"));
    demo.arg("--smoke").current_dir(workspace());
    match step("cargo xtask demo --smoke (the README's walk-through, checked step by step)", demo) {
        Ok(()) => totals.passed += 1,
        Err(e) => {
            eprintln!("{e:#}");
            totals.failed += 1;
        }
    }
    // One plain closing line over all test binaries and the demo, so CI sees the real count.
    println!("nodemesh: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.success {
        bail!("tests failed");
    }
    if totals.passed <= 1 {
        bail!("no test ran");
    }
    eprintln!("==> all checks passed in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs `cargo test`, echoing its output and adding up the `test result:` lines of every test binary.
fn run_tests(mut cmd: Command) -> Result<Totals> {
    use std::io::{BufRead, BufReader};
    eprintln!("==> cargo test (unit and end-to-end)");
    let start = Instant::now();
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting cargo test")?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(label)?.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            totals.passed += count(" passed");
            totals.failed += count(" failed");
        }
    }
    totals.success = child.wait()?.success();
    eprintln!(
        "    cargo test: {} in {:.1}s",
        if totals.success { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    Ok(totals)
}
