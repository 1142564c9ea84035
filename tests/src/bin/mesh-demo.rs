//! `cargo xtask demo [--smoke]`: Bookinfo on a two-node nodemesh cluster on this machine (see
//! `mesh_tests::demo`). Needs root. Exit status 0 only when every step of the walk-through behaved.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use mesh_tests::demo::{self, Options};

/// Set by Ctrl-C (or SIGTERM): the demo stops at the next step and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => false,
        ["--smoke"] => true,
        _ => {
            eprintln!(
                "usage: mesh-demo [--smoke]\n\n  Bookinfo on a two-node nodemesh cluster of network namespaces; needs root.\n  \
                 --smoke  walk through once, non-interactively; exit 0 only if every step behaved"
            );
            return ExitCode::from(2);
        }
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match demo::run(&Options { smoke }, &STOP) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
