//! Captures every frame in a network namespace (AF_PACKET, all interfaces) so tests can check what crossed
//! the wire — e.g. that a plaintext marker never appears between nodes.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// Stop capturing beyond this much: enough to see a marker, bounded memory.
const MAX_CAPTURE: usize = 256 * 1024 * 1024;

pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Vec<Vec<u8>>>>>,
}

impl Sniffer {
    pub fn start(netns: &str) -> Result<Sniffer> {
        let ns = File::open(crate::sys::netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> std::io::Result<Vec<Vec<u8>>> {
            // SAFETY: plain syscalls on fds this thread owns; buffers are sized and passed with their lengths.
            unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
                if fd < 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
                let rcvbuf: libc::c_int = 32 * 1024 * 1024;
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&raw const rcvbuf).cast(), 4);
                let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let _ = ready_tx.send(Ok(()));
                let (mut frames, mut captured) = (Vec::new(), 0);
                let mut buf = vec![0u8; 65536];
                while !flag.load(Ordering::Acquire) {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 && captured < MAX_CAPTURE {
                        frames.push(buf[..n as usize].to_vec());
                        captured += n as usize;
                    }
                }
                libc::close(fd);
                Ok(frames)
            }
        });
        ready_rx.recv().context("sniffer thread died")?.map_err(anyhow::Error::msg)?;
        Ok(Sniffer { stop, thread: Some(thread) })
    }

    /// Stops and returns every byte captured (frames concatenated).
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.finish_frames()?.concat())
    }

    /// Stops and returns the captured Ethernet frames.
    pub fn finish_frames(mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().context("already finished")?;
        Ok(thread.join().map_err(|_| anyhow::anyhow!("sniffer panicked"))??)
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// One TCP segment seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// SYN without ACK: the segment opening a connection.
    pub opening: bool,
}

/// The TCP segments among `frames` (Ethernet, IPv4 or IPv6).
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<TcpSegment> {
    let mut segments = Vec::new();
    for frame in frames {
        let Some(ethertype) = frame.get(12..14) else { continue };
        let (src, dst, tcp): (IpAddr, IpAddr, &[u8]) = match (ethertype, frame.get(14..)) {
            ([0x08, 0x00], Some(ip)) if ip.len() >= 20 && ip[9] == libc::IPPROTO_TCP as u8 => {
                let header = usize::from(ip[0] & 0x0f) * 4;
                let addr = |at: usize| IpAddr::from([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
                (addr(12), addr(16), ip.get(header..).unwrap_or_default())
            }
            ([0x86, 0xdd], Some(ip)) if ip.len() >= 40 && ip[6] == libc::IPPROTO_TCP as u8 => {
                let addr = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap_or_default());
                (addr(8), addr(24), &ip[40..])
            }
            _ => continue,
        };
        if tcp.len() < 14 {
            continue;
        }
        let (syn, ack) = (tcp[13] & 0x02 != 0, tcp[13] & 0x10 != 0);
        segments.push(TcpSegment {
            src,
            dst,
            src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
            dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
            opening: syn && !ack,
        });
    }
    segments
}
