//! nodemesh-cni driven as containerd and CRI-O drive it: through libcni, chained after Debian's real `bridge`
//! plugin with `host-local` IPAM, for conflists of CNI 0.4.0 and 1.0.0 (Debian's libcni and plugins speak up to
//! 1.0.0; 1.1.0's STATUS and GC are exercised on the plugin binary in capture.rs). Pods that start with their
//! loopback down, meshed and unmeshed pods through ADD, CHECK and DEL, an excluded namespace with no agent on
//! the node, and a meshed pod's sandbox refused until the agent is back.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_tests::cluster::libcni::cni_driver;
use mesh_tests::{Cluster, Pod, cluster};

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn enrolled(c: &Cluster, pod: &Pod) -> bool {
    c.admin(0, "/workloads").unwrap().as_array().unwrap().iter().any(|w| w["name"] == pod.name.as_str())
}

fn loopback_up(pod: &Pod) -> bool {
    let netns = format!("--net={}", mesh_tests::sys::netns_path(&pod.netns).display());
    let out = std::process::Command::new("nsenter").arg(netns).args(["ip", "link", "show", "lo"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains(",UP")
}

/// The address host-local gave the pod, from the chain's result.
fn address_of(result: &serde_json::Value) -> Ipv4Addr {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// Whether `pod`'s connection to `target` went through the agent (it connects from loopback to the agent).
fn captured(c: &Cluster, pod: &Pod, target: SocketAddr) -> bool {
    let r = c.client(pod, target, 4096, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    r.field("local").parse::<SocketAddr>().unwrap().ip() == IpAddr::from([127, 0, 0, 1])
}

#[test]
fn libcni_runs_nodemesh_cni_after_bridge_and_host_local() {
    let Some(driver) = cni_driver() else { return };
    let mut c = cluster!(1);
    let server = c.add_pod(0, "server").unwrap();
    let config = c.write_config(&[], "excludedPods: [default/outside]\n").unwrap();
    c.start_agent_with(0, &["--config", config.to_str().unwrap()]).unwrap();
    c.serve(&server, 8080).unwrap();
    let target = addr(server.ipv4, 8080);

    for version in ["0.4.0", "1.0.0"] {
        let conflist = c.write_libcni_conflist(0, version).unwrap();
        let mut pod = c.add_bare_pod(0, &format!("app-{}", version.replace('.', "")), "default").unwrap();
        assert!(!loopback_up(&pod), "a new sandbox's loopback is down");
        let add = c.libcni(&driver, "ADD", &conflist, &pod).unwrap();
        assert!(add.exit_ok, "{version}: {}", add.stdout);
        let result = add.json();
        assert_eq!(result["cniVersion"], version, "{}", add.stdout);
        pod.ipv4 = address_of(&result);
        assert_eq!(pod.ipv4.octets()[..3], [10, 244, 1], "host-local's address passed through: {}", add.stdout);
        assert!(pod.ipv4.octets()[3] >= 200, "{}", pod.ipv4);
        assert!(loopback_up(&pod), "{version}: ADD brings loopback up");
        assert!(enrolled(&c, &pod), "{version}: enrolled");
        assert!(captured(&c, &pod, target), "{version}: captured");
        let check = c.libcni(&driver, "CHECK", &conflist, &pod).unwrap();
        assert!(check.exit_ok, "{version} CHECK: {}", check.stdout);

        let del = c.libcni(&driver, "DEL", &conflist, &pod).unwrap();
        assert!(del.exit_ok, "{version} DEL: {}", del.stdout);
        assert!(!enrolled(&c, &pod), "{version}: released by DEL");
        let again = c.libcni(&driver, "DEL", &conflist, &pod).unwrap();
        assert!(again.exit_ok, "{version}: a second DEL (the runtime retries) succeeds: {}", again.stdout);
    }

    // A pod the config keeps outside the mesh: the chain succeeds, CHECK too, and nothing is captured.
    let conflist = c.write_libcni_conflist(0, "1.0.0").unwrap();
    let mut outside = c.add_bare_pod(0, "outside", "default").unwrap();
    let add = c.libcni(&driver, "ADD", &conflist, &outside).unwrap();
    assert!(add.exit_ok, "{}", add.stdout);
    outside.ipv4 = address_of(&add.json());
    assert!(!enrolled(&c, &outside));
    assert!(!captured(&c, &outside, target), "an unmeshed pod talks directly");
    assert!(c.libcni(&driver, "CHECK", &conflist, &outside).unwrap().exit_ok);
    assert!(c.libcni(&driver, "DEL", &conflist, &outside).unwrap().exit_ok);

    // No agent on the node: kube-system's pods (excluded) still get their network; a meshed pod's sandbox
    // fails with "try again later" and the runtime's DEL cleans up after it, host-local's address included.
    c.kill_agent(0).unwrap();
    let system = c.add_bare_pod(0, "coredns", "kube-system").unwrap();
    let add = c.libcni(&driver, "ADD", &conflist, &system).unwrap();
    assert!(add.exit_ok, "an excluded namespace does not need the agent: {}", add.stdout);
    assert!(c.libcni(&driver, "CHECK", &conflist, &system).unwrap().exit_ok);
    assert!(c.libcni(&driver, "DEL", &conflist, &system).unwrap().exit_ok);

    let meshed = c.add_bare_pod(0, "waits", "default").unwrap();
    let add = c.libcni(&driver, "ADD", &conflist, &meshed).unwrap();
    assert!(!add.exit_ok, "a meshed pod must not start uncaptured: {}", add.stdout);
    assert_eq!(add.error_code(), Some(11), "try again later: {}", add.stdout);
    let del = c.libcni(&driver, "DEL", &conflist, &meshed).unwrap();
    assert!(del.exit_ok, "the runtime's DEL after a failed ADD: {}", del.stdout);
    let leases = c.tmp_dir().join("libcni/ipam/k8s-pod-network");
    let held: Vec<String> = std::fs::read_dir(&leases)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("10.244."))
        .collect();
    assert!(held.is_empty(), "addresses still leased after every DEL: {held:?}");
}
