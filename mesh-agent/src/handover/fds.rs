//! Messages with file descriptors attached (`SCM_RIGHTS`) over a Unix `SOCK_SEQPACKET` socket: how a running
//! agent gives its listening sockets to the agent replacing it. Seqpacket keeps each message whole (a message and
//! its descriptors arrive together or not at all), so the protocol above needs no framing of its own.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// Descriptors per message: below the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS: usize = 200;
/// Largest message body accepted; a list of [`MAX_FDS`] listeners is far smaller.
const MAX_MESSAGE: usize = 64 * 1024;

/// One end of a connection between two agents.
pub struct Channel(Socket);

/// Where a running agent waits for its successor.
pub struct Listener(Socket);

impl Listener {
    /// Listens at `path` (replacing a socket file left there), reachable by root only.
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket.listen(1)?;
        Ok(Listener(socket))
    }

    pub fn accept(&self) -> io::Result<Channel> {
        let (socket, _) = self.0.accept()?;
        Ok(Channel(socket))
    }
}

impl Channel {
    /// Connects to an agent listening at `path`; `None` when none does (no socket file, or nobody behind it).
    pub fn connect(path: &Path) -> io::Result<Option<Self>> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        match socket.connect(&SockAddr::unix(path)?) {
            Ok(()) => Ok(Some(Channel(socket))),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bounds every later `recv` (`None`: wait for ever).
    pub fn set_recv_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)
    }

    /// Sends `body` with `fds` attached (at most [`MAX_FDS`]).
    pub fn send(&self, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || body.len() > MAX_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "message or descriptor list too large"));
        }
        let mut control = vec![0u8; control_space(fds.len())];
        let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() };
        // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            // SAFETY: the control buffer has room for one header and `fds.len()` descriptors (control_space).
            unsafe {
                let header = libc::CMSG_FIRSTHDR(&msg);
                (*header).cmsg_level = libc::SOL_SOCKET;
                (*header).cmsg_type = libc::SCM_RIGHTS;
                (*header).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        // SAFETY: a valid socket and a fully initialised msghdr.
        let sent = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next message and the descriptors that came with it (owned: closed when dropped). End of stream is
    /// `UnexpectedEof`; a message cut short (too long, too many descriptors) is an error and its descriptors
    /// are closed.
    pub fn recv(&self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut body = vec![0u8; MAX_MESSAGE];
        let mut control = vec![0u8; control_space(MAX_FDS)];
        let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
        // SAFETY: as in `send`.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: buffers live across the call; CLOEXEC so received descriptors never leak into children.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let fds = received_fds(&msg);
        if n == 0 && fds.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent closed the connection"));
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message truncated"));
        }
        body.truncate(n as usize);
        Ok((body, fds))
    }
}

fn control_space(fds: usize) -> usize {
    // SAFETY: arithmetic only.
    unsafe { libc::CMSG_SPACE((fds.max(1) * size_of::<RawFd>()) as u32) as usize }
}

/// Takes ownership of every descriptor in `msg`'s `SCM_RIGHTS` headers.
fn received_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walks the control buffer the kernel filled, by the CMSG_* rules; each descriptor in an
    // SCM_RIGHTS header is new in this process and owned by nobody else.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(msg, header);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use super::*;

    fn socket_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nodemesh-fds-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn a_listening_socket_passed_over_keeps_its_queued_connection() {
        let path = socket_path("queued");
        let listener = Listener::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        // A client connects before the handover: its connection waits in the listener's queue.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let successor = std::thread::spawn(move || Channel::connect(&path).unwrap().unwrap().recv().unwrap());
        let predecessor = listener.accept().unwrap();
        predecessor.send(b"listeners", &[tcp.as_fd()]).unwrap();
        let (body, mut fds) = successor.join().unwrap();
        drop(tcp);
        assert_eq!(body, b"listeners");
        assert_eq!(fds.len(), 1);
        let inherited = std::net::TcpListener::from(fds.remove(0));
        assert_eq!(inherited.local_addr().unwrap(), addr);
        let (mut server, _) = inherited.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let _ = std::fs::remove_file(socket_path("queued"));
    }

    #[test]
    fn no_agent_behind_the_path_is_none_and_a_closed_peer_is_eof() {
        let path = socket_path("eof");
        let _ = std::fs::remove_file(&path);
        assert!(Channel::connect(&path).unwrap().is_none());
        let listener = Listener::bind(&path).unwrap();
        let client = Channel::connect(&path).unwrap().unwrap();
        drop(listener.accept().unwrap());
        assert_eq!(client.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        drop(listener);
        // The socket file is still there, nobody listens behind it.
        assert!(Channel::connect(&path).unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let path = socket_path("many");
        let listener = Listener::bind(&path).unwrap();
        let client = Channel::connect(&path).unwrap().unwrap();
        let _server = listener.accept().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let many = vec![tcp.as_fd(); MAX_FDS + 1];
        assert_eq!(client.send(b"x", &many).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        std::fs::remove_file(&path).unwrap();
    }
}
