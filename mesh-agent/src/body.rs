//! Body types of the L7 proxy, and a request body that can be sent again (retries, mirroring).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Body as _;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, StreamBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy hands to hyper, whichever side it came from.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept for a retry or a mirror copy; larger ones are sent once.
pub const MAX_REPLAY: usize = 64 * 1024;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

#[derive(Default)]
struct Recorded {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    complete: bool,
    too_big: bool,
}

/// Passes a body through while keeping a copy of it (up to [`MAX_REPLAY`] bytes), so that once it has been sent
/// completely, [`Replay::body`] can produce it again.
pub struct Recording {
    inner: Body,
    recorded: Arc<Mutex<Recorded>>,
    /// Flips to true when the recording is over (complete, too big, or abandoned).
    done: tokio::sync::watch::Sender<bool>,
}

/// The handle that rebuilds a recorded body.
#[derive(Clone)]
pub struct Replay(Arc<Mutex<Recorded>>, tokio::sync::watch::Receiver<bool>);

pub fn record(body: Body) -> (Recording, Replay) {
    let complete = body.is_end_stream();
    let recorded = Arc::new(Mutex::new(Recorded { complete, ..Default::default() }));
    let (done, watch) = tokio::sync::watch::channel(complete);
    (Recording { inner: body, recorded: recorded.clone(), done }, Replay(recorded, watch))
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.recorded.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
        }
        self.done.send_replace(true);
    }
}

impl Replay {
    /// Waits until the original body has been read (or abandoned), then [`Replay::body`].
    pub async fn finished(&self) -> Option<Body> {
        let mut watch = self.1.clone();
        let _ = watch.wait_for(|done| *done).await;
        self.body()
    }

    /// The whole body again, if it was read to the end and was small enough to keep.
    pub fn body(&self) -> Option<Body> {
        let r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !r.complete || r.too_big {
            return None;
        }
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            r.chunks.iter().cloned().map(|c| Ok(Frame::data(c))).collect();
        if let Some(t) = &r.trailers {
            frames.push(Ok(Frame::trailers(t.clone())));
        }
        Some(StreamBody::new(tokio_stream::iter(frames)).boxed_unsync())
    }
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        let mut r = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    r.len += data.len();
                    if r.len > MAX_REPLAY && !r.too_big {
                        r.too_big = true;
                        r.chunks.clear();
                        self.done.send_replace(true);
                    } else if !r.too_big {
                        r.chunks.push(data.clone());
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    r.trailers = Some(t.clone());
                }
            }
            Poll::Ready(None) => r.complete = true,
            _ => {}
        }
        // hyper stops polling once a body says it has ended, so the last frame may be the last poll.
        if matches!(poll, Poll::Ready(None)) || self.inner.is_end_stream() {
            r.complete = true;
            self.done.send_replace(true);
        }
        drop(r);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replays_a_body_that_was_read_to_the_end() {
        let (recording, replay) = record(full("hello"));
        assert!(replay.body().is_none(), "not read yet");
        let waiter = tokio::spawn({
            let replay = replay.clone();
            async move { replay.finished().await.unwrap().collect().await.unwrap().to_bytes() }
        });
        let first = recording.collect().await.unwrap().to_bytes();
        let again = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(first, again);
        assert_eq!(waiter.await.unwrap(), first);
    }

    #[tokio::test]
    async fn empty_bodies_replay_at_once_and_big_ones_never() {
        let (_recording, replay) = record(empty());
        assert!(replay.body().is_some());
        let (recording, replay) = record(full(vec![7u8; MAX_REPLAY + 1]));
        assert_eq!(recording.collect().await.unwrap().to_bytes().len(), MAX_REPLAY + 1);
        assert!(replay.body().is_none());
    }
}
