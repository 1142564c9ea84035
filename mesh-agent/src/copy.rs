//! The copy loop under every proxied connection: both directions at once, with half-close, like
//! `tokio::io::copy_bidirectional` — but each direction's buffer is allocated on its first read, starts small
//! and grows only while reads keep filling it (a bulk transfer), as ztunnel's does. With two fixed 64 KiB buffers
//! per connection, 10,000 idle connections pinned hundreds of MiB that the allocator then kept after they
//! closed; an idle connection now holds no buffer at all (a small buffer is given back whenever the
//! direction waits for data), a bulk one keeps its grown buffer while it streams.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first buffer of a direction that has data.
pub const INITIAL_BUFFER: usize = 2 * 1024;
/// The largest: keeps one stream near line rate (`cargo xtask bench` measures it).
pub const MAX_BUFFER: usize = 64 * 1024;
/// Reads in a row that fill the whole buffer before it doubles.
const FULL_READS_TO_GROW: u8 = 4;

/// One direction's state.
struct OneWay {
    buf: Vec<u8>,
    /// `buf[pos..filled]` is read and not yet written.
    pos: usize,
    filled: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    copied: u64,
}

impl OneWay {
    fn new() -> Self {
        OneWay { buf: Vec::new(), pos: 0, filled: 0, full_reads: 0, read_done: false, need_flush: false, copied: 0 }
    }

    /// Called with the buffer empty: allocates it, or doubles it after enough full reads.
    fn size_for_next_read(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; INITIAL_BUFFER];
        } else if self.full_reads >= FULL_READS_TO_GROW && self.buf.len() < MAX_BUFFER {
            self.buf = vec![0; (self.buf.len() * 2).min(MAX_BUFFER)];
            self.full_reads = 0;
        }
    }

    /// Copies until the reader ends and the writer is shut down: `Ready(Ok(bytes))`.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.filled && !self.read_done {
                self.pos = 0;
                self.filled = 0;
                self.size_for_next_read();
                let mut read = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to read now and nothing left to write: a connection that is not streaming
                        // bulk (idle, or between requests) gives its buffer back while it waits.
                        if self.buf.len() == INITIAL_BUFFER {
                            self.buf = Vec::new();
                        }
                        // Push out what was written so far.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = read.filled().len();
                if n == 0 {
                    self.read_done = true;
                } else {
                    self.full_reads = if n == self.buf.len() { self.full_reads.saturating_add(1) } else { 0 };
                    self.filled = n;
                }
            }
            while self.pos < self.filled {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the other side accepts no more data",
                    )));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done && self.pos == self.filled {
                // Done reading: hand the memory back before waiting on the writer.
                self.buf = Vec::new();
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions have ended (each end half-closes the other's write side),
/// or one fails. Returns the bytes copied a → b and b → a.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (OneWay::new(), OneWay::new());
    let (mut a_done, mut b_done) = (None, None);
    poll_fn(|cx| {
        if a_done.is_none() {
            if let Poll::Ready(result) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                a_done = Some(result?);
            }
        }
        if b_done.is_none() {
            if let Poll::Ready(result) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                b_done = Some(result?);
            }
        }
        match (a_done, b_done) {
            (Some(sent), Some(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bytes arrive intact both ways, half-close passes through, and the counts are right.
    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, mut proxy_a) = duplex(1024);
        let (mut proxy_b, mut server) = duplex(1024);
        let proxy = tokio::spawn(async move { bidirectional(&mut proxy_a, &mut proxy_b).await });
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = upload.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected);
            server.write_all(b"thanks").await.unwrap();
            server.shutdown().await.unwrap();
        });
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"thanks");
        server_task.await.unwrap();
        assert_eq!(proxy.await.unwrap().unwrap(), (300_000, 6));
    }

    /// Small exchanges keep the initial buffer; only sustained full reads grow it, up to the cap.
    #[test]
    fn buffers_start_small_and_grow_only_for_bulk() {
        let mut way = OneWay::new();
        assert!(way.buf.is_empty(), "no buffer before the first read");
        way.size_for_next_read();
        assert_eq!(way.buf.len(), INITIAL_BUFFER);
        way.full_reads = FULL_READS_TO_GROW - 1;
        way.size_for_next_read();
        assert_eq!(way.buf.len(), INITIAL_BUFFER, "three full reads are not bulk yet");
        for _ in 0..20 {
            way.full_reads = FULL_READS_TO_GROW;
            way.size_for_next_read();
        }
        assert_eq!(way.buf.len(), MAX_BUFFER);
    }

    /// A failing side ends the copy with its error.
    #[tokio::test]
    async fn an_error_on_either_side_ends_the_copy() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (_client, mut proxy_a) = duplex(64);
        let error = bidirectional(&mut proxy_a, &mut Broken).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
