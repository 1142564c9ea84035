//! Bookinfo, the service mesh's classic sample, as four small Rust services (hyper, HTTP/1.1) for
//! `cargo xtask demo`: productpage calls details and reviews; reviews v2 and v3 call ratings. The versions differ
//! visibly: v1 shows no stars, v2 black stars, v3 red stars.
//!
//! `bookinfo serve SERVICE PORT [--version V] [--pod NAME] [--upstream SERVICE=HOST:PORT]..`: one service.
//! Upstreams are reached by address, as a pod reaches a Service's cluster IP; calls carry `Host: SERVICE:PORT`
//! and forward the caller's `end-user`, `x-request-id` and trace headers, as Bookinfo's services do.
//! productpage answers `GET /productpage` (user from the `end-user` header or `?u=NAME`) as JSON with
//! `Accept: application/json`, HTML for browsers, text otherwise.
//!
//! `bookinfo fetch URL [-n N] [-H name:value]..`: N requests, one connection each; prints one JSON report:
//! statuses, which reviews version answered, latencies, and the last productpage rendered as text.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Headers a Bookinfo service passes on to the services it calls.
const PROPAGATED: &[&str] = &[
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];
/// How long productpage waits for details and reviews, and reviews for ratings (Bookinfo's choices).
const PRODUCTPAGE_TIMEOUT: Duration = Duration::from_secs(3);
const REVIEWS_TIMEOUT: Duration = Duration::from_secs(10);
const TITLE: &str = "The Comedy of Errors";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]).await,
        Some("fetch") => fetch(&args[1..]).await.map(|report| println!("{report}")),
        _ => Err("usage: bookinfo serve SERVICE PORT [..] | bookinfo fetch URL [..] (see the source's header)".into()),
    };
    if let Err(e) = result {
        eprintln!("bookinfo: {e}");
        std::process::exit(1);
    }
}

struct Service {
    kind: String,
    version: String,
    pod: String,
    upstreams: BTreeMap<String, String>,
}

async fn serve(args: &[String]) -> Result<(), Error> {
    let [kind, port, rest @ ..] = args else { return Err("serve SERVICE PORT".into()) };
    if !["productpage", "details", "reviews", "ratings"].contains(&kind.as_str()) {
        return Err(format!("unknown service {kind:?}").into());
    }
    let mut service =
        Service { kind: kind.clone(), version: "v1".into(), pod: kind.clone(), upstreams: BTreeMap::new() };
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--version" => service.version = value.clone(),
            "--pod" => service.pod = value.clone(),
            "--upstream" => {
                let (name, addr) = value.split_once('=').ok_or("--upstream SERVICE=HOST:PORT")?;
                service.upstreams.insert(name.into(), addr.into());
            }
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    let listener = TcpListener::bind(("::", port.parse::<u16>()?)).await?;
    println!("{} {} listening {}", service.kind, service.version, listener.local_addr()?);
    let service = Arc::new(service);
    loop {
        let (conn, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(answer(&service, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(conn), svc).await;
        });
    }
}

async fn answer(service: &Service, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/health" {
        return respond(200, "application/json", json!({"status": "ok"}).to_string());
    }
    let body = match (service.kind.as_str(), path) {
        ("productpage", "/productpage") => return productpage(service, &req).await,
        ("details", p) if p.starts_with("/details/") => details(),
        ("ratings", p) if p.starts_with("/ratings/") => json!({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}),
        ("reviews", p) if p.starts_with("/reviews/") => reviews(service, req.headers()).await,
        _ => return respond(404, "application/json", json!({"error": "not found"}).to_string()),
    };
    respond(200, "application/json", body.to_string())
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}

fn details() -> Value {
    json!({
        "id": 0, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
        "publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"
    })
}

async fn reviews(service: &Service, incoming: &HeaderMap) -> Value {
    let texts = [
        ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
        ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth compared to other plays."),
    ];
    // v1 does not call ratings; v2 shows black stars, v3 red ones.
    let color = match service.version.as_str() {
        "v2" => Some("black"),
        "v3" => Some("red"),
        _ => None,
    };
    let ratings = match color {
        Some(_) => Some(call(service, "ratings", "/ratings/0", incoming, REVIEWS_TIMEOUT).await),
        None => None,
    };
    let reviews: Vec<Value> = texts
        .iter()
        .map(|(reviewer, text)| {
            let mut review = json!({"reviewer": reviewer, "text": text});
            if let (Some(color), Some(ratings)) = (color, &ratings) {
                review["rating"] = match ratings {
                    Ok(r) => json!({"stars": r["ratings"][reviewer], "color": color}),
                    Err(e) => json!({"error": format!("Ratings service is currently unavailable ({e})")}),
                };
            }
            review
        })
        .collect();
    json!({"id": "0", "version": service.version, "podname": service.pod, "reviews": reviews})
}

async fn productpage(service: &Service, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut headers = req.headers().clone();
    let query_user = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "u").map(|(_, v)| v.into_owned()));
    if let Some(user) = query_user.and_then(|u| http::HeaderValue::from_str(&u).ok()) {
        headers.insert("end-user", user);
    }
    let (details, reviews) = tokio::join!(
        call(service, "details", "/details/0", &headers, PRODUCTPAGE_TIMEOUT),
        call(service, "reviews", "/reviews/0", &headers, PRODUCTPAGE_TIMEOUT),
    );
    let user = headers.get("end-user").and_then(|v| v.to_str().ok()).unwrap_or("");
    let page = json!({
        "product": {"id": 0, "title": TITLE},
        "user": user,
        "details": details.unwrap_or_else(|e| json!({"error": format!("Sorry, product details are currently unavailable ({e})")})),
        "reviews": reviews.unwrap_or_else(|e| json!({"error": format!("Sorry, product reviews are currently unavailable ({e})")})),
    });
    let accept = req.headers().get(http::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/json") {
        respond(200, "application/json", page.to_string())
    } else if accept.contains("text/html") {
        respond(200, "text/html; charset=utf-8", render_html(&page))
    } else {
        respond(200, "text/plain; charset=utf-8", render_text(&page))
    }
}

/// One call to an upstream service: its JSON, or why there is none (status, timeout, connection error).
async fn call(
    service: &Service,
    name: &str,
    path: &str,
    incoming: &HeaderMap,
    limit: Duration,
) -> Result<Value, Error> {
    let addr = service.upstreams.get(name).ok_or_else(|| format!("no address for {name}"))?;
    let port = addr.rsplit_once(':').map_or("80", |(_, p)| p);
    let mut request = Request::get(path).header(http::header::HOST, format!("{name}:{port}"));
    for name in PROPAGATED {
        if let Some(v) = incoming.get(*name) {
            request = request.header(*name, v);
        }
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let exchange = async {
        let tcp = TcpStream::connect(addr.as_str()).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!("{name} answered {}", status.as_u16()).into());
        }
        Ok::<_, Error>(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| format!("{name} timed out after {limit:?}"))?
}

fn stars(rating: &Value) -> Option<String> {
    let n = rating["stars"].as_u64()?.min(5) as usize;
    Some(format!("{}{} ({})", "★".repeat(n), "☆".repeat(5 - n), rating["color"].as_str().unwrap_or("")))
}

/// The page as a terminal shows it.
fn render_text(page: &Value) -> String {
    let mut out = TITLE.to_string();
    if let Some(user) = page["user"].as_str().filter(|u| !u.is_empty()) {
        out.push_str(&format!("   (signed in as {user})"));
    }
    let d = &page["details"];
    match d["error"].as_str() {
        Some(e) => out.push_str(&format!("\n  Details: {e}")),
        None => out.push_str(&format!(
            "\n  Details: {}, {}, {} pages, {}, {}",
            d["author"].as_str().unwrap_or("?"),
            d["year"],
            d["pages"],
            d["publisher"].as_str().unwrap_or("?"),
            d["language"].as_str().unwrap_or("?")
        )),
    }
    let r = &page["reviews"];
    match r["error"].as_str() {
        Some(e) => out.push_str(&format!("\n  Reviews: {e}")),
        None => {
            out.push_str(&format!("\n  Reviews (served by {}):", r["podname"].as_str().unwrap_or("?")));
            for review in r["reviews"].as_array().into_iter().flatten() {
                let rating = match (stars(&review["rating"]), review["rating"]["error"].as_str()) {
                    (Some(s), _) => format!("  {s}"),
                    (None, Some(e)) => format!("  [{e}]"),
                    (None, None) => String::new(),
                };
                out.push_str(&format!(
                    "\n    {}: {}{rating}",
                    review["reviewer"].as_str().unwrap_or("?"),
                    review["text"].as_str().unwrap_or("")
                ));
            }
        }
    }
    out
}

fn render_html(page: &Value) -> String {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut body = String::new();
    for line in render_text(page).lines() {
        let color = if line.contains("(red)") { " style=\"color:#c00\"" } else { "" };
        body.push_str(&format!("<p{color}>{}</p>\n", escape(line)));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Bookinfo</title></head>\
         <body style=\"font-family:sans-serif\"><h1>Bookinfo on nodemesh</h1>\n{body}\
         <p><small>Try <a href=\"?u=jason\">?u=jason</a>; reload to see the versions change.</small></p></body></html>"
    )
}

struct FetchOptions {
    url: Uri,
    count: usize,
    headers: Vec<(String, String)>,
}

fn parse_fetch(args: &[String]) -> Result<FetchOptions, Error> {
    let mut args = args.iter();
    let url: Uri = args.next().ok_or("fetch URL")?.parse()?;
    let mut o = FetchOptions { url, count: 1, headers: vec![] };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "-n" => o.count = value.parse()?,
            "-H" => {
                let (k, v) = value.split_once(':').ok_or("-H name:value")?;
                o.headers.push((k.trim().into(), v.trim().into()));
            }
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    Ok(o)
}

/// `fetch`: the requests one after the other, each on its own connection, summarized.
async fn fetch(args: &[String]) -> Result<Value, Error> {
    let o = parse_fetch(args)?;
    let host = o.url.host().ok_or("URL without host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = o.url.port_u16().unwrap_or(80);
    let path = o.url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = vec![];
    let (mut last_status, mut last_body) = (0, Value::Null);
    for _ in 0..o.count {
        let start = Instant::now();
        let mut request = Request::get(path.as_str())
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::ACCEPT, "application/json");
        for (k, v) in &o.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request = request.body(Empty::<Bytes>::new())?;
        let exchange = async {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Error>((status, body))
        };
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(30), exchange).await.map_err(|_| "timed out")??;
        latencies.push(start.elapsed().as_secs_f64() * 1000.0);
        *statuses.entry(status.to_string()).or_default() += 1;
        let json: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
        if json.get("reviews").is_some() {
            let version = json["reviews"]["version"].as_str().unwrap_or("unavailable");
            *versions.entry(version.to_string()).or_default() += 1;
        }
        (last_status, last_body) = (status, json);
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    let page = last_body.get("product").map(|_| render_text(&last_body));
    Ok(json!({
        "requests": o.count,
        "status": statuses,
        "reviews": versions,
        "latencyMs": {"min": pick(0.0), "p50": pick(0.5), "max": pick(1.0)},
        "lastStatus": last_status,
        "last": last_body,
        "page": page,
    }))
}
