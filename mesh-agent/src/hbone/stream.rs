//! An HTTP/2 stream as a byte stream (AsyncRead + AsyncWrite), so tunnelled connections use the same copy loop
//! as plain TCP. Flow-control capacity is released as the reader consumes data, so a slow application slows the
//! sender instead of growing buffers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 in one write.
const MAX_WRITE: usize = 256 * 1024;

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buffered: Bytes,
    recv_done: bool,
    send_done: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream { send, recv, buffered: Bytes::new(), recv_done: false, send_done: false }
    }
}

impl crate::abort::Abort for H2Stream {
    /// RST_STREAM: the calling agent resets its client connection in turn.
    fn abort(mut self) {
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.buffered.is_empty() {
                let n = self.buffered.len().min(buf.remaining());
                buf.put_slice(&self.buffered[..n]);
                self.buffered.advance(n);
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.buffered = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => self.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        loop {
            if self.send.capacity() == 0 {
                self.send.reserve_capacity(want);
            }
            let available = self.send.capacity();
            if available > 0 {
                let n = available.min(want);
                self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(_)) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM on our side; the peer may keep sending.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.send_done {
            self.send_done = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
