//! Policy routing inside an enrolled pod, so the agent can connect to the application *as the original client*
//! (the application sees the real peer address) and still get the replies.
//!
//! The agent's transparent socket (`IP_TRANSPARENT`, bound to the client's IP, marked [`INBOUND_MARK`]) connects
//! to the application over loopback. With `net.ipv4.tcp_fwmark_accept=1` the application's accepted socket
//! inherits that mark from the SYN, and a rule sends marked packets to a table whose only route is
//! `local default dev lo`, so the replies addressed to the client's IP are delivered back to the agent instead of
//! leaving through the pod's interface. Nothing else in the pod carries that mark, so nothing else changes.
//!
//! A refusal must come back the same way: when nothing listens on the port, the kernel answers the SYN with a
//! RST that belongs to no socket, so it has no mark to inherit and was routed out of the pod towards the real
//! client (which ignored it) while the agent waited for its connect to time out. `net.ipv4.fwmark_reflect` and
//! `net.ipv6.fwmark_reflect` give such replies the mark of the packet they answer, so the RST reaches the
//! agent at once and the caller sees "connection refused", as it would without the mesh. Only the agent's
//! packets carry a mark in the pod, so no other reply changes.

use std::io;
use std::process::Command;

use mesh_common::bpf::{INBOUND_MARK, INBOUND_ROUTE_TABLE};

/// Rule priority: ahead of `main` (32766), behind `local` (0).
const RULE_PRIORITY: &str = "100";

/// What [`install`] found: whether any of its rules was in place already (an agent taking over a pod from the one
/// before it), so that a failed enrollment removes only what it added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    Fresh,
    WasInPlace,
}

/// Brings the pod's loopback up and installs the rules and sysctls. Must run on a thread inside the pod's netns.
/// On failure nothing of it stays — unless rules were in place before (another agent's connections may use them).
///
/// The loopback first: the route below and the agent's listeners are on it, and a chained plugin can run before
/// the runtime brings it up (containerd sets it up apart from the CNI chain); every pod has it up in the end.
pub fn install(ipv4: bool, ipv6: bool) -> io::Result<Installed> {
    let mut families = Vec::new();
    for (enabled, family, default) in [(ipv4, "-4", "0.0.0.0/0"), (ipv6, "-6", "::/0")] {
        if enabled {
            families.push((family, default, rule_count(family)?));
        }
    }
    let installed =
        if families.iter().any(|(_, _, rules)| *rules > 0) { Installed::WasInPlace } else { Installed::Fresh };
    let applied = apply(ipv6, &families);
    if applied.is_err() && installed == Installed::Fresh {
        remove();
    }
    applied.map(|()| installed)
}

/// [`install`]'s steps, for `families` (flag, default route, rules in place).
fn apply(ipv6: bool, families: &[(&str, &str, usize)]) -> io::Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    for sysctl in SYSCTLS {
        // A kernel without IPv6 has no net.ipv6 tree; a pod without IPv6 addresses needs none of it.
        if ipv6 || !sysctl.starts_with("ipv6/") {
            set_sysctl(sysctl, "1")?;
        }
    }
    for &(family, default, rules) in families {
        // Route first, then exactly one rule — never removing a rule that is in place: re-installing in a pod
        // whose connections are being served (an agent taking over from the one before it) must not leave a
        // moment without them, or the application's replies leave the pod and its connections are reset.
        ip(&[family, "route", "replace", "local", default, "dev", "lo", "table", &table()])?;
        if rules == 0 {
            ip(&[family, "rule", "add", "fwmark", &mark(), "lookup", &table(), "priority", RULE_PRIORITY])?;
        }
        // Duplicates a crash left behind.
        for _ in 1..rules.min(8) {
            ip(&[family, "rule", "del", "fwmark", &mark(), "lookup", &table()])?;
        }
    }
    Ok(())
}

/// How many of our rules the family has.
fn rule_count(family: &str) -> io::Result<usize> {
    let out = Command::new("ip")
        .args([family, "rule", "show", "fwmark", &mark(), "lookup", &table()])
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `ip` (iproute2 is required): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip rule show` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count())
}

/// Removes what [`install`] added; missing pieces are fine.
pub fn remove() {
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        remove_rules(family);
        let _ = ip(&[family, "route", "del", "local", default, "dev", "lo", "table", &table()]);
    }
    for sysctl in SYSCTLS {
        let _ = set_sysctl(sysctl, "0");
    }
}

/// Under `/proc/sys/net/`: accepted sockets inherit the SYN's mark; kernel replies (RSTs) reflect it.
const SYSCTLS: [&str; 3] = ["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect", "ipv6/fwmark_reflect"];

fn set_sysctl(name: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/{name}"), value)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot set net.{} in the pod: {e}", name.replace('/', "."))))
}

fn remove_rules(family: &str) {
    // `ip rule del` removes one match per call; a bounded loop clears duplicates left by a crash.
    for _ in 0..8 {
        if ip(&[family, "rule", "del", "fwmark", &mark(), "lookup", &table()]).is_err() {
            break;
        }
    }
}

fn mark() -> String {
    format!("{INBOUND_MARK:#x}")
}

fn table() -> String {
    INBOUND_ROUTE_TABLE.to_string()
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `ip` (iproute2 is required): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
