//! nodemesh kernel programs.
//!
//! * `connect4/6` (cgroup, node root): an enrolled pod's TCP `connect()` is rewritten to the agent's in-pod
//!   outbound listener; what the application dialled is kept under the socket cookie.
//! * `getpeername4/6` (cgroup, node root): the application keeps seeing the address it dialled.
//! * `sockops` (cgroup, node root): once the captured connection is established, its original destination is
//!   re-keyed by (netns cookie, client address) — exactly what the agent's `accept()` returns — and the entries
//!   are dropped again when the socket closes.
//! * `sk_lookup` (one link per enrolled pod netns): TCP connections arriving for the pod's own addresses are
//!   handed to the agent's in-pod inbound listener, except for the agent's ports and the node's own addresses.
//!
//! Nothing here ever refuses a connect: on any doubt a program leaves the socket alone.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_addr, bpf_sock_ops},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use mesh_common::bpf::{
    AF_INET, AF_INET6, CaptureCounters, EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, EnrolledPod, HBONE_PORT, INBOUND_PORT,
    IpKey, OUTBOUND_PORT, PeerKey, SockAddr,
};

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
const TCP_CLOSE: u32 = 7;

/// Patched by the loader; these defaults match mesh-common's constants.
#[unsafe(no_mangle)]
static NODEMESH_OUTBOUND_MARK: u32 = 0x539;
#[unsafe(no_mangle)]
static NODEMESH_INBOUND_MARK: u32 = 0x53a;

#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(4096, 0);
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);
#[map]
static ORIG_BY_PEER: LruHashMap<PeerKey, SockAddr> = LruHashMap::pinned(65536, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::pinned(1024, 0);
#[map]
static EXCLUDED_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(1024, 0);
#[map]
static EXCLUDED_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(1024, 0);
#[map]
static NODE_ADDRS: HashMap<IpKey, u32> = HashMap::pinned(256, 0);
#[map]
static INBOUND_LISTENERS: SockHash<IpKey> = SockHash::pinned(8192, 0);
#[map]
static POD_ADDRS: HashMap<IpKey, u64> = HashMap::pinned(8192, 0);
#[map]
static AGENT_CONNECTS: HashMap<SockAddr, u32> = HashMap::pinned(65536, 0);
#[map]
static COUNTERS: PerCpuArray<CaptureCounters> = PerCpuArray::pinned(1, 0);

#[inline(always)]
fn count(f: impl FnOnce(&mut CaptureCounters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, valid for the duration of this program run.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn global(v: &'static u32) -> u32 {
    // SAFETY: the loader may rewrite the value in .rodata; a volatile read keeps the compiler from folding it.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// IPv4 destinations (plain or v4-mapped) are checked against the IPv4 exclusions.
#[inline(always)]
fn v4_of(dst: &SockAddr) -> Option<[u8; 4]> {
    if dst.family == AF_INET {
        Some([dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]])
    } else if is_v4_mapped(&dst.addr) {
        Some([dst.addr[12], dst.addr[13], dst.addr[14], dst.addr[15]])
    } else {
        None
    }
}

#[inline(always)]
fn port_excluded(port: u16, flag: u32) -> bool {
    // SAFETY: plain value read from a hash map.
    unsafe { EXCLUDED_PORTS.get(&(port as u32)) }.is_some_and(|f| f & flag != 0)
}

#[inline(always)]
fn outbound_excluded(dst: &SockAddr) -> bool {
    if port_excluded(dst.port, EXCLUDE_OUTBOUND) {
        return true;
    }
    match v4_of(dst) {
        Some(v4) => v4[0] == 127 || EXCLUDED_V4.get(&Key::new(32, v4)).is_some(),
        None => {
            let loopback = dst.addr[..15].iter().all(|b| *b == 0) && dst.addr[15] == 1;
            loopback || EXCLUDED_V6.get(&Key::new(128, dst.addr)).is_some()
        }
    }
}

#[inline(always)]
fn ip6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: ctx fields must be read with 4-byte loads; read_volatile keeps them that way.
        let w = unsafe { core::ptr::read_volatile(&words[i]) }.to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn ip4_sockaddr(ip_ne: u32, port: u16) -> SockAddr {
    let b = ip_ne.to_ne_bytes();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&b);
    SockAddr { addr, port, family: AF_INET }
}

/// Shared decision for connect4/connect6: should this connect be captured?
#[inline(always)]
fn should_capture(ctx: &SockAddrContext, dst: &SockAddr) -> bool {
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return false;
    }
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read from a hash map.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return false;
    }
    // SAFETY: `sk` is always set for connect hooks; checked for null anyway.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if !sk.is_null() {
        let mark = unsafe { (*sk).mark };
        if mark != 0 && (mark == global(&NODEMESH_OUTBOUND_MARK) || mark == global(&NODEMESH_INBOUND_MARK)) {
            return false;
        }
    }
    if outbound_excluded(dst) {
        count(|c| c.outbound_skipped_excluded += 1);
        return false;
    }
    true
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &SockAddr) -> bool {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, dst, 0).is_err() {
        warn!(ctx, "nodemesh: cannot record original destination; connect left alone");
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn nodemesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let dst = ip4_sockaddr(sa.user_ip4, u16::from_be(sa.user_port as u16));
    if should_capture(&ctx, &dst) && remember(&ctx, &dst) {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        sa.user_port = OUTBOUND_PORT.to_be() as u32;
        count(|c| c.outbound_redirected += 1);
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn nodemesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let addr = ip6_bytes(&sa.user_ip6);
    let dst = SockAddr { addr, port: u16::from_be(sa.user_port as u16), family: AF_INET6 };
    if should_capture(&ctx, &dst) && remember(&ctx, &dst) {
        // A v4-mapped destination stays IPv4 on the wire, so it goes to the IPv4 listener.
        let target: [u32; 4] = if is_v4_mapped(&addr) {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])]
        } else {
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        };
        let mut i = 0;
        while i < 4 {
            // SAFETY: ctx fields must be written with 4-byte stores.
            unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], target[i]) };
            i += 1;
        }
        sa.user_port = OUTBOUND_PORT.to_be() as u32;
        count(|c| c.outbound_redirected += 1);
    }
    1
}

#[inline(always)]
fn orig_for_socket(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value copied out of the map.
    unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn nodemesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_for_socket(&ctx) {
        if orig.family == AF_INET {
            // SAFETY: the context pointer is valid for the program run.
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
            sa.user_port = orig.port.to_be() as u32;
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn nodemesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_for_socket(&ctx) {
        if orig.family == AF_INET6 {
            // SAFETY: the context pointer is valid for the program run.
            let sa = unsafe { &mut *ctx.sock_addr };
            let mut i = 0;
            while i < 4 {
                let w = u32::from_ne_bytes([
                    orig.addr[i * 4],
                    orig.addr[i * 4 + 1],
                    orig.addr[i * 4 + 2],
                    orig.addr[i * 4 + 3],
                ]);
                // SAFETY: ctx fields must be written with 4-byte stores.
                unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], w) };
                i += 1;
            }
            sa.user_port = orig.port.to_be() as u32;
        }
    }
    1
}

/// The captured socket's own address, which is the peer address the agent's `accept()` returns.
/// v4-mapped addresses are folded to IPv4 because the agent's IPv4 listener accepted them.
#[inline(always)]
fn local_end(ops: &bpf_sock_ops) -> SockAddr {
    let port = ops.local_port as u16;
    if ops.family == AF_INET as u32 {
        return ip4_sockaddr(ops.local_ip4, port);
    }
    let addr = ip6_bytes(&ops.local_ip6);
    if is_v4_mapped(&addr) {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&addr[12..16]);
        return SockAddr { addr: v4, port, family: AF_INET };
    }
    SockAddr { addr, port, family: AF_INET6 }
}

#[inline(always)]
fn normalized(orig: SockAddr) -> SockAddr {
    if orig.family == AF_INET6 && is_v4_mapped(&orig.addr) {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&orig.addr[12..16]);
        return SockAddr { addr: v4, port: orig.port, family: AF_INET };
    }
    orig
}

#[sock_ops]
pub fn nodemesh_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    // SAFETY: helper calls with the program's own context; the context pointer is valid for the run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let ops = unsafe { &*ctx.ops };
    let key = PeerKey { netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }, peer: local_end(ops), _pad: 0 };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if ORIG_BY_PEER.insert(&key, &normalized(orig), 0).is_ok() {
            count(|c| c.orig_dst_recorded += 1);
        }
        // Ask for state changes so both entries go away with the socket instead of waiting for LRU eviction.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if ctx.arg(1) == TCP_CLOSE {
        let _ = ORIG_BY_PEER.remove(&key);
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    1
}

#[sk_lookup]
pub fn nodemesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program run.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let port = l.local_port as u16;
    if port == OUTBOUND_PORT || port == INBOUND_PORT || port == HBONE_PORT || port_excluded(port, EXCLUDE_INBOUND) {
        return SK_PASS;
    }
    let (local, remote) = if l.family == AF_INET as u32 {
        let (local, remote) = (ip4_sockaddr(l.local_ip4, 0), ip4_sockaddr(l.remote_ip4, 0));
        (IpKey { addr: local.addr, family: AF_INET, _pad: 0 }, IpKey { addr: remote.addr, family: AF_INET, _pad: 0 })
    } else {
        (
            IpKey { addr: ip6_bytes(&l.local_ip6), family: AF_INET6, _pad: 0 },
            IpKey { addr: ip6_bytes(&l.remote_ip6), family: AF_INET6, _pad: 0 },
        )
    };
    // Only the enrolled pods' own addresses are steered: loopback (containers of one pod talking to each
    // other) and any address the agent did not enroll are the kernel's business, as in a pod outside the mesh.
    // SAFETY: plain value read from a hash map.
    if unsafe { POD_ADDRS.get(&local) }.is_none() {
        return SK_PASS;
    }
    // The agent's own connection to the application (made transparently, as the client): let it through.
    // `ingress_ifindex` cannot tell it apart: for local traffic the kernel reports the address's device.
    let source = SockAddr { addr: remote.addr, port: u16::from_be(l.remote_port), family: remote.family };
    // SAFETY: plain value read from a hash map.
    if unsafe { AGENT_CONNECTS.get(&source) }.is_some_and(|p| *p == l.local_port) {
        return SK_PASS;
    }
    // Kubelet probes come from the node's own address and must reach the application even without the agent.
    // SAFETY: plain value read from a hash map.
    if unsafe { NODE_ADDRS.get(&remote) }.is_some() {
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(|c| c.inbound_steered += 1);
            SK_PASS
        }
        Err(_) => {
            // This program is attached only to enrolled pods: without the agent's listener the connection is
            // refused rather than let past policy (fail-closed, like outbound).
            count(|c| c.inbound_no_listener += 1);
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
