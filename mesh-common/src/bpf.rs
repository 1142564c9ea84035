//! Map keys, values and constants shared by `mesh-ebpf` and the agent.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields: the kernel hashes map keys bytewise, so
//! implicit padding (which Rust may leave uninitialised) would make equal keys miss each other.
//! Addresses are stored as 16 raw bytes in network order (IPv4 in the first four); ports in host order.

/// The agent's in-pod outbound listener; `connect4/6` rewrite captured connects here.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's in-pod inbound listener; `sk_lookup` steers captured inbound connections here.
pub const INBOUND_PORT: u16 = 15006;
/// Reserved for the mTLS (HBONE) tunnel listener.
pub const HBONE_PORT: u16 = 15008;

/// `SO_MARK` of the agent's upstream sockets for outbound traffic: `connect4/6` leave them alone.
pub const OUTBOUND_MARK: u32 = 0x539;
/// `SO_MARK` of the agent's transparent sockets towards a pod's application. Besides being skipped by
/// `connect4/6`, it selects the pod-local routing table that brings the application's replies (addressed to
/// the original client's IP) back to the agent; see docs/ARCHITECTURE.md.
pub const INBOUND_MARK: u32 = 0x53a;
/// Routing table used in enrolled pods for [`INBOUND_MARK`]ed traffic.
pub const INBOUND_ROUTE_TABLE: u32 = 0x53a;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Flags in [`EXCLUDED_PORTS`](self) values.
pub const EXCLUDE_OUTBOUND: u32 = 1;
pub const EXCLUDE_INBOUND: u32 = 2;

/// Map names, shared so user space never spells them differently from the kernel side.
pub mod maps {
    /// netns cookie (u64) -> [`super::EnrolledPod`]: which network namespaces are captured.
    pub const ENROLLED: &str = "ENROLLED";
    /// socket cookie (u64) -> [`super::SockAddr`]: what the application dialled, for `getpeername`.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// [`super::PeerKey`] -> [`super::SockAddr`]: the same, keyed by what the agent's `accept()` sees.
    pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
    /// port (u32, host order) -> EXCLUDE_* flags.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// LPM trie of IPv4 destinations never captured.
    pub const EXCLUDED_V4: &str = "EXCLUDED_V4";
    /// LPM trie of IPv6 destinations never captured.
    pub const EXCLUDED_V6: &str = "EXCLUDED_V6";
    /// [`super::IpKey`] -> u32: the node's own addresses; inbound connections from them are not captured.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// SOCKHASH [`super::IpKey`] (a pod IP) -> the agent's inbound listener in that pod.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// [`super::IpKey`] -> netns cookie (u64): the addresses of enrolled pods, the only ones `sk_lookup` steers.
    /// Kept apart from `INBOUND_LISTENERS` because a sockhash entry vanishes with its socket: while the agent
    /// is down the pod's addresses must still be known (and refused), while loopback and any other address
    /// the pod has are left to the kernel.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// [`super::SockAddr`] (source of one of the agent's own connections to a pod's application) -> the
    /// destination port it connects to. `sk_lookup` lets exactly these through instead of steering them back.
    pub const AGENT_CONNECTS: &str = "AGENT_CONNECTS";
    /// u32 index 0 -> [`super::CaptureCounters`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names (the eBPF functions), shared the same way.
pub mod programs {
    pub const CONNECT4: &str = "nodemesh_connect4";
    pub const CONNECT6: &str = "nodemesh_connect6";
    pub const GETPEERNAME4: &str = "nodemesh_getpeername4";
    pub const GETPEERNAME6: &str = "nodemesh_getpeername6";
    pub const SOCKOPS: &str = "nodemesh_sockops";
    pub const SK_LOOKUP: &str = "nodemesh_sk_lookup";
}

/// Names of the read-only globals the loader patches.
pub mod globals {
    pub const OUTBOUND_MARK: &str = "NODEMESH_OUTBOUND_MARK";
    pub const INBOUND_MARK: &str = "NODEMESH_INBOUND_MARK";
}

/// An IP address and port as the kernel programs keep them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

/// Key of `ORIG_BY_PEER`: the client end of a captured connection as the agent's `accept()` reports it,
/// qualified by the network namespace, because every pod has its own 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub netns_cookie: u64,
    pub peer: SockAddr,
    pub _pad: u32,
}

/// An address without port: pod IPs (`INBOUND_LISTENERS`) and node addresses (`NODE_ADDRS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u8; 16],
    pub family: u16,
    pub _pad: u16,
}

/// Value of `ENROLLED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledPod {
    /// Reserved for per-pod capture options; 0 today.
    pub flags: u32,
}

/// Counters the programs keep, for `/stats` and metrics. Plain (non-atomic) adds are fine: these are
/// diagnostics, and a lost increment under contention does not matter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureCounters {
    pub outbound_redirected: u64,
    pub outbound_skipped_excluded: u64,
    pub inbound_steered: u64,
    pub inbound_no_listener: u64,
    pub orig_dst_recorded: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and byte arrays, with every padding
    // byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for CaptureCounters {}

    fn ip_bytes(ip: IpAddr) -> ([u8; 16], u16) {
        // v4-mapped IPv6 addresses are the same endpoint as their IPv4 form; the kernel side stores them so.
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&v4.octets());
                (addr, AF_INET)
            }
            IpAddr::V6(v6) => (v6.octets(), AF_INET6),
        }
    }

    fn bytes_ip(addr: [u8; 16], family: u16) -> IpAddr {
        if family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(addr))
        }
    }

    impl From<SocketAddr> for SockAddr {
        fn from(sa: SocketAddr) -> Self {
            let (addr, family) = ip_bytes(sa.ip());
            SockAddr { addr, port: sa.port(), family }
        }
    }

    impl From<SockAddr> for SocketAddr {
        fn from(sa: SockAddr) -> Self {
            SocketAddr::new(bytes_ip(sa.addr, sa.family), sa.port)
        }
    }

    impl From<IpAddr> for IpKey {
        fn from(ip: IpAddr) -> Self {
            let (addr, family) = ip_bytes(ip);
            IpKey { addr, family, _pad: 0 }
        }
    }

    impl From<IpKey> for IpAddr {
        fn from(k: IpKey) -> Self {
            bytes_ip(k.addr, k.family)
        }
    }

    impl PeerKey {
        pub fn new(netns_cookie: u64, peer: SocketAddr) -> Self {
            PeerKey { netns_cookie, peer: peer.into(), _pad: 0 }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn layouts_match_what_the_kernel_side_assumes() {
            assert_eq!(core::mem::size_of::<SockAddr>(), 20);
            assert_eq!(core::mem::size_of::<PeerKey>(), 32);
            assert_eq!(core::mem::size_of::<IpKey>(), 20);
        }

        #[test]
        fn mapped_ipv6_is_stored_as_ipv4() {
            let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
            let plain: SocketAddr = "10.1.2.3:80".parse().unwrap();
            assert_eq!(SockAddr::from(mapped), SockAddr::from(plain));
            assert_eq!(SocketAddr::from(SockAddr::from(mapped)), plain);
            let v6: SocketAddr = "[fd00::1]:443".parse().unwrap();
            assert_eq!(SocketAddr::from(SockAddr::from(v6)), v6);
        }
    }
}
