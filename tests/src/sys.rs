//! Low-level helpers: running commands, entering network namespaces, starting processes inside pods.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Runs a command to completion; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NETNS args...`
pub fn ip(netns: &str, args: &str) -> Result<()> {
    let mut full = vec!["-n", netns];
    full.extend(args.split_whitespace());
    run("ip", &full).map(|_| ())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Runs `f` on a thread inside network namespace `name`; sockets created there stay in it.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = File::open(netns_path(name)).with_context(|| format!("opening netns {name}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd for this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Where a process should run: a network namespace and a cgroup.
pub struct Placement<'a> {
    pub netns: &'a str,
    pub cgroup: &'a Path,
}

/// Makes `cmd`'s child join network namespace `netns` before exec; keep the returned file open until it is
/// spawned.
fn join_netns_before_exec(cmd: &mut Command, netns: &str) -> Result<File> {
    let ns = File::open(netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    let ns_fd = ns.as_raw_fd();
    // SAFETY: setns is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(ns)
}

/// Starts `cmd` inside `placement`. The child joins the cgroup and the netns before exec, so even its first
/// instruction runs in place.
pub fn spawn_in(placement: &Placement<'_>, cmd: &mut Command, log: &Path) -> Result<Child> {
    let procs = CString::new(placement.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    let log_file = File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if wrote != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Hooks run in order: the cgroup first, then the netns.
    let ns = join_netns_before_exec(cmd, placement.netns)?;
    let child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    drop(ns);
    Ok(child)
}

/// Minimal HTTP/1.1 GET (Connection: close) from inside a netns; returns status and body.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(netns, addr, "GET", path)
}

/// One bodiless HTTP/1.1 request from inside `netns`: status and body.
pub fn http_request(netns: &str, addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let (method, path) = (method.to_string(), path.to_string());
    in_netns(netns, move || -> Result<(u16, String)> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        exchange(s, &addr.to_string(), &method, &path)
    })?
}

/// An HTTP/1.1 request over the Unix socket at `socket`: status and body.
pub fn unix_http_request(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    let s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(s, "agent", method, path)
}

/// Writes a bodiless request on a fresh connection and reads the whole response (`Connection: close`).
fn exchange(mut s: impl Read + Write, host: &str, method: &str, path: &str) -> Result<(u16, String)> {
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_string()))
}

/// Whether `pid` is still running (an exited child that was not reaped yet is a zombie, not running).
pub fn pid_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(String::from)))
        .is_some_and(|state| state != "Z" && state != "X")
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `promtool check metrics` on `text`: whether it passed, and what it said. promtool (Debian package
/// `prometheus`) is a prerequisite that `cargo xtask test` installs.
pub fn promtool_check(text: &str) -> Result<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (apt-get install prometheus, or `cargo xtask setup`)")?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), said))
}

/// Runs `cmd` to completion inside network namespace `netns`; its exit status and output.
pub fn output_in_netns(netns: &str, cmd: &mut Command) -> Result<std::process::Output> {
    let ns = join_netns_before_exec(cmd, netns)?;
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    drop(ns);
    Ok(out)
}
