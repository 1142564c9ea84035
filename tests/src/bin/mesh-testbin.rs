//! Small client/server run inside test pods. Plain std networking, so it behaves like any application.
//!
//! `serve PORT`: dual-stack listener. Each connection first gets one JSON line `{"peer":..,"local":..}` (what
//! the server saw), then everything it sends is echoed back until it half-closes.
//! `client ADDR BYTES [CONNS]`: opens CONNS connections (all held open at once), then on each sends BYTES
//! pseudo-random bytes while reading the echo, and checks length and CRC32 both ways. Prints one JSON line
//! (`serverSawLocals`: the server address each good connection reached).
//! `probe ADDR`: one connection, reading the server's first line; prints `{"outcome","ms"}` with the outcome
//! `greeted` (a server answered), `refused` (connect failed with ECONNREFUSED), `reset` (connected, then reset),
//! `closed` (connected, then EOF), `timeout` or `error`, and how long it took to find out.
//! `stall ADDR CONNS SECONDS [PREFIX]`: opens CONNS connections, sends PREFIX (say, half a request head) on each
//! and nothing more, then waits at most SECONDS for the other side to close them; prints
//! `{"connections","closedByPeer","stillOpen","lastClosedMs"}` (a slowloris client, for the agent's bounds).
//! `MESH_TESTBIN_MARKER=text` sends that text repeated instead (to look for it on the wire);
//! `MESH_TESTBIN_HOLD_MS=n` waits n ms after connecting before sending (a long-lived connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("serve") => serve(args[2].parse().expect("port"), args.get(3).map(String::as_str) == Some("sink")),
        Some("throughput") => throughput(args[2].parse().expect("address"), args[3].parse().expect("bytes")),
        Some("rr") => round_trips(args[2].parse().expect("address"), args[3].parse().expect("count")),
        Some("cps") => connections_per_second(
            args[2].parse().expect("address"),
            args[3].parse().expect("seconds"),
            args.get(4).map(|n| n.parse().expect("max connections")).unwrap_or(u64::MAX),
        ),
        Some("probe") => probe(args[2].parse().expect("address")),
        Some("stall") => stall(
            args[2].parse().expect("address"),
            args[3].parse().expect("connections"),
            args[4].parse().expect("seconds"),
            args.get(5).map(String::as_str).unwrap_or(""),
        ),
        Some("streams") => long_lived_streams(
            args[2].parse().expect("address"),
            args[3].parse().expect("connections"),
            args[4].parse().expect("seconds"),
        ),
        Some("client") => client(
            args[2].parse().expect("address"),
            args[3].parse().expect("bytes"),
            args.get(4).map(|c| c.parse().expect("connections")).unwrap_or(1),
        ),
        _ => Err("usage: mesh-testbin serve PORT [sink] | client ADDR BYTES [CONNS] | throughput ADDR BYTES | rr ADDR COUNT | cps ADDR SECONDS [MAX] | probe ADDR | stall ADDR CONNS SECONDS [PREFIX] | streams ADDR CONNS SECONDS".into()),
    };
    if let Err(e) = result {
        eprintln!("mesh-testbin: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// `sink`: read and discard until EOF, then answer with the byte count (for one-way throughput).
fn serve(port: u16, sink: bool) -> Result<()> {
    let socket = std::net::TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
    // std listens with a backlog of 128; a thousand simultaneous connections would overflow it and wait on SYN
    // retransmits. Calling listen again raises it (as servers like nginx configure 511 and more).
    // SAFETY: listen on a socket this process owns.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&socket), 4096) };
    println!("listening {}", socket.local_addr()?);
    for conn in socket.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::Builder::new().stack_size(128 * 1024).spawn(move || {
            let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
            let header = format!(
                "{{\"peer\":\"{}\",\"local\":\"{}\"}}\n",
                canonical(conn.peer_addr().ok()),
                canonical(conn.local_addr().ok())
            );
            if conn.write_all(header.as_bytes()).is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        if !sink && conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            if sink {
                let _ = conn.write_all(format!("{total}\n").as_bytes());
            }
            let _ = conn.shutdown(Shutdown::Write);
        })?;
    }
    Ok(())
}

fn canonical(a: Option<SocketAddr>) -> String {
    a.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()).unwrap_or_default()
}

/// Deterministic bytes so both ends can be checked without keeping them.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

struct Outcome {
    server_saw_peer: String,
    server_saw_local: String,
    local: String,
    peername: String,
    sent: u64,
    received: u64,
    sent_crc: u32,
    received_crc: u32,
}

fn client(addr: SocketAddr, bytes: u64, conns: usize) -> Result<()> {
    // Every connection is open before any transfer starts, so they really are concurrent.
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        streams.push(s);
    }
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || transfer(s, bytes, i as u64 + 1))
                .expect("spawn")
        })
        .collect();
    let mut ok = 0;
    let mut failures = Vec::new();
    let mut first = None;
    let mut server_locals = Vec::new();
    for w in workers {
        match w.join().map_err(|_| "worker panicked".into()).and_then(|r| r) {
            Ok(o) if o.sent == bytes && o.received == bytes && o.sent_crc == o.received_crc => {
                ok += 1;
                server_locals.push(o.server_saw_local.clone());
                first.get_or_insert(o);
            }
            Ok(o) => failures
                .push(format!("sent {} received {} crc {:08x}/{:08x}", o.sent, o.received, o.sent_crc, o.received_crc)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let f = first.as_ref();
    let field = |g: fn(&Outcome) -> &String| f.map(g).cloned().unwrap_or_default();
    println!(
        "{{\"connections\":{conns},\"ok\":{ok},\"bytesEachWay\":{bytes},\"serverSawPeer\":\"{}\",\"serverSawLocal\":\"{}\",\"local\":\"{}\",\"peername\":\"{}\",\"serverSawLocals\":{:?},\"failures\":{:?}}}",
        field(|o| &o.server_saw_peer),
        field(|o| &o.server_saw_local),
        field(|o| &o.local),
        field(|o| &o.peername),
        server_locals,
        failures.iter().take(5).collect::<Vec<_>>(),
    );
    if ok == conns { Ok(()) } else { Err(format!("{} of {conns} connections failed", conns - ok).into()) }
}

fn connect_to(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    connect_reading_header(addr).map(|(stream, reader, _)| (stream, reader))
}

/// Connects and reads the server's first line (what it saw of the connection).
fn connect_reading_header(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    Ok((stream, reader, header))
}

/// How one connection attempt ended (a mesh must keep refusals refusals, and fast). Exits 0 whatever the outcome.
fn probe(addr: SocketAddr) -> Result<()> {
    use std::io::ErrorKind;
    let start = std::time::Instant::now();
    let greeting = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(12)))?;
        let mut byte = [0u8; 1];
        stream.read(&mut byte)
    });
    let outcome = match greeting {
        Ok(0) => "closed",
        Ok(_) => "greeted",
        Err(e) => match e.kind() {
            ErrorKind::ConnectionRefused => "refused",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "reset",
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            _ => "error",
        },
    };
    println!("{{\"outcome\":\"{outcome}\",\"ms\":{}}}", start.elapsed().as_millis());
    Ok(())
}

/// Holds `conns` connections with only `prefix` sent, and reports how many the other side closed within `seconds`.
fn stall(addr: SocketAddr, conns: usize, seconds: u64, prefix: &str) -> Result<()> {
    // Thousands of held connections need more descriptors than the usual soft limit of 1024.
    mesh_agent::node::raise_fd_limit();
    let prefix = prefix.replace("\\r\\n", "\r\n");
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.write_all(prefix.as_bytes())?;
        s.set_nonblocking(true)?;
        streams.push(Some(s));
    }
    let start = std::time::Instant::now();
    let (mut closed, mut last_closed_ms) = (0usize, 0u128);
    let mut buf = [0u8; 4096];
    while closed < conns && start.elapsed() < Duration::from_secs(seconds) {
        for slot in streams.iter_mut() {
            let Some(s) = slot else { continue };
            let done = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            if done {
                *slot = None;
                closed += 1;
                last_closed_ms = start.elapsed().as_millis();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{{\"connections\":{conns},\"closedByPeer\":{closed},\"stillOpen\":{},\"lastClosedMs\":{last_closed_ms}}}",
        conns - closed
    );
    Ok(())
}

/// `conns` long-lived connections to an echo server, each sending 1 KiB every 20 ms for `seconds` and checking
/// every echo byte for byte: a connection broken or corrupted in between (an agent restart cutting it) fails.
/// Prints {"connections", "ok", "roundTrips", "failures"}.
fn long_lived_streams(addr: SocketAddr, conns: usize, seconds: u64) -> Result<()> {
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            std::thread::Builder::new().stack_size(256 * 1024).spawn(move || -> Result<u64> {
                let (mut stream, mut reader) = connect_to(addr)?;
                let mut pattern = Pattern((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                let (mut sent, mut echoed) = (vec![0u8; 1024], vec![0u8; 1024]);
                let start = std::time::Instant::now();
                let mut round_trips = 0;
                while start.elapsed() < Duration::from_secs(seconds) {
                    pattern.fill(&mut sent);
                    stream.write_all(&sent)?;
                    reader.read_exact(&mut echoed)?;
                    if sent != echoed {
                        return Err(format!("echo differs after {round_trips} round trips").into());
                    }
                    round_trips += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                stream.shutdown(Shutdown::Write)?;
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest)?;
                if !rest.is_empty() {
                    return Err(format!("{} unexpected bytes at the end", rest.len()).into());
                }
                Ok(round_trips)
            })
        })
        .collect::<std::io::Result<_>>()?;
    let (mut ok, mut round_trips, mut failures) = (0, 0, Vec::new());
    for w in workers {
        match w.join().map_err(|_| "worker panicked".into()).and_then(|r| r) {
            Ok(n) => {
                ok += 1;
                round_trips += n;
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    println!(
        "{}",
        serde_json::json!({"connections": conns, "ok": ok, "roundTrips": round_trips, "failures": failures})
    );
    Ok(())
}

/// One-way bulk transfer to a `sink` server; prints {"bytes", "seconds", "gbitPerSecond"}.
fn throughput(addr: SocketAddr, bytes: u64) -> Result<()> {
    let (mut stream, mut reader) = connect_to(addr)?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = std::time::Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut ack = String::new();
    reader.read_line(&mut ack)?;
    let seconds = start.elapsed().as_secs_f64();
    let received: u64 = ack.trim().parse()?;
    if received != bytes {
        return Err(format!("sink received {received} of {bytes} bytes").into());
    }
    println!("{{\"bytes\":{bytes},\"seconds\":{seconds},\"gbitPerSecond\":{}}}", bytes as f64 * 8.0 / seconds / 1e9);
    Ok(())
}

/// `count` 64-byte request/response round trips on one connection to an echo server; prints percentiles in µs.
fn round_trips(addr: SocketAddr, count: usize) -> Result<()> {
    let (mut stream, mut reader) = connect_to(addr)?;
    let request = [7u8; 64];
    let mut response = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = std::time::Instant::now();
        stream.write_all(&request)?;
        reader.read_exact(&mut response)?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    println!("{{\"count\":{count},\"p50Us\":{},\"p99Us\":{}}}", pct(0.50), pct(0.99));
    Ok(())
}

/// New connections one after the other for `seconds` or until `max` were made: connect, receive the server's
/// first line (a full round trip through every hop), close. Prints the rate and, per IP, how many connections
/// the server saw coming from it.
fn connections_per_second(addr: SocketAddr, seconds: f64, max: u64) -> Result<()> {
    let start = std::time::Instant::now();
    let mut done = 0u64;
    let mut peers: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    while start.elapsed().as_secs_f64() < seconds && done < max {
        let (stream, _, header) = connect_reading_header(addr)?;
        let peer = header
            .split("\"peer\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map_or_else(|| "?".to_string(), |p| p.ip().to_string());
        *peers.entry(peer).or_default() += 1;
        drop(stream);
        done += 1;
    }
    println!(
        "{{\"connections\":{done},\"perSecond\":{},\"serverSawPeers\":{:?}}}",
        done as f64 / start.elapsed().as_secs_f64(),
        peers
    );
    Ok(())
}

fn transfer(stream: TcpStream, bytes: u64, seed: u64) -> Result<Outcome> {
    let local = canonical(stream.local_addr().ok());
    let peername = canonical(stream.peer_addr().ok());
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let field = |name: &str| -> String {
        header.split(&format!("\"{name}\":\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
    };
    if let Some(ms) = std::env::var("MESH_TESTBIN_HOLD_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let marker = std::env::var("MESH_TESTBIN_MARKER").ok().filter(|m| !m.is_empty());
    let mut writer = stream;
    let sender = std::thread::Builder::new().stack_size(128 * 1024).spawn(move || -> Result<(u64, u32)> {
        let mut pattern = Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut marker_stream = marker.map(|m| m.into_bytes().into_iter().cycle());
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            match marker_stream.as_mut() {
                Some(m) => buf[..n].iter_mut().for_each(|b| *b = m.next().unwrap_or(b'.')),
                None => pattern.fill(&mut buf[..n]),
            }
            writer.write_all(&buf[..n])?;
            crc.update(&buf[..n]);
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok((bytes, crc.finalize()))
    })?;
    let mut crc = crc32fast::Hasher::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        received += n as u64;
    }
    let (sent, sent_crc) = sender.join().map_err(|_| "sender panicked")??;
    Ok(Outcome {
        server_saw_peer: field("peer"),
        server_saw_local: field("local"),
        local,
        peername,
        sent,
        received,
        sent_crc,
        received_crc: crc.finalize(),
    })
}
