//! HTTP, gRPC and WebSocket servers and clients run inside test pods, built on hyper and tonic like real
//! applications. Every command prints one JSON line.
//!
//! `serve PORT NAME [STATUS]`: HTTP/1.1 and h2c. Answers with JSON describing the request as it arrived
//! (`name`, `method`, `path`, `query`, `headers`, `version`, `peer`), with status STATUS (default 200).
//! Request headers steer it: `x-test-status: N`; `x-test-delay-ms: N`; `x-test-fail-first: K` with
//! `x-test-key: KEY` fails the first K requests carrying KEY with 503, `x-test-slow-first: K` delays only the
//! first K. `GET /_count` reports how many requests it
//! has seen (itself excluded). A WebSocket upgrade gets an echo of each text frame.
//! `grpc-serve PORT NAME`: the `Echo` gRPC service.
//! `get URL [-n N] [-c C] [-H name:value].. [-X METHOD] [-d BODY] [--h2]`: N requests over C connections
//! (HTTP/2: C concurrent streams on one connection), summarized: counts per status, per server name and per
//! response flag, latencies (`--slow-ms T`: how many took at least T), and the last response.
//! `grpc ADDR say MSG [FAIL_CODE]` / `grpc ADDR repeat MSG N [FAIL_CODE]`: one call, its replies, status and
//! trailers. `ws ADDR PATH MSG`: a WebSocket handshake and one echoed frame.
//! `connect ADDR AUTHORITY MSG`: an HTTP/1.1 CONNECT to AUTHORITY via ADDR, then MSG through the tunnel (the
//! server echoes it prefixed with its name).
//! `hbone-peer PORT CA_DIR TRUST_DOMAIN NAMESPACE SERVICE_ACCOUNT [refuse-clients] [pqc-only|classical-only]`: an HBONE server that is not a nodemesh agent
//! (`mesh_tests::hbone_peer`), printing each CONNECT's headers.
//! `load URL RATE SECONDS [-c C] [--h2]`: load for the benchmark. RATE > 0: open loop at RATE requests/s
//! spread over C connections, latency measured from each request's scheduled time (no coordinated omission);
//! RATE 0: as fast as C connections go. Reports achieved rate and latency percentiles in µs.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::echo::echo_client::EchoClient;
use mesh_tests::echo::echo_server::{Echo, EchoServer};
use mesh_tests::echo::{EchoReply, EchoRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]).await,
        Some("grpc-serve") => grpc_serve(&args[1..]).await,
        Some("get") => get(&args[1..]).await,
        Some("load") => load(&args[1..]).await,
        Some("grpc") => grpc_call(&args[1..]).await,
        Some("ws") => websocket(&args[1..]).await,
        Some("connect") => connect_tunnel(&args[1..]).await,
        Some("hbone-peer") => hbone_peer(&args[1..]).await,
        _ => Err("usage: mesh-http serve|grpc-serve|get|grpc|ws ... (see the source's header)".into()),
    };
    match result {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("mesh-http: {e}");
            std::process::exit(1);
        }
    }
}

/// `hbone-peer PORT CA_DIR TRUST_DOMAIN NAMESPACE SERVICE_ACCOUNT [refuse-clients] [pqc-only|classical-only]`:
/// an HBONE server that is not a nodemesh agent.
async fn hbone_peer(args: &[String]) -> Result<Value, Error> {
    use mesh_tests::hbone_peer::{Behaviour, KeyExchange};
    let listener = listen(&args[0]).await?;
    let identity = mesh_agent::identity::Identity::new(&args[2], &args[3], &args[4]);
    let mut behaviour = Behaviour::default();
    for option in &args[5..] {
        match option.as_str() {
            "refuse-clients" => behaviour.refuse_clients = true,
            "pqc-only" => behaviour.key_exchange = KeyExchange::PostQuantumOnly,
            "classical-only" => behaviour.key_exchange = KeyExchange::ClassicalOnly,
            other => return Err(format!("unknown hbone-peer option {other}").into()),
        }
    }
    mesh_tests::hbone_peer::serve(listener, std::path::Path::new(&args[1]), &identity, behaviour).await?;
    Ok(Value::Null)
}

async fn listen(port: &str) -> Result<TcpListener, Error> {
    let port: u16 = port.parse()?;
    let listener = match TcpListener::bind(("::", port)).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(("0.0.0.0", port)).await?,
    };
    println!("listening {}", listener.local_addr()?);
    Ok(listener)
}

struct Server {
    name: String,
    status: u16,
    seen: AtomicU64,
    failures_left: Mutex<HashMap<String, u64>>,
    slow_left: Mutex<HashMap<String, u64>>,
}

async fn serve(args: &[String]) -> Result<Value, Error> {
    let listener = listen(&args[0]).await?;
    let server = Arc::new(Server {
        name: args[1].clone(),
        status: args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(200),
        seen: AtomicU64::new(0),
        failures_left: Mutex::new(HashMap::new()),
        slow_left: Mutex::new(HashMap::new()),
    });
    loop {
        let (conn, peer) = listener.accept().await?;
        // As servers built for keep-alive do (nginx's tcp_nodelay, Go's net/http, Node: on by default). Without
        // it, Nagle and the caller's delayed ACK held each HTTP/2 response until the next request arrived (one
        // response behind, seen in the benchmark as fixed-rate latency equal to the interval between requests).
        conn.set_nodelay(true)?;
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(answer(&server, req, peer).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(conn), svc).await;
        });
    }
}

/// Counts down the budget of `key` (starting at `k`); true while there was one left.
fn take_one(budgets: &Mutex<HashMap<String, u64>>, key: &str, k: u64) -> bool {
    let mut left = budgets.lock().unwrap_or_else(|p| p.into_inner());
    let n = left.entry(key.to_string()).or_insert(k);
    let had = *n > 0;
    *n = n.saturating_sub(1);
    had
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn answer(server: &Server, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if req.uri().path() == "/_count" {
        return json_response(200, json!({"name": server.name, "count": server.seen.load(Ordering::Acquire)}));
    }
    server.seen.fetch_add(1, Ordering::AcqRel);
    if req.method() == http::Method::CONNECT {
        // A tunnel: everything after the 200 is echoed back, prefixed with the server's name once.
        let upgrade = hyper::upgrade::on(&mut req);
        let name = server.name.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                if let Ok(n) = io.read(&mut buf).await {
                    let _ = io.write_all(format!("{name}: {}", String::from_utf8_lossy(&buf[..n])).as_bytes()).await;
                }
            }
        });
        return Response::new(Full::new(Bytes::new()));
    }
    if let Some(key) = header(&req, "sec-websocket-key") {
        let accept = websocket_accept(key);
        let upgrade = hyper::upgrade::on(&mut req);
        let name = server.name.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let _ = websocket_echo(TokioIo::new(upgraded), &name).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", "websocket".parse().expect("static"));
        r.headers_mut().insert("connection", "Upgrade".parse().expect("static"));
        r.headers_mut().insert("sec-websocket-accept", accept.parse().expect("base64"));
        return r;
    }
    let slow = match (header(&req, "x-test-slow-first").and_then(|v| v.parse::<u64>().ok()), header(&req, "x-test-key"))
    {
        (Some(k), Some(key)) => take_one(&server.slow_left, key, k),
        _ => true,
    };
    if let Some(ms) = header(&req, "x-test-delay-ms").and_then(|v| v.parse().ok()).filter(|_| slow) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = header(&req, "x-test-status").and_then(|v| v.parse().ok()).unwrap_or(server.status);
    if let (Some(k), Some(key)) =
        (header(&req, "x-test-fail-first").and_then(|v| v.parse::<u64>().ok()), header(&req, "x-test-key"))
    {
        if take_one(&server.failures_left, key, k) {
            status = 503;
        }
    }
    let headers: BTreeMap<String, String> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let description = json!({
        "name": server.name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "version": format!("{:?}", req.version()),
        "peer": peer.ip().to_canonical().to_string(),
    });
    let _ = req.into_body().collect().await;
    json_response(status, description)
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", "application/json".parse().expect("static"));
    r.headers_mut().insert(
        "x-served-by",
        body["name"].as_str().unwrap_or("").parse().unwrap_or_else(|_| "?".parse().expect("static")),
    );
    r
}

fn websocket_accept(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, format!("{key}{WS_GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Reads one short frame (RFC 6455 §5.2: payload under 126 bytes); client frames are masked.
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<(u8, Vec<u8>), Error> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let len = (head[1] & 0x7f) as usize;
    if len >= 126 {
        return Err("long frames are not used in these tests".into());
    }
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        s.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
    Ok((head[0] & 0x0f, payload))
}

fn frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x81, payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 }];
    match mask {
        Some(m) => {
            f.extend(m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend(payload),
    }
    f
}

async fn websocket_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    name: &str,
) -> Result<(), Error> {
    loop {
        let (opcode, payload) = read_frame(&mut s).await?;
        if opcode == 8 {
            return Ok(());
        }
        let reply = format!("{name}: {}", String::from_utf8_lossy(&payload));
        s.write_all(&frame(reply.as_bytes(), None)).await?;
    }
}

struct EchoService {
    name: String,
}

fn failure(code: u32, name: &str) -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("x-echo-server", name.parse().unwrap_or_else(|_| "?".parse().expect("static")));
    tonic::Status::with_metadata(
        tonic::Code::from(code as i32),
        format!("failing as asked by the caller of {name}"),
        metadata,
    )
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, request: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let r = request.into_inner();
        if r.fail_with != 0 {
            return Err(failure(r.fail_with, &self.name));
        }
        Ok(tonic::Response::new(EchoReply { message: r.message, server: self.name.clone(), index: 0 }))
    }

    type RepeatStream = tokio_stream::Iter<std::vec::IntoIter<Result<EchoReply, tonic::Status>>>;

    async fn repeat(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::RepeatStream>, tonic::Status> {
        let r = request.into_inner();
        let mut items: Vec<Result<EchoReply, tonic::Status>> = (0..r.repeat)
            .map(|index| Ok(EchoReply { message: r.message.clone(), server: self.name.clone(), index }))
            .collect();
        if r.fail_with != 0 {
            items.push(Err(failure(r.fail_with, &self.name)));
        }
        Ok(tonic::Response::new(tokio_stream::iter(items)))
    }
}

async fn grpc_serve(args: &[String]) -> Result<Value, Error> {
    let listener = listen(&args[0]).await?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService { name: args[1].clone() }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(json!({}))
}

fn status_json(s: &tonic::Status) -> Value {
    let trailer = s.metadata().get("x-echo-server").and_then(|v| v.to_str().ok()).map(String::from);
    let flags = s.metadata().get("x-nodemesh-response-flags").and_then(|v| v.to_str().ok()).map(String::from);
    json!({"code": s.code() as i32, "message": s.message(), "trailer_server": trailer, "flags": flags})
}

async fn grpc_call(args: &[String]) -> Result<Value, Error> {
    let mut client = EchoClient::connect(format!("http://{}", args[0])).await?;
    let fail_with = |i: usize| args.get(i).map(|c| c.parse()).transpose();
    match args.get(1).map(String::as_str) {
        Some("say") => {
            let req = EchoRequest { message: args[2].clone(), repeat: 0, fail_with: fail_with(3)?.unwrap_or(0) };
            Ok(match client.say(req).await {
                Ok(r) => json!({"code": 0, "replies": [r.into_inner().server]}),
                Err(s) => status_json(&s),
            })
        }
        Some("repeat") => {
            let req = EchoRequest {
                message: args[2].clone(),
                repeat: args[3].parse()?,
                fail_with: fail_with(4)?.unwrap_or(0),
            };
            let mut stream = match client.repeat(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Ok(status_json(&s)),
            };
            let mut replies = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(r)) => replies.push(json!({"index": r.index, "server": r.server})),
                    Ok(None) => return Ok(json!({"code": 0, "replies": replies})),
                    Err(s) => {
                        let mut v = status_json(&s);
                        v["replies"] = json!(replies);
                        return Ok(v);
                    }
                }
            }
        }
        _ => Err("grpc ADDR say MSG [CODE] | repeat MSG N [CODE]".into()),
    }
}

struct GetOptions {
    url: Uri,
    count: usize,
    connections: usize,
    headers: Vec<(String, String)>,
    method: String,
    body: String,
    h2: bool,
    slow_ms: f64,
}

fn parse_get(args: &[String]) -> Result<GetOptions, Error> {
    let mut o = GetOptions {
        url: args.first().ok_or("get URL")?.parse()?,
        count: 1,
        connections: 1,
        headers: Vec::new(),
        method: "GET".into(),
        body: String::new(),
        h2: false,
        slow_ms: f64::INFINITY,
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "-n" => o.count = value()?.parse()?,
            "-c" => o.connections = value()?.parse()?,
            "-H" => {
                let v = value()?;
                let (k, v) = v.split_once(':').ok_or("-H name:value")?;
                o.headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            "-X" => o.method = value()?,
            "-d" => o.body = value()?,
            "--h2" => o.h2 = true,
            "--slow-ms" => o.slow_ms = value()?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    Ok(o)
}

#[derive(Default)]
struct Summary {
    statuses: BTreeMap<String, u64>,
    names: BTreeMap<String, u64>,
    flags: BTreeMap<String, u64>,
    errors: Vec<String>,
    errors_total: u64,
    latencies_ms: Vec<f64>,
    last: Value,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(o: &GetOptions) -> Result<Sender, Error> {
    let host = o.url.host().ok_or("URL without host")?.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect((host, o.url.port_u16().unwrap_or(80)))).await??;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(if o.h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    })
}

async fn one_request(sender: &mut Sender, o: &GetOptions) -> Result<(http::response::Parts, Bytes), Error> {
    let authority = o.url.authority().ok_or("URL without host")?.to_string();
    let path = o.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut b = Request::builder().method(o.method.as_str());
    b = match sender {
        Sender::H1(_) => b.uri(path).header("host", authority),
        Sender::H2(_) => b.uri(o.url.clone()),
    };
    for (k, v) in &o.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Full::new(Bytes::from(o.body.clone())))?;
    let response = match sender {
        Sender::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let (parts, body) = response.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

async fn get(args: &[String]) -> Result<Value, Error> {
    let o = Arc::new(parse_get(args)?);
    let summary = Arc::new(Mutex::new(Summary::default()));
    let h2_sender = if o.h2 { Some(connect(&o).await?) } else { None };
    let h2_sender = h2_sender.map(|s| match s {
        Sender::H2(s) => s,
        Sender::H1(_) => unreachable!("--h2 connects with HTTP/2"),
    });
    let mut tasks = Vec::new();
    for worker in 0..o.connections {
        let (o, summary, h2) = (o.clone(), summary.clone(), h2_sender.clone());
        let share = o.count / o.connections + usize::from(worker < o.count % o.connections);
        tasks.push(tokio::spawn(async move {
            let mut sender = h2.map(Sender::H2);
            for _ in 0..share {
                if sender.is_none() {
                    sender = connect(&o).await.map_err(|e| record_error(&summary, e)).ok();
                }
                let Some(s) = sender.as_mut() else { continue };
                let started = Instant::now();
                match tokio::time::timeout(IO_TIMEOUT, one_request(s, &o)).await {
                    Ok(Ok((response, body))) => record(&summary, &response, &body, started.elapsed()),
                    Ok(Err(e)) => {
                        record_error(&summary, e);
                        sender = None;
                    }
                    Err(_) => {
                        record_error(&summary, "timed out".into());
                        sender = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let mut s = std::mem::take(&mut *summary.lock().unwrap_or_else(|p| p.into_inner()));
    s.latencies_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| s.latencies_ms.get(((s.latencies_ms.len() as f64 - 1.0) * q).round() as usize).copied();
    let slow = s.latencies_ms.iter().filter(|l| **l >= o.slow_ms).count();
    Ok(json!({
        "statuses": s.statuses, "names": s.names, "flags": s.flags, "errors": s.errors, "errors_total": s.errors_total, "slow": slow,
        "p50_ms": pick(0.5), "max_ms": pick(1.0), "last": s.last,
    }))
}

/// The first few errors verbatim; the rest only counted (under `errors_total`).
fn record_error(summary: &Mutex<Summary>, e: Error) {
    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
    s.errors_total += 1;
    if s.errors.len() < 5 {
        s.errors.push(e.to_string());
    }
}

fn record(summary: &Mutex<Summary>, response: &http::response::Parts, body: &Bytes, elapsed: Duration) {
    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
    *s.statuses.entry(response.status.as_u16().to_string()).or_default() += 1;
    if let Some(name) = response.headers.get("x-served-by").and_then(|v| v.to_str().ok()) {
        *s.names.entry(name.to_string()).or_default() += 1;
    }
    if let Some(flag) = response.headers.get("x-nodemesh-response-flags").and_then(|v| v.to_str().ok()) {
        *s.flags.entry(flag.to_string()).or_default() += 1;
    }
    s.latencies_ms.push(elapsed.as_secs_f64() * 1000.0);
    let headers: BTreeMap<String, String> =
        response.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let body =
        serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    s.last = json!({"status": response.status.as_u16(), "headers": headers, "body": body});
}

async fn websocket(args: &[String]) -> Result<Value, Error> {
    let (addr, path, message) = (&args[0], &args[1], &args[2]);
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr.as_str())).await??;
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let head = read_head(&mut tcp).await?;
    let status = head.split(' ').nth(1).unwrap_or("").to_string();
    let accepted = head
        .to_ascii_lowercase()
        .contains(&format!("sec-websocket-accept: {}", websocket_accept(&key).to_ascii_lowercase()));
    let mut replies = Vec::new();
    if status == "101" {
        for i in 0..2 {
            tcp.write_all(&frame(format!("{message} {i}").as_bytes(), Some(fastrand::u32(..).to_le_bytes()))).await?;
            let (_, payload) = tokio::time::timeout(IO_TIMEOUT, read_frame(&mut tcp)).await??;
            replies.push(String::from_utf8_lossy(&payload).to_string());
        }
    }
    Ok(json!({"status": status, "accepted": accepted, "replies": replies}))
}

async fn load(args: &[String]) -> Result<Value, Error> {
    let rate: f64 = args.get(1).ok_or("load URL RATE SECONDS")?.parse()?;
    let seconds: f64 = args.get(2).ok_or("load URL RATE SECONDS")?.parse()?;
    let mut rest = vec![args[0].clone()];
    rest.extend(args[3..].iter().cloned());
    let o = Arc::new(parse_get(&rest)?);
    let h2 = if o.h2 {
        match connect(&o).await? {
            Sender::H2(s) => Some(s),
            Sender::H1(_) => None,
        }
    } else {
        None
    };
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(o.connections as f64 / rate));
    let mut tasks = Vec::new();
    for worker in 0..o.connections {
        let (o, h2) = (o.clone(), h2.clone());
        tasks.push(tokio::spawn(async move {
            // As real clients do: a connection the server closed (`connection: close`, or broken) is replaced by
            // a new one for the next request; a request that fails is counted, never retried.
            let mut sender = h2.map(Sender::H2);
            let (mut latencies, mut errors, mut samples, mut connections) = (Vec::new(), 0u64, Vec::new(), 0u64);
            // Workers start staggered so a fixed rate is spread evenly.
            let mut next = start + interval.map_or(Duration::ZERO, |i| i.mul_f64(worker as f64 / o.connections as f64));
            while next < end {
                // Behind schedule (a slow response): latency counts from when the request was due, so slowness is
                // not hidden (coordinated omission). On schedule: from the actual send, so the timer's own
                // millisecond granularity is not counted against the path.
                let behind = tokio::time::Instant::now() >= next;
                if interval.is_some() && !behind {
                    tokio::time::sleep_until(next).await;
                }
                let scheduled = if interval.is_some() && behind { next } else { tokio::time::Instant::now() };
                if sender.is_none() {
                    match connect(&o).await {
                        Ok(s) => {
                            sender = Some(s);
                            connections += 1;
                        }
                        Err(e) => {
                            errors += 1;
                            if samples.len() < 5 {
                                samples.push(format!("connect: {e}"));
                            }
                        }
                    }
                }
                if let Some(s) = sender.as_mut() {
                    match one_request(s, &o).await {
                        Ok((parts, _)) if parts.status.is_success() => {
                            latencies.push(scheduled.elapsed().as_micros() as u64);
                            let close = parts.headers.get(http::header::CONNECTION).is_some_and(|v| v == "close");
                            if close {
                                sender = None;
                            }
                        }
                        Ok((parts, _)) => {
                            errors += 1;
                            if samples.len() < 5 {
                                samples.push(format!("status {}", parts.status));
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            if samples.len() < 5 {
                                samples.push(e.to_string());
                            }
                            sender = None;
                        }
                    }
                }
                next = match interval {
                    Some(i) => next + i,
                    None => tokio::time::Instant::now(),
                };
            }
            Ok::<_, Error>((latencies, errors, samples, connections))
        }));
    }
    let (mut latencies, mut errors, mut samples, mut connections) = (Vec::new(), 0, Vec::new(), 0);
    for t in tasks {
        let (l, e, s, c) = t.await??;
        latencies.extend(l);
        errors += e;
        samples.extend(s);
        connections += c;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pick = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    Ok(json!({
        "requests": latencies.len(), "errors": errors, "errorSamples": samples, "connections": connections,
        "rps": latencies.len() as f64 / elapsed,
        "p50Us": pick(0.5), "p99Us": pick(0.99),
    }))
}

/// Reads an HTTP/1.1 response head byte by byte (tests only: tiny heads).
async fn read_head(tcp: &mut TcpStream) -> Result<String, Error> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tokio::time::timeout(IO_TIMEOUT, tcp.read_u8()).await??);
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}

async fn connect_tunnel(args: &[String]) -> Result<Value, Error> {
    let (addr, authority, message) = (&args[0], &args[1], &args[2]);
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr.as_str())).await??;
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await?;
    let head = read_head(&mut tcp).await?;
    let status = head.split(' ').nth(1).unwrap_or("").to_string();
    let mut reply = String::new();
    if status == "200" {
        tcp.write_all(message.as_bytes()).await?;
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await??;
        reply = String::from_utf8_lossy(&buf[..n]).to_string();
    }
    Ok(json!({"status": status, "reply": reply}))
}
