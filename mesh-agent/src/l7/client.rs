//! HTTP connections to upstreams, pooled by key: HTTP/2 connections are shared by concurrent requests, HTTP/1
//! connections are used by one request at a time and come back once ready. The caller says how to dial (a
//! plaintext socket from the pod, an HBONE stream, a transparent connection to the local application); this
//! module only does HTTP over it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::detect::Protocol;
use super::wire::for_protocol;
use crate::body::Body;
use crate::hbone::client::Channel;
use crate::hbone::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

/// Idle HTTP/1 connections kept per key.
const MAX_IDLE_HTTP1: usize = 64;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Kept alive as long as the connection (an HBONE stream slot, a circuit-breaker permit).
pub type Guard = Box<dyn Send>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (nothing was sent).
    #[error("connecting: {0}")]
    Connect(String),
    /// The circuit breaker allows no more connections.
    #[error("connection limit reached")]
    Overflow,
    /// The upstream never processed the request: its HTTP/2 connection went away (GOAWAY: the agent or server
    /// behind it drains) or it refused the stream. Safe to send again on another connection.
    #[error("not processed: {0}")]
    Unprocessed(crate::body::BoxError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// On an HBONE connection to the peer agent.
    #[error("HTTP/2 to the peer agent: {0}")]
    Mesh(h2::Error),
}

impl UpstreamError {
    pub fn unprocessed(&self) -> bool {
        matches!(self, UpstreamError::Unprocessed(_))
    }
}

/// A hyper failure whose HTTP/2 cause proves the peer never processed the request.
fn never_processed(e: &hyper::Error) -> bool {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()).is_some_and(crate::hbone::never_processed)
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
    /// Requests straight on an HBONE connection to the peer agent (shared like HTTP/2).
    Mesh(Arc<MeshSender>),
}

/// A channel to a peer agent, with what must live as long as it (a circuit-breaker connection permit).
pub struct MeshSender {
    channel: Channel,
    /// Only held (a `Mutex` makes the sender shareable between requests; it is never locked).
    _guard: Mutex<Guard>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
            Sender::Mesh(s) => s.channel.is_closed(),
        }
    }

    /// Another handle on a connection that takes concurrent requests; `None` for HTTP/1.
    fn shared(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::Mesh(s) => Some(Sender::Mesh(s.clone())),
        }
    }
}

/// What a dial produced: a byte stream to speak HTTP on, or a channel to a peer agent that takes requests as
/// they are; either with what must live as long as the connection.
pub enum Dialed {
    Io(Box<dyn Io>, Guard),
    Mesh(Channel, Guard),
}

impl Dialed {
    /// The same, also keeping `more` alive as long as the connection.
    pub fn holding(self, more: Guard) -> Self {
        match self {
            Dialed::Io(io, guard) => Dialed::Io(io, Box::new((guard, more))),
            Dialed::Mesh(channel, guard) => Dialed::Mesh(channel, Box::new((guard, more))),
        }
    }
}

/// Performs the HTTP handshake of `protocol` over `io` and runs the connection in its own task.
pub async fn handshake(io: Box<dyn Io>, protocol: Protocol, guard: Guard) -> Result<SenderHandle, UpstreamError> {
    let io = TokioIo::new(io);
    let sender = match protocol {
        Protocol::Http2 => {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Sender::H2(sender)
        }
        _ => {
            let (sender, conn) = http1::Builder::new().handshake(io).await?;
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                }
            });
            Sender::H1(sender)
        }
    };
    Ok(SenderHandle(sender))
}

/// A connection ready for a request.
pub struct SenderHandle(Sender);

impl SenderHandle {
    /// Sends one request on a connection of its own (upgrades: the connection leaves with the response).
    pub async fn send(self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match self.0 {
            Sender::H1(mut s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            Sender::H2(mut s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            // `handshake` makes HTTP connections only.
            Sender::Mesh(_) => Err(UpstreamError::Connect("not an HTTP connection".into())),
        }
    }
}

/// Pooled connections by key. HTTP/2 connections stay in the pool while in use; an HTTP/1 connection leaves it
/// for its request and comes back when the response body has been read to the end (a response dropped halfway
/// takes its connection with it). Cheap to clone.
pub struct HttpPool<K> {
    conns: Arc<Mutex<HashMap<K, Vec<Sender>>>>,
}

impl<K> Default for HttpPool<K> {
    fn default() -> Self {
        HttpPool { conns: Default::default() }
    }
}

impl<K> Clone for HttpPool<K> {
    fn clone(&self) -> Self {
        HttpPool { conns: self.conns.clone() }
    }
}

/// A response body that returns its HTTP/1 connection to the pool once read to the end.
struct CheckinOnEnd<K: Hash + Eq + Clone + Send + Unpin + 'static> {
    body: Incoming,
    checkin: Option<(HttpPool<K>, K, http1::SendRequest<Body>)>,
}

impl<K: Hash + Eq + Clone + Send + Unpin + 'static> http_body::Body for CheckinOnEnd<K> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(poll, Poll::Ready(None)) || self.body.is_end_stream() {
            if let Some((pool, key, sender)) = self.checkin.take() {
                pool.checkin(key, Sender::H1(sender));
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<K: Hash + Eq + Clone + Send + Unpin + 'static> HttpPool<K> {
    fn checkout(&self, key: &K) -> Option<Sender> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        if let Some(shared) = list.iter().find_map(Sender::shared) {
            return Some(shared);
        }
        // Every HTTP/1 connection in the pool is idle: busy ones are out with their request.
        list.pop()
    }

    fn checkin(&self, key: K, sender: Sender) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(key).or_default();
        if list.len() < MAX_IDLE_HTTP1 || sender.shared().is_some() {
            list.push(sender);
        }
    }

    /// Sends `req` on a pooled connection for `key`, or on a new one from `dial` (an HTTP connection of
    /// `protocol` when the dial gives a byte stream), in the form that connection takes. A pooled connection
    /// that turns out to be dead before the request went out is replaced once, transparently.
    pub async fn send<F, Fut>(
        &self,
        key: K,
        protocol: Protocol,
        req: Request<Body>,
        dial: F,
    ) -> Result<Response<Body>, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialed, UpstreamError>>,
    {
        let mut req = req;
        if let Some(sender) = self.checkout(&key) {
            match self.try_send(&key, sender, req).await {
                Ok(response) => return Ok(response),
                Err(Retryable::No(e)) => return Err(e),
                Err(Retryable::Yes(r)) => req = *r,
            }
        }
        let sender = match dial().await? {
            Dialed::Io(io, guard) => handshake(io, protocol, guard).await?.0,
            Dialed::Mesh(channel, guard) => Sender::Mesh(Arc::new(MeshSender { channel, _guard: Mutex::new(guard) })),
        };
        if let Some(shared) = sender.shared() {
            self.checkin(key.clone(), shared);
        }
        match self.try_send(&key, sender, req).await {
            Ok(response) => Ok(response),
            Err(Retryable::No(e)) => Err(e),
            Err(Retryable::Yes(_)) => {
                Err(UpstreamError::Connect("new connection closed before the request was sent".into()))
            }
        }
    }

    async fn try_send(&self, key: &K, sender: Sender, req: Request<Body>) -> Result<Response<Body>, Retryable> {
        let req = for_protocol(req, if matches!(sender, Sender::H1(_)) { Protocol::Http1 } else { Protocol::Http2 });
        match sender {
            Sender::H2(mut s) => {
                if s.ready().await.is_err() {
                    return Err(Retryable::Yes(Box::new(req)));
                }
                let response = s.try_send_request(req).await.map_err(retryable)?;
                Ok(response.map(crate::body::boxed))
            }
            Sender::H1(mut s) => {
                if s.ready().await.is_err() {
                    return Err(Retryable::Yes(Box::new(req)));
                }
                let response = s.try_send_request(req).await.map_err(retryable)?;
                let checkin = Some((self.clone(), key.clone(), s));
                Ok(response.map(|body| crate::body::boxed(CheckinOnEnd { body, checkin })))
            }
            Sender::Mesh(s) => {
                if s.channel.is_closed() {
                    return Err(Retryable::Yes(Box::new(req)));
                }
                match s.channel.send(req).await {
                    Ok(response) => Ok(response.map(crate::body::boxed)),
                    Err(e) if crate::hbone::never_processed(&e) => {
                        Err(Retryable::No(UpstreamError::Unprocessed(e.into())))
                    }
                    Err(e) => Err(Retryable::No(UpstreamError::Mesh(e))),
                }
            }
        }
    }

    /// Keeps only the pooled connections whose key `keep` accepts.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| keep(k));
    }
}

fn retryable(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> Retryable {
    match e.take_message() {
        Some(req) => Retryable::Yes(Box::new(req)),
        None => {
            let e = e.into_error();
            Retryable::No(if never_processed(&e) {
                UpstreamError::Unprocessed(e.into())
            } else {
                UpstreamError::Http(e)
            })
        }
    }
}

enum Retryable {
    Yes(Box<Request<Body>>),
    No(UpstreamError),
}

pub fn io_error(e: io::Error) -> UpstreamError {
    UpstreamError::Connect(e.to_string())
}
