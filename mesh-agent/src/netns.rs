//! Network namespaces: opening a pod's netns, its cookie, and creating sockets inside it.
//!
//! The agent runs in the node's netns and creates its per-pod sockets inside the pod's netns, so that listeners
//! are private to the pod and upstream connections carry the pod's own source address.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `SO_NETNS_COOKIE` (Linux 5.14+): the same cookie `bpf_get_netns_cookie` returns in the kernel.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl NetNs {
    /// Opens the namespace at `path` (`/var/run/netns/x`, `/proc/PID/ns/net`, ...).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open netns {}: {e}", path.display())))?;
        let mut ns = NetNs { file, path, cookie: 0 };
        ns.cookie = ns.run(|| {
            let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
            netns_cookie(probe.as_raw_fd())
        })??;
        Ok(ns)
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on the calling thread while it is inside this namespace, then switches back.
    ///
    /// Meant for short, non-blocking work such as creating a socket: sockets keep the namespace they were
    /// created in. If switching back fails the thread would go on creating sockets in the wrong namespace, so
    /// the process aborts; that cannot happen short of the kernel refusing our own namespace fd.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home_netns()?;
        setns(self.file.as_fd())?;
        let result = f();
        if let Err(e) = setns(home.as_fd()) {
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        Ok(result)
    }

    /// Runs `f` on a fresh thread that lives inside this namespace, for blocking work (sysctls, `ip`).
    /// Child processes started from that thread inherit the namespace.
    pub fn run_on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns = self.file.try_clone()?;
        std::thread::spawn(move || {
            setns(ns.as_fd())?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns worker thread panicked"))?
    }
}

/// The agent's own namespace, opened once: every upstream connection switches into a pod and back.
/// Threads of the agent only ever leave it inside [`NetNs::run`], so the first caller sees the right one.
fn home_netns() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let home = File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| home))
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the network namespace a socket belongs to.
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the output buffer is a u64 and its length is passed along.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_cookie() {
        let a = NetNs::current().unwrap();
        let b = NetNs::current().unwrap();
        assert_ne!(a.cookie(), 0);
        assert_eq!(a.cookie(), b.cookie());
        let inside = a.run(|| NetNs::current().map(|n| n.cookie())).unwrap().unwrap();
        assert_eq!(inside, a.cookie());
    }
}
