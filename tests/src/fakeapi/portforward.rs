//! `pods/{name}/portforward` as the kubelet serves it through the API server: a WebSocket speaking
//! `v4.channel.k8s.io` — per forwarded port a data channel (2i) and an error channel (2i+1), each opened by a
//! frame carrying the port (u16, little endian), then binary frames prefixed with their channel byte. The pod's
//! "localhost" is the network namespace a test maps the pod to ([`super::FakeApi::forward_pod`]).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::FakeApi;

const PROTOCOL: &str = "v4.channel.k8s.io";

fn plain(code: StatusCode, text: &str) -> Response {
    Response::builder().status(code).body(Body::from(text.to_string())).unwrap_or_default()
}

pub async fn handle(
    State(api): State<FakeApi>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    mut req: Request,
) -> Response {
    let Some(netns) =
        api.forwards.lock().unwrap_or_else(|e| e.into_inner()).get(&format!("{namespace}/{name}")).cloned()
    else {
        return plain(StatusCode::NOT_FOUND, "no such pod to forward to");
    };
    let Some(port) = query.get("ports").and_then(|p| p.parse::<u16>().ok()) else {
        return plain(StatusCode::BAD_REQUEST, "one port in ?ports= is supported");
    };
    let protocols = req.headers().get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return plain(StatusCode::BAD_REQUEST, "a WebSocket upgrade is required");
    };
    if !protocols.split(',').any(|p| p.trim() == PROTOCOL) {
        return plain(StatusCode::BAD_REQUEST, "only v4.channel.k8s.io is supported");
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        relay(ws, netns, port).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, key)
        .header(header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default()
}

fn frame(channel: u8, payload: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(payload.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(payload);
    Message::Binary(Bytes::from(bytes))
}

async fn relay<S>(ws: WebSocketStream<S>, netns: String, port: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let port_bytes = port.to_le_bytes();
    if sink.send(frame(0, &port_bytes)).await.is_err() || sink.send(frame(1, &port_bytes)).await.is_err() {
        return;
    }
    let connect = tokio::task::spawn_blocking(move || {
        crate::sys::in_netns(&netns, move || std::net::TcpStream::connect(("127.0.0.1", port)))
    })
    .await;
    let tcp = match connect {
        Ok(Ok(Ok(tcp))) => tcp,
        other => {
            let message = format!("error forwarding port {port}: {other:?}");
            let _ = sink.send(frame(1, message.as_bytes())).await;
            let _ = sink.close().await;
            return;
        }
    };
    let Ok(tcp) = tcp.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(tcp)) else { return };
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let upstream = async move {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Binary(bytes) if bytes.len() > 1 && bytes[0] == 0 => match to_pod.write_all(&bytes[1..]).await
                {
                    Ok(()) => {}
                    Err(_) => break,
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_pod.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(frame(0, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::join!(upstream, downstream);
}
