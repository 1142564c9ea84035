//! Log output and its levels, changeable while the agent runs (admin API `/logging`), the way Envoy's and
//! ztunnel's admin APIs allow: turning on debug for one module while a problem is live is worth a lot.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

struct Levels {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static LEVELS: OnceLock<Levels> = OnceLock::new();

/// Installs the subscriber: `RUST_LOG` directives, `info` by default.
pub fn init() {
    let directives = std::env::var("RUST_LOG").ok().filter(|d| EnvFilter::try_new(d).is_ok()).unwrap_or("info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&directives));
    // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
    let output = tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if tracing_subscriber::registry().with(filter).with(output).try_init().is_ok() {
        let _ = LEVELS.set(Levels { handle, current: Mutex::new(directives) });
    }
}

/// The directives in force (`RUST_LOG` syntax).
pub fn current() -> Option<String> {
    LEVELS.get().map(|l| l.current.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Replaces the directives (`debug`, `info,mesh_agent::l7=trace`). A bad directive changes nothing.
pub fn set(directives: &str) -> Result<(), String> {
    let levels = LEVELS.get().ok_or("logging is not initialised")?;
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
    levels.handle.reload(filter).map_err(|e| e.to_string())?;
    *levels.current.lock().unwrap_or_else(|p| p.into_inner()) = directives.to_string();
    tracing::info!(levels = directives, "log levels changed");
    Ok(())
}
