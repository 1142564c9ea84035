//! The kernel side of capture: loading `mesh-ebpf`, attaching and pinning its programs, and the maps the agent
//! reads and writes.
//!
//! Everything is pinned under the `--bpffs` directory (`maps/`, `links/`), so capture outlives the agent
//! process: a stopped agent leaves enrolled pods captured (their connects go to listeners that are gone, so they
//! fail: fail-closed), and a restarted agent reuses the pinned maps and swaps in its own programs without a gap.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use mesh_common::bpf::{
    CaptureCounters, EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, EnrolledPod, INBOUND_MARK, IpKey, OUTBOUND_MARK, PeerKey,
    SockAddr, globals, maps, programs,
};
use mesh_common::config::CaptureConfig;

/// The compiled `mesh-ebpf` object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Linux's magic number for a bpf filesystem (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs(PathBuf),
    #[error("cgroup {0} cannot be opened (is it a cgroup v2 directory?): {1}")]
    Cgroup(PathBuf, io::Error),
    #[error("loading the eBPF object failed (kernel without BPF, BTF or cgroup-bpf support?): {}", chain(.0))]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {}", chain(.1), name = .0)]
    Program(&'static str, aya::programs::ProgramError),
    #[error("eBPF map {name}: {}", chain(.1), name = .0)]
    Map(&'static str, aya::maps::MapError),
    #[error("pinning {0}: {1}")]
    Pin(PathBuf, String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// aya's errors keep the errno in `source()`; show it, it is usually the whole story.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// Sum of the per-CPU counters the programs keep.
pub type Counters = CaptureCounters;

/// What the metrics report about the kernel side.
pub struct CaptureStats {
    pub maps: Vec<(&'static str, u64)>,
    /// Program name and its locked kernel memory in bytes.
    pub programs: Vec<(String, u64)>,
}

/// Handle on the loaded programs and pinned maps. Not `Clone`: the agent keeps one behind a mutex.
pub struct Capture {
    ebpf: Ebpf,
    links_dir: PathBuf,
    enrolled: BpfHashMap<MapData, u64, EnrolledPod>,
    orig_by_peer: BpfHashMap<MapData, PeerKey, SockAddr>,
    inbound_listeners: SockHash<MapData, IpKey>,
    pod_addrs: BpfHashMap<MapData, IpKey, u64>,
    node_addrs: BpfHashMap<MapData, IpKey, u32>,
    agent_connects: BpfHashMap<MapData, SockAddr, u32>,
    excluded_ports: BpfHashMap<MapData, u32, u32>,
    excluded_v4: LpmTrie<MapData, [u8; 4], u32>,
    excluded_v6: LpmTrie<MapData, [u8; 16], u32>,
    counters: PerCpuArray<MapData, CaptureCounters>,
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::Map(name, aya::maps::MapError::InvalidName { name: name.to_string() }))?;
    T::try_from(map).map_err(|e| CaptureError::Map(name, e))
}

pub fn is_bpffs(dir: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs into a zeroed struct with a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

impl Capture {
    /// Loads the programs (reusing maps pinned by an earlier agent) and attaches the cgroup programs to
    /// `cgroup_root`, replacing any links an earlier agent pinned.
    pub fn load(bpffs_dir: &Path, cgroup_root: &Path) -> Result<Self> {
        std::fs::create_dir_all(bpffs_dir)?;
        if !is_bpffs(bpffs_dir)? {
            return Err(CaptureError::NotBpffs(bpffs_dir.to_path_buf()));
        }
        let maps_dir = bpffs_dir.join("maps");
        let links_dir = bpffs_dir.join("links");
        std::fs::create_dir_all(&maps_dir)?;
        std::fs::create_dir_all(&links_dir)?;
        let cgroup = File::open(cgroup_root).map_err(|e| CaptureError::Cgroup(cgroup_root.to_path_buf(), e))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(globals::OUTBOUND_MARK, &OUTBOUND_MARK, true)
            .override_global(globals::INBOUND_MARK, &INBOUND_MARK, true)
            .load(EBPF_OBJECT)?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_log_forwarder) {
            tracing::warn!(error = %e, "eBPF log forwarding unavailable");
        }

        for name in [programs::CONNECT4, programs::CONNECT6, programs::GETPEERNAME4, programs::GETPEERNAME6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| CaptureError::Program(name, e))?;
            let link = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| CaptureError::Program(name, e))?;
            let link: FdLink =
                prog.take_link(link).map_err(|e| CaptureError::Program(name, e))?.try_into().map_err(
                    |e: aya::programs::links::LinkError| CaptureError::Pin(links_dir.join(name), e.to_string()),
                )?;
            replace_pin(link, &links_dir.join(name))?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, programs::SOCKOPS)?;
        sockops.load().map_err(|e| CaptureError::Program(programs::SOCKOPS, e))?;
        let link = sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| CaptureError::Program(programs::SOCKOPS, e))?;
        let link: FdLink =
            sockops.take_link(link).map_err(|e| CaptureError::Program(programs::SOCKOPS, e))?.try_into().map_err(
                |e: aya::programs::links::LinkError| CaptureError::Pin(links_dir.join("sockops"), e.to_string()),
            )?;
        replace_pin(link, &links_dir.join(programs::SOCKOPS))?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        sk_lookup.load().map_err(|e| CaptureError::Program(programs::SK_LOOKUP, e))?;

        Ok(Capture {
            enrolled: take_map(&mut ebpf, maps::ENROLLED)?,
            orig_by_peer: take_map(&mut ebpf, maps::ORIG_BY_PEER)?,
            inbound_listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            pod_addrs: take_map(&mut ebpf, maps::POD_ADDRS)?,
            node_addrs: take_map(&mut ebpf, maps::NODE_ADDRS)?,
            agent_connects: take_map(&mut ebpf, maps::AGENT_CONNECTS)?,
            excluded_ports: take_map(&mut ebpf, maps::EXCLUDED_PORTS)?,
            excluded_v4: take_map(&mut ebpf, maps::EXCLUDED_V4)?,
            excluded_v6: take_map(&mut ebpf, maps::EXCLUDED_V6)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            links_dir,
            ebpf,
        })
    }

    /// Starts capturing the pod whose netns is open as `netns`: steers its inbound connections to the
    /// listeners in `inbound` (one per pod address), then turns on outbound capture for its netns cookie.
    pub fn enroll(&mut self, netns: &File, netns_cookie: u64, inbound: &[(IpAddr, &impl AsRawFd)]) -> Result<()> {
        for (ip, listener) in inbound {
            self.inbound_listeners
                .insert(IpKey::from(*ip), listener.as_raw_fd(), 0)
                .map_err(|e| CaptureError::Map(maps::INBOUND_LISTENERS, e))?;
            self.pod_addrs
                .insert(IpKey::from(*ip), netns_cookie, 0)
                .map_err(|e| CaptureError::Map(maps::POD_ADDRS, e))?;
        }
        let prog: &mut SkLookup = program(&mut self.ebpf, programs::SK_LOOKUP)?;
        let link = prog.attach(netns).map_err(|e| CaptureError::Program(programs::SK_LOOKUP, e))?;
        let link: FdLink = prog.take_link(link).map_err(|e| CaptureError::Program(programs::SK_LOOKUP, e))?.into();
        replace_pin(link, &self.sk_lookup_pin(netns_cookie))?;
        self.enrolled
            .insert(netns_cookie, EnrolledPod::default(), 0)
            .map_err(|e| CaptureError::Map(maps::ENROLLED, e))?;
        Ok(())
    }

    /// Undoes [`Capture::enroll`]; every step tolerates state that is already gone.
    pub fn unenroll(&mut self, netns_cookie: u64, ips: &[IpAddr]) {
        if let Err(e) = self.enrolled.remove(&netns_cookie) {
            tracing::debug!(netns_cookie, error = %e, "pod was not in ENROLLED");
        }
        let pin = self.sk_lookup_pin(netns_cookie);
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            // Dropping the unpinned link detaches it.
            if let Err(e) = link.unpin() {
                tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin sk_lookup link");
            }
        }
        for ip in ips {
            let _ = self.inbound_listeners.remove(&IpKey::from(*ip));
        }
        // By cookie, not by `ips`: a netns released without a state entry has no address list, and an address
        // already handed to a newer pod stays with it.
        let addrs: Vec<IpKey> = self
            .pod_addrs
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, cookie)| *cookie == netns_cookie)
            .map(|(ip, _)| ip)
            .collect();
        for ip in addrs {
            let _ = self.pod_addrs.remove(&ip);
        }
    }

    /// Netns cookies present in `ENROLLED` (for re-adoption and cleanup).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(|k| k.ok()).collect()
    }

    /// Looks up and forgets the original destination of a connection the outbound listener accepted.
    pub fn take_original_destination(&mut self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey::new(netns_cookie, peer);
        let orig = self.orig_by_peer.get(&key, 0).ok()?;
        let _ = self.orig_by_peer.remove(&key);
        Some(orig.into())
    }

    /// Announces that the agent's socket bound to `source` is about to connect to `port` in a pod, so
    /// `sk_lookup` does not steer it back to the agent. Undone with [`Capture::forget_agent_connect`].
    pub fn announce_agent_connect(&mut self, source: SocketAddr, port: u16) -> Result<()> {
        self.agent_connects
            .insert(SockAddr::from(source), u32::from(port), 0)
            .map_err(|e| CaptureError::Map(maps::AGENT_CONNECTS, e))
    }

    pub fn forget_agent_connect(&mut self, source: SocketAddr) {
        let _ = self.agent_connects.remove(&SockAddr::from(source));
    }

    /// Makes `NODE_ADDRS` hold exactly `addrs`.
    pub fn set_node_addresses(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let want: HashSet<IpKey> = addrs.iter().map(|a| IpKey::from(*a)).collect();
        let have: Vec<IpKey> = self.node_addrs.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = self.node_addrs.remove(k);
        }
        for k in &want {
            self.node_addrs.insert(k, 1, 0).map_err(|e| CaptureError::Map(maps::NODE_ADDRS, e))?;
        }
        Ok(())
    }

    /// Makes the exclusion maps match `capture`.
    pub fn set_exclusions(&mut self, capture: &CaptureConfig) -> Result<()> {
        let mut ports: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for p in &capture.exclude_outbound_ports {
            *ports.entry(u32::from(*p)).or_default() |= EXCLUDE_OUTBOUND;
        }
        for p in &capture.exclude_inbound_ports {
            *ports.entry(u32::from(*p)).or_default() |= EXCLUDE_INBOUND;
        }
        let stale: Vec<u32> =
            self.excluded_ports.keys().filter_map(|k| k.ok()).filter(|k| !ports.contains_key(k)).collect();
        for k in stale {
            let _ = self.excluded_ports.remove(&k);
        }
        for (port, flags) in &ports {
            self.excluded_ports.insert(port, flags, 0).map_err(|e| CaptureError::Map(maps::EXCLUDED_PORTS, e))?;
        }

        let stale_v4: Vec<LpmKey<[u8; 4]>> = self.excluded_v4.keys().filter_map(|k| k.ok()).collect();
        for k in stale_v4 {
            let _ = self.excluded_v4.remove(&k);
        }
        let stale_v6: Vec<LpmKey<[u8; 16]>> = self.excluded_v6.keys().filter_map(|k| k.ok()).collect();
        for k in stale_v6 {
            let _ = self.excluded_v6.remove(&k);
        }
        for net in &capture.exclude_outbound_cidrs {
            match net.trunc() {
                IpNet::V4(n) => self
                    .excluded_v4
                    .insert(&LpmKey::new(u32::from(n.prefix_len()), n.network().octets()), 1, 0)
                    .map_err(|e| CaptureError::Map(maps::EXCLUDED_V4, e))?,
                IpNet::V6(n) => self
                    .excluded_v6
                    .insert(&LpmKey::new(u32::from(n.prefix_len()), n.network().octets()), 1, 0)
                    .map_err(|e| CaptureError::Map(maps::EXCLUDED_V6, e))?,
            }
        }
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        let mut sum = CaptureCounters::default();
        if let Ok(values) = self.counters.get(&0, 0) {
            for c in values.iter() {
                sum.outbound_redirected += c.outbound_redirected;
                sum.outbound_skipped_excluded += c.outbound_skipped_excluded;
                sum.inbound_steered += c.inbound_steered;
                sum.inbound_no_listener += c.inbound_no_listener;
                sum.orig_dst_recorded += c.orig_dst_recorded;
            }
        }
        sum
    }

    /// Entries in the small maps (the per-connection ones are left out: walking them would hold the capture
    /// lock for too long) and the kernel memory of each program.
    pub fn stats(&self) -> CaptureStats {
        let count = |keys: usize| keys as u64;
        let maps = vec![
            (maps::ENROLLED, count(self.enrolled.keys().count())),
            (maps::NODE_ADDRS, count(self.node_addrs.keys().count())),
            (maps::POD_ADDRS, count(self.pod_addrs.keys().count())),
            (maps::AGENT_CONNECTS, count(self.agent_connects.keys().count())),
            (maps::EXCLUDED_PORTS, count(self.excluded_ports.keys().count())),
        ];
        let programs = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), u64::from(p.info().ok()?.memory_locked().ok()?))))
            .collect();
        CaptureStats { maps, programs }
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.links_dir.join(format!("{}-{netns_cookie}", programs::SK_LOOKUP))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program(name, aya::programs::ProgramError::NotLoaded))?;
    prog.try_into().map_err(|e| CaptureError::Program(name, e))
}

/// Pins `link` at `path`. A link an earlier agent pinned there stays attached until the new one is in place,
/// so capture has no gap during an agent restart or upgrade.
fn replace_pin(link: FdLink, path: &Path) -> Result<()> {
    let previous = match PinnedLink::from_pin(path) {
        Ok(old) => Some(old.unpin().map_err(|e| CaptureError::Pin(path.to_path_buf(), e.to_string()))?),
        Err(_) => {
            let _ = std::fs::remove_file(path);
            None
        }
    };
    link.pin(path).map_err(|e| CaptureError::Pin(path.to_path_buf(), e.to_string()))?;
    drop(previous);
    Ok(())
}

/// Removes every pin under `bpffs_dir` (links first, which detaches the programs), then the directory.
pub fn remove_pins(bpffs_dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = bpffs_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
        std::fs::remove_dir(&dir)?;
    }
    match std::fs::remove_dir(bpffs_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// Forwards records of the programs' aya-log ring buffer into `tracing` (target `bpf`).
fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged, for as long as it lives,
        // and the AsyncFd owns the logger.
        let registered =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let Ok(mut fd) = registered else { return };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
