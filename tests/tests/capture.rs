//! End-to-end capture tests on the real kernel: network-namespace nodes and pods, real agents, the real CNI
//! plugin, real TCP. They need root; without it they are skipped locally and fail in CI (CI=true).

use std::net::IpAddr;

use mesh_tests::{Cluster, Pod};
use mesh_tests::{addr, cluster, ip_of};

const MIB: u64 = 1024 * 1024;

/// Pods `client` and `server` on the given nodes, agents started (plain L4: no CA), both enrolled, server
/// listening on 8080.
fn enrolled_pair(c: &mut Cluster, client_node: usize, server_node: usize) -> (Pod, Pod) {
    let client = c.add_pod(client_node, "client").unwrap();
    let server = c.add_pod(server_node, "server").unwrap();
    for node in 0..c.nodes.len() {
        c.start_agent(node).unwrap();
    }
    c.enroll(&client).unwrap();
    c.enroll(&server).unwrap();
    c.serve(&server, 8080).unwrap();
    (client, server)
}

/// The TCP metric labels of `pod`'s side of a connection: the source reporter for what it opened, the
/// destination reporter for what it accepted.
fn pod_labels<'a>(pod: &'a Pod, direction: &'a str) -> [(&'a str, &'a str); 2] {
    match direction {
        "outbound" => [("reporter", "source"), ("source_workload", pod.name.as_str())],
        _ => [("reporter", "destination"), ("destination_workload", pod.name.as_str())],
    }
}

/// An enrolled pod on node 1 talks to an enrolled pod on node 2; both agents carry it.
#[test]
fn enrolled_pods_on_two_nodes_talk_through_both_agents() {
    let mut c = cluster!(2);
    let (client, server) = enrolled_pair(&mut c, 0, 1);

    let r = c.client(&client, addr(server.ipv4, 8080), 64 * MIB, 1).unwrap();
    assert!(r.success, "transfer failed: {:?} {}", r.json, r.stderr);
    assert_eq!(r.ok_connections(), 1, "64 MiB each way must arrive intact: {:?}", r.json);
    // The application sees what it dialled; its socket really went to the agent's in-pod listener.
    assert_eq!(r.field("peername"), format!("{}:8080", server.ipv4));
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]));
    // The server sees the client pod's own IP, although the connection came through two agents.
    assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv4));

    let out = pod_labels(&client, "outbound");
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &out).unwrap(), 1.0);
    assert!(c.metric(0, "nodemesh_tcp_sent_bytes_total", &out).unwrap() >= (64 * MIB) as f64);
    assert!(c.metric(0, "nodemesh_tcp_received_bytes_total", &out).unwrap() >= (64 * MIB) as f64);
    let inb = pod_labels(&server, "inbound");
    assert_eq!(c.metric(1, "nodemesh_tcp_connections_opened_total", &inb).unwrap(), 1.0);
    assert!(c.metric(1, "nodemesh_tcp_received_bytes_total", &inb).unwrap() >= (64 * MIB) as f64);

    let workloads = c.admin(0, "/workloads").unwrap();
    let listed = workloads.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{workloads}");
    assert_eq!(listed[0]["name"], "client");
    assert!(listed[0]["netnsCookie"].as_u64().unwrap() > 0);
}

/// A pod on the same node that is not enrolled keeps talking directly.
#[test]
fn pod_that_is_not_enrolled_is_untouched() {
    let mut c = cluster!(1);
    let enrolled = c.add_pod(0, "meshed").unwrap();
    let plain = c.add_pod(0, "plain").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    c.start_agent(0).unwrap();
    c.enroll(&enrolled).unwrap();
    c.serve(&server, 8080).unwrap();

    let r = c.client(&plain, addr(server.ipv4, 8080), MIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    // Direct: the server saw exactly the client's own socket address.
    assert_eq!(r.field("serverSawPeer"), r.field("local"));
    assert_eq!(ip_of(&r.field("local")), IpAddr::from(plain.ipv4));
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &[("source_workload", "plain")]).unwrap(), 0.0);
    assert_eq!(c.metric(0, "nodemesh_capture_events_total", &[("event", "outbound_redirected")]).unwrap(), 0.0);

    // Same node, same server: the enrolled pod is captured.
    let r = c.client(&enrolled, addr(server.ipv4, 8080), MIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(c.metric(0, "nodemesh_capture_events_total", &[("event", "outbound_redirected")]).unwrap(), 1.0);
}

/// Inbound connections to an enrolled pod go through the agent; those from the node's own address do not.
#[test]
fn inbound_is_captured_except_from_the_node() {
    let mut c = cluster!(1);
    let server = c.add_pod(0, "server").unwrap();
    let client = c.add_pod(0, "client").unwrap();
    c.start_agent(0).unwrap();
    c.enroll(&server).unwrap();
    c.serve(&server, 8080).unwrap();
    let inbound = pod_labels(&server, "inbound");

    let r = c.client(&client, addr(server.ipv4, 8080), MIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &inbound).unwrap(), 1.0);
    // Transparent towards the application: it sees the real client address (not the agent's).
    assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv4));
    assert_ne!(r.field("serverSawPeer"), r.field("local"), "a proxied connection has its own source port");

    let probe = c.client_from_node(0, addr(server.ipv4, 8080), 4096).unwrap();
    assert!(probe.success, "{:?} {}", probe.json, probe.stderr);
    assert_eq!(ip_of(&probe.field("serverSawPeer")), IpAddr::from(c.nodes[0].pod_gateway));
    assert_eq!(probe.field("serverSawPeer"), probe.field("local"), "node traffic must reach the app directly");
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &inbound).unwrap(), 1.0);
}

/// The agent's own upstream connections (outbound, marked) and its transparent connections to the application
/// are not captured a second time: each client connection is redirected and steered exactly once.
#[test]
fn agent_connections_are_not_captured_again() {
    let mut c = cluster!(1);
    let (client, server) = enrolled_pair(&mut c, 0, 0);
    for _ in 0..5 {
        let r = c.client(&client, addr(server.ipv4, 8080), 64 * 1024, 1).unwrap();
        assert!(r.success, "{:?} {}", r.json, r.stderr);
        assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv4));
    }
    let event = |e| c.metric(0, "nodemesh_capture_events_total", &[("event", e)]).unwrap();
    assert_eq!(event("outbound_redirected"), 5.0);
    assert_eq!(event("inbound_steered"), 5.0);
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &[("reporter", "source")]).unwrap(), 5.0);
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &[("reporter", "destination")]).unwrap(), 5.0);
    assert_eq!(c.metric(0, "nodemesh_original_destination_missing_total", &[]).unwrap(), 0.0);
}

#[test]
fn cni_add_and_del_turn_capture_on_and_off() {
    let mut c = cluster!(1);
    let pod = c.add_pod(0, "app").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    c.start_agent(0).unwrap();
    c.serve(&server, 8080).unwrap();
    let target = addr(server.ipv4, 8080);

    let add = c.cni("ADD", &pod).unwrap();
    assert!(add.exit_ok, "{}", add.stdout);
    // A chained plugin passes the previous result through.
    assert_eq!(add.json()["ips"][0]["address"], format!("{}/24", pod.ipv4));
    assert!(c.cni("CHECK", &pod).unwrap().exit_ok);
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 1);
    let r = c.client(&pod, target, 4096, 1).unwrap();
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]), "{:?}", r.json);

    let del = c.cni("DEL", &pod).unwrap();
    assert!(del.exit_ok && del.stdout.is_empty(), "{}", del.stdout);
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 0);
    let r = c.client(&pod, target, 4096, 1).unwrap();
    assert!(r.success);
    assert_eq!(r.field("serverSawPeer"), r.field("local"), "after DEL the pod talks directly");
    let check = c.cni("CHECK", &pod).unwrap();
    assert!(!check.exit_ok);
    assert_eq!(check.error_code(), Some(3));
    assert!(c.cni("DEL", &pod).unwrap().exit_ok, "DEL is idempotent");
    // Pins for the pod are gone with it.
    let pins = std::fs::read_dir(c.nodes[0].bpffs.join("links")).unwrap().count();
    assert_eq!(pins, 5, "only the five node-wide links stay pinned");
}

/// `ip ARGS` inside `pod`'s network namespace; its standard output.
fn ip_in(pod: &Pod, args: &[&str]) -> String {
    let netns = format!("--net={}", mesh_tests::sys::netns_path(&pod.netns).display());
    let out = std::process::Command::new("nsenter").arg(&netns).arg("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod whose loopback is still down when its ADD comes (a chained plugin can run before the runtime brings it
/// up) is enrolled all the same — it failed with "cannot listen … is its loopback up?" before. An ADD that fails
/// after the capture routing went in (a port the agent listens on is taken in the pod) leaves the pod as it
/// found it: no fwmark rule, no route in the agent's table (the rule stayed behind before), nothing captured.
#[test]
fn cni_add_with_loopback_down_enrolls_and_a_failed_add_leaves_nothing_behind() {
    let mut c = cluster!(1);
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let taken = c.add_pod(0, "taken").unwrap();
    c.start_agent(0).unwrap();
    c.serve(&server, 8080).unwrap();
    ip_in(&client, &["link", "set", "lo", "down"]);
    c.enroll(&client).unwrap();
    assert!(ip_in(&client, &["link", "show", "lo"]).contains("UP"), "loopback brought up");
    let r = c.client(&client, addr(server.ipv4, 8080), 4096, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]), "captured: {:?}", r.json);

    // The application holds the agent's outbound port: the ADD fails after routing was installed.
    c.serve(&taken, mesh_common::bpf::OUTBOUND_PORT).unwrap();
    let add = c.cni("ADD", &taken).unwrap();
    assert!(!add.exit_ok, "{}", add.stdout);
    let table = mesh_common::bpf::INBOUND_ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        let rules = ip_in(&taken, &[family, "rule", "show"]);
        assert!(!rules.contains(&format!("lookup {table}")), "{family} rules left behind:\n{rules}");
        let routes = ip_in(&taken, &[family, "route", "show", "table", &table]);
        assert!(routes.trim().is_empty(), "{family} routes left behind:\n{routes}");
    }
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 1, "only the client is enrolled");
}

/// What a CNI 1.1 runtime (containerd 2, CRI-O) asks besides ADD and DEL, through the real plugin binary: STATUS
/// succeeds while the agent takes pods and says "not available" (50) when it is down; a pod the config keeps
/// outside the mesh passes CHECK after its ADD (it failed with "not captured" before) and is not captured; GC
/// collects nothing; and every answer is in the configuration's version.
#[test]
fn cni_1_1_status_gc_and_check_of_a_pod_outside_the_mesh() {
    let mut c = cluster!(1);
    let outside = c.add_pod(0, "outside").unwrap();
    let config = c.write_config(&[], "excludedPods: [default/outside]\n").unwrap();
    c.start_agent_with(0, &["--config", config.to_str().unwrap()]).unwrap();
    let v11 = |command: &str| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [("CNI_COMMAND", command), ("CNI_PATH", "/opt/cni/bin")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if command == "GC" {
            return env;
        }
        env.push(("CNI_CONTAINERID".into(), outside.container_id.clone()));
        env.push(("CNI_NETNS".into(), mesh_tests::sys::netns_path(&outside.netns).display().to_string()));
        env.push(("CNI_IFNAME".into(), "eth0".into()));
        env.push(("CNI_ARGS".into(), "K8S_POD_NAMESPACE=default;K8S_POD_NAME=outside".into()));
        env
    };
    let stdin = c.cni_config(&outside).replace("\"1.0.0\"", "\"1.1.0\"");
    let call = |c: &Cluster, command: &str| {
        let env = v11(command);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c.cni_raw(&env, &stdin).unwrap()
    };
    let version = call(&c, "VERSION");
    assert!(version.json()["supportedVersions"].as_array().unwrap().contains(&"1.1.0".into()), "{}", version.stdout);
    let status = call(&c, "STATUS");
    assert!(status.exit_ok && status.stdout.is_empty(), "{}", status.stdout);
    let add = call(&c, "ADD");
    assert!(add.exit_ok, "{}", add.stdout);
    assert_eq!(add.json()["cniVersion"], "1.1.0", "answered in the configuration's version: {}", add.stdout);
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 0, "kept outside the mesh");
    let check = call(&c, "CHECK");
    assert!(check.exit_ok, "CHECK of a pod whose ADD succeeded: {}", check.stdout);
    let gc = call(&c, "GC");
    assert!(gc.exit_ok && gc.stdout.is_empty(), "{}", gc.stdout);
    assert!(call(&c, "DEL").exit_ok);
    let check = call(&c, "CHECK");
    assert_eq!(check.error_code(), Some(3), "after DEL the pod is unknown: {}", check.stdout);

    c.kill_agent(0).unwrap();
    let status = call(&c, "STATUS");
    assert!(!status.exit_ok);
    assert_eq!(status.error_code(), Some(50), "{}", status.stdout);
    assert_eq!(status.json()["cniVersion"], "1.1.0");
    // With no agent on the node, pods of kube-system (excluded by default) still start; others wait for it.
    let mut env = v11("ADD");
    let system_args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1".to_string();
    env.iter_mut().filter(|(k, _)| k == "CNI_ARGS").for_each(|(_, v)| *v = system_args.clone());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let system = c.cni_raw(&env, &stdin).unwrap();
    assert!(system.exit_ok, "{}", system.stdout);
    assert_eq!(system.json()["ips"][0]["address"], format!("{}/24", outside.ipv4));
    assert_eq!(call(&c, "ADD").error_code(), Some(11), "a default-namespace pod waits for the agent");
}

#[test]
fn malformed_cni_calls_get_spec_errors_and_harm_nothing() {
    let mut c = cluster!(1);
    let good = c.add_pod(0, "good").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    c.start_agent(0).unwrap();
    c.enroll(&good).unwrap();
    c.serve(&server, 8080).unwrap();
    let config = c.cni_config(&good);
    let base = [
        ("CNI_CONTAINERID", "bad-1"),
        ("CNI_NETNS", "/var/run/netns/does-not-exist"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=ghost"),
    ];
    let with = |cmd: &'static str| -> Vec<(&str, &str)> {
        let mut env = vec![("CNI_COMMAND", cmd)];
        env.extend(base);
        env
    };
    let expect = |env: &[(&str, &str)], stdin: &str, code: u64| {
        let out = c.cni_raw(env, stdin).unwrap();
        assert!(!out.exit_ok, "expected failure for {env:?}");
        assert_eq!(out.error_code(), Some(code), "{}", out.stdout);
        let json = out.json();
        assert!(json["msg"].as_str().is_some_and(|m| !m.is_empty()) && json.get("details").is_some(), "{json}");
    };
    expect(&base, &config, 4); // no CNI_COMMAND
    expect(&with("ADD"), "{not json", 6);
    expect(&with("FROB"), &config, 4);
    expect(&with("ADD"), &config.replace("1.0.0", "9.9.9"), 1);
    expect(&with("ADD")[..4], &config, 4); // no CNI_ARGS: pod unknown
    expect(&with("ADD"), &config.replace(&c.nodes[0].cni_socket.display().to_string(), "/nonexistent.sock"), 11);
    // Reaches the agent, which cannot open the netns: a clear error, nothing enrolled, agent unharmed.
    let out = c.cni_raw(&with("ADD"), &config).unwrap();
    assert!(!out.exit_ok);
    assert!(out.stdout.contains("does-not-exist"), "{}", out.stdout);
    let version = c.cni_raw(&[("CNI_COMMAND", "VERSION")], "").unwrap();
    assert!(version.exit_ok && version.json()["supportedVersions"].as_array().is_some());

    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 1);
    let r = c.client(&good, addr(server.ipv4, 8080), MIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?}", r.json);
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]));
}

/// Capture is pinned: while the agent is down enrolled pods cannot connect (fail-closed); a new agent re-adopts
/// them without any CNI call and traffic flows again.
#[test]
fn restarted_agent_readopts_enrolled_pods() {
    let mut c = cluster!(1);
    let (client, server) = enrolled_pair(&mut c, 0, 0);
    let target = addr(server.ipv4, 8080);
    assert!(c.client(&client, target, MIB, 1).unwrap().success);

    c.kill_agent(0).unwrap();
    let down = c.client(&client, target, 4096, 1).unwrap();
    assert!(!down.success, "an enrolled pod must not bypass a stopped agent: {:?}", down.json);

    c.start_agent(0).unwrap();
    let names: Vec<String> = c
        .admin(0, "/workloads")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["client", "server"]);
    let r = c.client(&client, target, 8 * MIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert_eq!(ip_of(&r.field("local")), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv4));
}

#[test]
fn thousand_concurrent_connections_arrive_intact() {
    let mut c = cluster!(2);
    let (client, server) = enrolled_pair(&mut c, 0, 1);
    let r = c.client(&client, addr(server.ipv4, 8080), 64 * 1024, 1000).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    assert_eq!(r.ok_connections(), 1000, "{:?}", r.json);
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &pod_labels(&client, "outbound")).unwrap(), 1000.0);
    assert_eq!(c.metric(1, "nodemesh_tcp_connections_opened_total", &pod_labels(&server, "inbound")).unwrap(), 1000.0);
}

#[test]
fn ipv6_is_captured_both_ways() {
    let mut c = cluster!(2);
    let (client, server) = enrolled_pair(&mut c, 0, 1);
    let r = c.client(&client, addr(server.ipv6, 8080), 4 * MIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert_eq!(r.field("peername"), format!("[{}]:8080", server.ipv6));
    assert_eq!(ip_of(&r.field("local")), "::1".parse::<IpAddr>().unwrap());
    assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv6));
    assert_eq!(c.metric(1, "nodemesh_tcp_connections_opened_total", &pod_labels(&server, "inbound")).unwrap(), 1.0);
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() {
    let mut c = cluster!(1);
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let other = c.add_pod(0, "other").unwrap();
    let config = std::env::temp_dir().join(format!("{}-config.yaml", c.id));
    std::fs::write(
        &config,
        format!("capture:\n  excludeOutboundPorts: [9090]\n  excludeOutboundCidrs: [{}/32]\n", other.ipv4),
    )
    .unwrap();
    c.start_agent_with(0, &["--config", config.to_str().unwrap()]).unwrap();
    std::fs::remove_file(&config).unwrap();
    c.enroll(&client).unwrap();
    c.serve(&server, 8080).unwrap();
    c.serve(&server, 9090).unwrap();
    c.serve(&other, 8080).unwrap();

    let captured = c.client(&client, addr(server.ipv4, 8080), 4096, 1).unwrap();
    assert_eq!(ip_of(&captured.field("local")), IpAddr::from([127, 0, 0, 1]), "{:?}", captured.json);
    for target in [addr(server.ipv4, 9090), addr(other.ipv4, 8080)] {
        let r = c.client(&client, target, 4096, 1).unwrap();
        assert!(r.success, "{:?}", r.json);
        assert_eq!(r.field("serverSawPeer"), r.field("local"), "{target} must not be captured");
    }
    assert_eq!(c.metric(0, "nodemesh_capture_events_total", &[("event", "outbound_excluded")]).unwrap(), 2.0);
}

/// `/logging` changes log levels while the agent runs: quiet, then debug for the agent's modules; a bad
/// directive is refused and changes nothing. Changes come only through the root-only admin socket: on node
/// loopback, which every host-network pod reaches, they are refused.
#[test]
fn log_levels_change_at_run_time() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = cluster!(1);
    let (client, server) = enrolled_pair(&mut c, 0, 0);
    let debug_lines = |c: &Cluster| c.log_of("agent-n1").matches("DEBUG").count();
    let levels = |c: &Cluster| c.admin(0, "/logging").unwrap()["levels"].as_str().unwrap_or("").to_string();
    assert_eq!(levels(&c), "info,mesh_agent=debug");
    let (status, body) = c.admin_post_loopback(0, "/logging?level=warn").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin.sock"), "{body}");
    assert_eq!(levels(&c), "info,mesh_agent=debug", "a refused change changes nothing");
    let mode = std::fs::metadata(c.admin_socket(0)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is root's alone");

    assert_eq!(c.admin_post(0, "/logging?level=warn").unwrap().0, 200);
    assert_eq!(levels(&c), "warn");
    let before = debug_lines(&c);
    assert!(c.client(&client, addr(server.ipv4, 8080), 4096, 2).unwrap().success);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(debug_lines(&c), before, "no debug output at level warn");

    assert_eq!(c.admin_post(0, "/logging?level=warn,mesh_agent%3Ddebug").unwrap().0, 200);
    assert!(c.client(&client, addr(server.ipv4, 8080), 4096, 2).unwrap().success);
    mesh_tests::wait_for("debug output", || debug_lines(&c) > before);

    let (status, body) = c.admin_post(0, "/logging?level=mesh_agent%3Dloud").unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(levels(&c), "warn,mesh_agent=debug");
}

/// `/quitquitquit`: the agent reports not ready, lets a connection in progress finish, then exits.
#[test]
fn quitquitquit_drains_then_exits() {
    let mut c = cluster!(1);
    let (client, server) = enrolled_pair(&mut c, 0, 0);
    let held =
        c.client_start(&client, addr(server.ipv4, 8080), 64 * 1024, &[("MESH_TESTBIN_HOLD_MS", "1500")]).unwrap();
    let out = pod_labels(&client, "outbound");
    mesh_tests::wait_for("the held connection", || {
        c.metric(0, "nodemesh_tcp_connections_opened_total", &out).unwrap_or(0.0) >= 1.0
    });
    let pid = c.agent_pid(0).unwrap();
    assert_eq!(c.admin_post_loopback(0, "/quitquitquit").unwrap().0, 403, "not from node loopback");
    assert_eq!(c.ready_status(0), 200, "a refused quit leaves the agent serving");
    assert_eq!(c.admin_post(0, "/quitquitquit").unwrap().0, 200);
    let admin = mesh_tests::cluster::ADMIN.parse().unwrap();
    assert_eq!(mesh_tests::sys::http_get(&c.nodes[0].netns, admin, "/healthz/ready").unwrap().0, 503);
    assert!(mesh_tests::sys::pid_running(pid), "the agent must wait for the connection in progress");
    let r = held.wait().unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    mesh_tests::wait_for("the agent to exit", || !mesh_tests::sys::pid_running(pid));
    assert!(c.log_of("agent-n1").contains("drained"));
}

/// The outcome of `mesh-testbin probe` from `pod` to `target`, and how long it took in ms.
fn probe(c: &Cluster, pod: &Pod, target: std::net::SocketAddr) -> (String, u64) {
    let r = c.testbin(pod, &["probe", &target.to_string()]).unwrap();
    (r["outcome"].as_str().unwrap().to_string(), r["ms"].as_u64().unwrap())
}

/// A refusal stays a refusal: a closed port of an enrolled pod fails within milliseconds for callers in the
/// mesh and outside it (the application's RST used to leave the pod towards the real client, and the agent's
/// connect waited 10 s). The caller's connection was accepted by an agent first, so it sees a reset.
#[test]
fn closed_port_of_enrolled_pod_fails_at_once() {
    let mut c = cluster!(1);
    let (client, server) = enrolled_pair(&mut c, 0, 0);
    let outside = c.add_pod(0, "outside").unwrap();
    let closed = addr(server.ipv4, 9999);
    // Without the mesh in the way (the server's own node address skips capture): refused.
    assert_eq!(probe(&c, &outside, addr(c.nodes[0].pod_gateway, 9999)).0, "refused");
    for (caller, pod) in [("meshed", &client), ("outside the mesh", &outside)] {
        let (outcome, ms) = probe(&c, pod, closed);
        assert_eq!(outcome, "reset", "{caller} caller of a closed port");
        assert!(ms < 1000, "{caller} caller waited {ms} ms for a refusal");
        let (outcome, _) = probe(&c, pod, addr(server.ipv4, 8080));
        assert_eq!(outcome, "greeted", "{caller} caller of the open port");
    }
    let failed = c.metric(0, "nodemesh_tcp_connection_failures_total", &[("reason", "connect")]).unwrap();
    assert!(failed >= 2.0, "refusals are counted as failed connects ({failed})");
}

/// Containers of one pod talk over loopback as in any pod: inside an enrolled pod, 127.0.0.1 and ::1 reach the
/// pod's own listener, and a closed loopback port is refused by the kernel, at once. Only the pod's own
/// addresses are steered to the agent.
#[test]
fn loopback_inside_an_enrolled_pod_is_left_alone() {
    let mut c = cluster!(1);
    let (client, _server) = enrolled_pair(&mut c, 0, 0);
    c.serve(&client, 7070).unwrap();
    let no_listener =
        |c: &Cluster| c.metric(0, "nodemesh_capture_events_total", &[("event", "inbound_no_listener")]).unwrap_or(0.0);
    for ip in ["127.0.0.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()] {
        assert_eq!(probe(&c, &client, addr(ip, 7070)).0, "greeted", "listening port on {ip}");
        let (outcome, ms) = probe(&c, &client, addr(ip, 7071));
        assert_eq!(outcome, "refused", "closed port on {ip}");
        assert!(ms < 1000, "{ms} ms for a refusal on {ip}");
    }
    assert_eq!(no_listener(&c), 0.0, "loopback must never meet the agent's inbound steering");
    // The pod's own address is still steered (and so still proxied and accounted).
    assert_eq!(probe(&c, &client, addr(client.ipv4, 7070)).0, "greeted");
    assert!(c.metric(0, "nodemesh_capture_events_total", &[("event", "inbound_steered")]).unwrap() >= 1.0);
}

/// A meshed pod that was running before nodemesh (no CNI ADD ever enrolled it) is not captured in place: the
/// agent lists it at `/uncaptured` and `meshctl check` fails on it with the fix, until the pod is enrolled (a
/// restart, here its ADD).
#[test]
fn pods_running_before_the_install_are_reported_uncaptured() {
    let mut c = cluster!(1);
    let early = c.add_pod(0, "early").unwrap();
    let config = c.write_config(&[(&early, "early-sa")], "").unwrap();
    c.start_agent_with(0, &["--config", config.to_str().unwrap()]).unwrap();
    let meshctl = mesh_tests::cluster::built_binary("meshctl").unwrap();
    let check = |c: &Cluster| {
        let mut command = std::process::Command::new(&meshctl);
        command.args(["check", "--no-kubernetes", "--agent", mesh_tests::cluster::ADMIN]);
        let out = mesh_tests::sys::output_in_netns(&c.nodes[0].netns, &mut command).unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let listed = c.admin(0, "/uncaptured").unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!((&listed[0]["namespace"], &listed[0]["name"]), (&"default".into(), &"early".into()));
    let (code, said) = check(&c);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.lines().any(|l| l.starts_with("FAIL") && l.contains("default/early") && l.contains("restart")),
        "{said}"
    );

    c.enroll(&early).unwrap();
    assert_eq!(c.admin(0, "/uncaptured").unwrap(), serde_json::json!([]));
    let (code, said) = check(&c);
    assert_eq!(code, Some(0), "{said}");
}
