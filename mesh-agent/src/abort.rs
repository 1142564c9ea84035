//! Ending a connection as a failure the peer can see. A proxied connection has two ends; when one of them fails
//! (the application refused or reset, a tunnel stream was reset), closing the other end cleanly would tell its
//! peer that everything arrived — a truncated response would pass for a complete one, and a refusal would look
//! like an empty answer. Every stream the copy loop handles can therefore be aborted: TCP with a RST, an HBONE
//! stream with RST_STREAM.

use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

pub trait Abort {
    /// Tears the connection down so the peer sees an error, not an end of stream.
    fn abort(self);
}

impl Abort for TcpStream {
    /// A zero linger makes `close()` send RST and drop unsent data.
    fn abort(self) {
        let _ = SockRef::from(&self).set_linger(Some(Duration::ZERO));
        drop(self);
    }
}
