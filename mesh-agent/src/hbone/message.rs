//! HTTP messages straight on an HBONE connection, between nodemesh agents: a routed request travels as its own
//! HTTP/2 stream next to the CONNECT tunnels, instead of inside a second HTTP/2 connection carried by one of
//! them. One framing, one flow control and one connection task per hop instead of two of each — the nested
//! form cost a second HPACK, a second set of frames and two more cross-task hand-offs per request on each agent.
//!
//! Here: the headers that say where such a request goes, a body pumped into an h2 `SendStream` under the peer's
//! flow control (trailers included, so gRPC status travels), and an h2 `RecvStream` read as an
//! [`http_body::Body`] that releases flow-control capacity as it is read (a slow reader slows the sender).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body::{Body as _, Frame};

use crate::body::{Body, BoxError};

/// On an agent-to-agent request sent straight on the HBONE connection: the pod address (`ip:port`) it is for.
/// The receiving agent checks it is one of its pod's own addresses, like a CONNECT's authority.
pub const TARGET_HEADER: &str = "nodemesh-target";

/// On a CONNECT, the calling agent offers to send its requests straight on the connection; an agent that takes
/// them answers the 200 with the same header and expects nothing on the stream. Any other answer (an agent from
/// before this or one told not to, ztunnel, another HBONE server) makes the stream a plain tunnel to the
/// workload, in which the calling agent speaks the application's own protocol — what any HBONE server relays.
pub const DIRECT_HEADER: &str = "nodemesh-l7-direct";

/// A received HTTP/2 message body.
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream) -> Self {
        RecvBody { recv, data_done: false }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The reader has it: the peer may send that much more.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Why a body could not be sent to its end.
#[derive(Debug, thiserror::Error)]
pub enum SendBodyError {
    /// The body's source failed (the stream is reset, so the peer sees an incomplete message, not a short one).
    #[error("reading the body: {0}")]
    Source(BoxError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer reset the stream (it answered without reading the rest, or went away).
    #[error("the peer reset the stream: {0:?}")]
    Reset(h2::Reason),
}

/// The next frame of `body`, unless the peer resets the stream first.
async fn next_frame(body: &mut Body, send: &mut SendStream<Bytes>) -> Result<Option<Frame<Bytes>>, SendBodyError> {
    poll_fn(|cx| {
        if let Poll::Ready(reset) = send.poll_reset(cx) {
            return Poll::Ready(Err(reset.map_or_else(SendBodyError::H2, SendBodyError::Reset)));
        }
        Pin::new(&mut *body).poll_frame(cx).map(|f| f.transpose().map_err(SendBodyError::Source))
    })
    .await
}

/// Sends `data` (the last data when `end`) as the peer's flow-control window allows.
async fn send_data(send: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), SendBodyError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let available = match send.capacity() {
            0 => match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SendBodyError::Reset(h2::Reason::CANCEL)),
            },
            n => n,
        };
        let chunk = data.split_to(available.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

/// Sends `body` on `send` to its end, trailers included. A failure resets the stream.
pub async fn send_body(mut body: Body, mut send: SendStream<Bytes>) -> Result<(), SendBodyError> {
    let result = pump(&mut body, &mut send).await;
    if let Err(e) = &result {
        if !matches!(e, SendBodyError::Reset(_)) {
            send.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
    result
}

async fn pump(body: &mut Body, send: &mut SendStream<Bytes>) -> Result<(), SendBodyError> {
    while let Some(frame) = next_frame(body, send).await? {
        match frame.into_data() {
            Ok(data) => {
                // The last chunk carries END_STREAM itself: no empty DATA frame after it.
                let end = body.is_end_stream();
                if data.is_empty() {
                    if end {
                        break;
                    }
                } else {
                    send_data(send, data, end).await?;
                    if end {
                        return Ok(());
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return Ok(send.send_trailers(trailers)?);
                }
            }
        }
    }
    Ok(send.send_data(Bytes::new(), true)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderMap, HeaderValue, Request, Response};
    use http_body_util::BodyExt;

    use super::*;

    /// An h2 client and server over real loopback sockets; the server answers each request with its own body
    /// (echo) and trailers `echo-trailer: <the request's trailer>`.
    async fn echo_server() -> h2::client::SendRequest<Bytes> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // A small window, so bodies larger than it need several grants of capacity.
            let mut conn = h2::server::Builder::new().initial_window_size(16 * 1024).handshake(tcp).await.unwrap();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let body = RecvBody::new(request.into_body()).collect().await.unwrap();
                    let trailers = body.trailers().cloned();
                    let data = body.to_bytes();
                    let send = respond.send_response(Response::new(()), false).unwrap();
                    let mut echoed = HeaderMap::new();
                    if let Some(v) = trailers.as_ref().and_then(|t| t.get("request-trailer")) {
                        echoed.insert("echo-trailer", v.clone());
                    }
                    let body = frames(vec![Ok(Frame::data(data)), Ok(Frame::trailers(echoed))]);
                    send_body(body, send).await.unwrap();
                });
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::Builder::new().initial_window_size(16 * 1024).handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    /// A body of these frames (one per poll), ending after the last.
    struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn frames(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> Body {
        crate::body::boxed(Frames(frames.into()))
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_and_its_trailers_arrive_whole_both_ways() {
        let mut sender = echo_server().await;
        let payload: Bytes = (0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
        let mut trailers = HeaderMap::new();
        trailers.insert("request-trailer", HeaderValue::from_static("grpc-ok"));
        let body = frames(vec![
            Ok(Frame::data(payload.slice(..70_000))),
            Ok(Frame::data(payload.slice(70_000..))),
            Ok(Frame::trailers(trailers)),
        ]);
        let request = Request::post("http://web/echo").body(()).unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let pumping = tokio::spawn(send_body(body, send));
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        let collected = RecvBody::new(response.into_body()).collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers arrived");
        assert_eq!(collected.to_bytes(), payload, "every byte, in order");
        assert_eq!(trailers.get("echo-trailer").unwrap(), "grpc-ok");
        pumping.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_failing_body_resets_the_stream_instead_of_ending_it_short() {
        let mut sender = echo_server().await;
        let body = frames(vec![Ok(Frame::data(Bytes::from_static(b"part"))), Err("client went away".into())]);
        let (response, send) = sender.send_request(Request::post("http://web/").body(()).unwrap(), false).unwrap();
        let sent = send_body(body, send).await;
        assert!(matches!(sent, Err(SendBodyError::Source(_))), "{sent:?}");
        // The server saw a reset, not a complete 4-byte body: it never answers with an echo.
        let answer = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap();
        assert!(answer.is_err(), "the stream was reset: {answer:?}");
    }
}
