//! Which protocol a connection speaks: HTTP/1.x, HTTP/2 with prior knowledge (and so gRPC), or anything else.
//! The first bytes are read (with a bounded wait, since server-first protocols never send first) and handed back
//! in front of the stream, so the chosen path sees the connection from its start. The request line is checked
//! with `httparse`, the HTTP/2 connection preface byte for byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use mesh_common::config::ServicePort;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a client may stay silent before its connection is treated as opaque. Server-first protocols
/// (MySQL, SMTP) pay this once per connection; declaring the port's protocol avoids it.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A request line longer than this is not worth waiting for: opaque.
const MAX_PEEK: usize = 8 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http1" => Some(Protocol::Http1),
            "http2" => Some(Protocol::Http2),
            "opaque" => Some(Protocol::Opaque),
            _ => None,
        }
    }
}

/// What the Service says about a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// Nothing declared: detect, opaque after [`DETECT_TIMEOUT`].
    Detect,
    /// Declared HTTP (any version): the client speaks first, so wait for it — as long as a request head may
    /// take (`Limits::header_timeout`), not for ever.
    Http(std::time::Duration),
    /// Declared TCP or TLS: never parsed.
    Opaque,
}

/// `appProtocol` first, then the port name's prefix (Istio's convention: `http-web`, `grpc`, `tcp-db`).
pub fn hint(port: &ServicePort, header_timeout: Duration) -> Hint {
    let declared =
        port.app_protocol.as_deref().or_else(|| port.name.as_deref().map(|n| n.split('-').next().unwrap_or(n)));
    match declared.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http1" | "http2" | "h2c" | "kubernetes.io/h2c" | "grpc" | "grpc-web") => {
            Hint::Http(header_timeout)
        }
        Some("tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws" | "kubernetes.io/wss") => {
            Hint::Opaque
        }
        _ => Hint::Detect,
    }
}

/// What the first bytes of a connection are; `None`: not enough bytes to tell yet.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(Protocol::Http1),
        // The version is known once the whole request line is in.
        Ok(httparse::Status::Partial) if request.version.is_some() => Some(Protocol::Http1),
        Ok(httparse::Status::Partial) if buf.len() < MAX_PEEK => None,
        // Too many headers still means HTTP/1.
        Err(httparse::Error::TooManyHeaders) => Some(Protocol::Http1),
        _ => Some(Protocol::Opaque),
    }
}

/// Reads the first bytes of `io` and says what they are; the returned stream replays them.
pub async fn detect<S: AsyncRead + Unpin>(mut io: S, hint: Hint) -> io::Result<(Protocol, Rewind<S>)> {
    if hint == Hint::Opaque {
        return Ok((Protocol::Opaque, Rewind::new(Bytes::new(), io)));
    }
    let mut buf = BytesMut::with_capacity(1024);
    let start = tokio::time::Instant::now();
    // One deadline for the whole head, not one per read: a byte every few seconds must not hold it for ever.
    let deadline = start + DETECT_TIMEOUT;
    let patience = match hint {
        Hint::Http(patience) => Some(start + patience),
        _ => None,
    };
    let protocol = loop {
        let read = io.read_buf(&mut buf);
        let n = match patience {
            Some(until) => match tokio::time::timeout_at(until, read).await {
                Ok(n) => n?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no request within the header timeout")),
            },
            None => match tokio::time::timeout_at(deadline, read).await {
                Ok(n) => n?,
                Err(_) => break Protocol::Opaque,
            },
        };
        if n == 0 {
            break Protocol::Opaque;
        }
        if let Some(p) = classify(&buf) {
            break p;
        }
    };
    Ok((protocol, Rewind::new(buf.freeze(), io)))
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream itself (the bytes read for detection are lost): for refusing a connection.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: crate::abort::Abort> crate::abort::Abort for Rewind<S> {
    fn abort(self) {
        self.inner.abort()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /upload HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET /a HT"), None, "request line incomplete");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None, "preface incomplete");
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque), "TLS ClientHello");
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; MAX_PEEK + 1]), Some(Protocol::Opaque));
    }

    #[test]
    fn declared_protocols() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(String::from),
            port: 80,
            target_port: None,
            app_protocol: app.map(String::from),
        };
        let hint = |port: &ServicePort| hint(port, WAIT);
        assert_eq!(hint(&port(Some("http-web"), None)), Hint::Http(WAIT));
        assert_eq!(hint(&port(Some("grpc"), None)), Hint::Http(WAIT));
        assert_eq!(hint(&port(Some("web"), Some("kubernetes.io/h2c"))), Hint::Http(WAIT));
        assert_eq!(hint(&port(Some("http"), Some("tcp"))), Hint::Opaque, "appProtocol wins over the name");
        assert_eq!(hint(&port(Some("tcp-db"), None)), Hint::Opaque);
        assert_eq!(hint(&port(None, None)), Hint::Detect);
    }

    const WAIT: Duration = Duration::from_millis(200);

    /// A client of a port declared HTTP is waited for, but not for ever: a connection that never sends its
    /// request is an error (the caller closes and counts it), not a task held until the client gives up.
    #[tokio::test]
    async fn silent_clients_of_declared_http_ports_time_out() {
        let (_client, server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let error = detect(server, Hint::Http(WAIT)).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < WAIT * 5);
    }

    /// The wait is for the whole head: a client trickling a byte at a time is cut at the same deadline.
    #[tokio::test]
    async fn trickling_clients_of_declared_http_ports_time_out_too() {
        let (mut client, server) = tokio::io::duplex(1024);
        let trickle = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1" {
                if tokio::io::AsyncWriteExt::write_all(&mut client, &[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(WAIT / 4).await;
            }
        });
        let started = tokio::time::Instant::now();
        let error = detect(server, Hint::Http(WAIT)).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < WAIT * 2, "{:?}", started.elapsed());
        trickle.abort();
    }

    #[tokio::test]
    async fn silent_clients_are_opaque_and_bytes_are_replayed() {
        let (client, server) = tokio::io::duplex(1024);
        let (protocol, _) = detect(server, Hint::Detect).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        drop(client);

        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (protocol, mut rewound) = detect(server, Hint::Detect).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let mut first = [0u8; 3];
        rewound.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
