//! Small client/server run inside test pods. Plain std networking, so it behaves like any application.
//!
//! `serve PORT`: dual-stack listener. Each connection first gets one JSON line `{"peer":..,"local":..}` (what
//! the server saw), then everything it sends is echoed back until it half-closes.
//! `client ADDR BYTES [CONNS]`: opens CONNS connections (all held open at once), then on each sends BYTES
//! pseudo-random bytes while reading the echo, and checks length and CRC32 both ways. Prints one JSON line.
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
        Some("serve") => serve(args[2].parse().expect("port")),
        Some("client") => client(
            args[2].parse().expect("address"),
            args[3].parse().expect("bytes"),
            args.get(4).map(|c| c.parse().expect("connections")).unwrap_or(1),
        ),
        _ => Err("usage: mesh-testbin serve PORT | client ADDR BYTES [CONNS]".into()),
    };
    if let Err(e) = result {
        eprintln!("mesh-testbin: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn serve(port: u16) -> Result<()> {
    let socket = std::net::TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
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
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
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
    for w in workers {
        match w.join().map_err(|_| "worker panicked".into()).and_then(|r| r) {
            Ok(o) if o.sent == bytes && o.received == bytes && o.sent_crc == o.received_crc => {
                ok += 1;
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
        "{{\"connections\":{conns},\"ok\":{ok},\"bytesEachWay\":{bytes},\"serverSawPeer\":\"{}\",\"serverSawLocal\":\"{}\",\"local\":\"{}\",\"peername\":\"{}\",\"failures\":{:?}}}",
        field(|o| &o.server_saw_peer),
        field(|o| &o.server_saw_local),
        field(|o| &o.local),
        field(|o| &o.peername),
        failures.iter().take(5).collect::<Vec<_>>(),
    );
    if ok == conns { Ok(()) } else { Err(format!("{} of {conns} connections failed", conns - ok).into()) }
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
