//! Facts about the node the agent runs on: its addresses and where cgroup v2 is mounted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// Every address configured in the agent's (the node's) network namespace, loopback excluded. Kubelet probes
/// come from one of these, so inbound capture lets them through.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list; it is walked read-only and freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: the family field tells which sockaddr type the pointer holds.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            let ip = match family {
                libc::AF_INET => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)))
                }
                _ => None,
            };
            if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list allocated above, once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Mount point of the cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            // Fields: id parent major:minor root mountpoint options ... - fstype source superoptions
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted"))
}

/// Raises the open-file limit to the hard limit: every proxied connection holds two sockets.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let dir = cgroup2_mount().unwrap();
        assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
    }

    #[test]
    fn lists_addresses_without_loopback() {
        assert!(local_addresses().unwrap().iter().all(|ip| !ip.is_loopback()));
    }
}
