//! Port forwards from this machine's loopback into the demo's network namespaces, so the agents' admin APIs,
//! their metrics and Bookinfo's product page can be reached with a plain `curl` or a browser (what
//! `kubectl port-forward` does on a real cluster).

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context, Result};

/// Listens on `listen` here (port 0, or when taken, any free port) and forwards each connection to `target` as
/// seen from inside network namespace `netns`. Returns the address it listens on. The forwarding threads live
/// as long as the process.
pub fn start(listen: SocketAddr, netns: &str, target: SocketAddr) -> Result<SocketAddr> {
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            TcpListener::bind(SocketAddr::new(listen.ip(), 0)).context("binding a port forward")?
        }
        Err(e) => return Err(e).with_context(|| format!("binding {listen}")),
    };
    let local = listener.local_addr()?;
    let ns = File::open(crate::sys::netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    std::thread::Builder::new().name(format!("forward-{}", local.port())).spawn(move || {
        // The listener was made (and stays) out here; connections to the target are made in there. Threads
        // this one starts inherit the namespace.
        // SAFETY: setns on a namespace fd, for this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!("port forward {local}: setns: {}", std::io::Error::last_os_error());
            return;
        }
        for inbound in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    splice(inbound, outbound);
                }
            });
        }
    })?;
    Ok(local)
}

/// Copies both ways until both sides have finished sending.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let upstream = std::thread::spawn(move || copy(a, b2));
    copy(b, a2);
    let _ = upstream.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
