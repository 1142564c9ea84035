//! Notices a TLS alert from the peer under the HTTP/2 connection. With TLS 1.3 the client's handshake is done
//! before the server has checked the client's certificate, so a server that refuses it says so with an alert on
//! the client's first read — which h2 reports as a bare I/O error of its own, with the rustls error gone. The
//! flag keeps what happened, so the failure is counted and logged as TLS (the certificate), not HTTP/2.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io`, raising `alerted` when a read fails with the peer's alert.
pub struct AlertWatch<T> {
    io: T,
    alerted: Arc<AtomicBool>,
}

impl<T> AlertWatch<T> {
    pub fn new(io: T) -> (Self, Arc<AtomicBool>) {
        let alerted = Arc::new(AtomicBool::new(false));
        (AlertWatch { io, alerted: alerted.clone() }, alerted)
    }
}

fn is_alert(e: &io::Error) -> bool {
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(tls, Some(rustls::Error::AlertReceived(_)))
}

impl<T: AsyncRead + Unpin> AsyncRead for AlertWatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &poll
            && is_alert(e)
        {
            self.alerted.store(true, Ordering::Release);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AlertWatch<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A reader failing with the given error once.
    struct Failing(Option<io::Error>);

    impl AsyncRead for Failing {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(self.0.take().map_or(Ok(()), Err))
        }
    }

    #[tokio::test]
    async fn only_the_peers_alert_raises_the_flag() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        let (mut watched, alerted) = AlertWatch::new(Failing(Some(io::Error::new(io::ErrorKind::InvalidData, alert))));
        assert!(watched.read(&mut [0u8; 8]).await.is_err());
        assert!(alerted.load(Ordering::Acquire));

        let (mut watched, alerted) = AlertWatch::new(Failing(Some(io::ErrorKind::ConnectionReset.into())));
        assert!(watched.read(&mut [0u8; 8]).await.is_err());
        assert!(!alerted.load(Ordering::Acquire));
    }
}
