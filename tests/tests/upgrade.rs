//! Hitless agent upgrade, end to end: both nodes' agents replaced the way a DaemonSet rolling update replaces
//! them, under keep-alive HTTP load through a Service and long-lived checksummed TCP streams from inside a pod.
//! Before the handover every connection through a restarted agent was cut, and a new agent could not even start
//! beside the old one (`Address already in use` on the pod listeners).

use std::path::Path;
use std::time::Duration;

use mesh_agent::handover::fds::Channel;
use mesh_tests::app::{self, Server, service};
use mesh_tests::cluster::Rollout;
use mesh_tests::{Cluster, cluster, wait_for};
use serde_json::Value;

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");
const WEB: &str = "http://10.96.9.1/";
/// Keep-alive HTTP: 500 requests a second over 8 connections, for as long as both upgrades take.
const RATE: &str = "500";
const LOAD_SECONDS: u64 = 10;
const STREAMS: usize = 10;

const SERVERS: [Server<'static>; 2] = [
    Server { node: 1, name: "web", labels: "{app: web}", args: &[], owner: None },
    Server { node: 1, name: "raw", labels: "{app: raw}", args: &["tcp"], owner: None },
];

/// Client on node 1, `web` and `raw` on node 2, both agents fed by the controller with a drain timeout longer
/// than the streams live.
fn meshed(c: &mut Cluster) -> (mesh_tests::Pod, String) {
    let objects = service("web", "10.96.9.1", "{app: web}", "");
    let client = app::mesh(c, Path::new(HTTP), &SERVERS, &objects, 0, &["--drain-timeout", "60s"]);
    let workloads = c.admin(1, "/workloads").unwrap();
    let raw = workloads.as_array().unwrap().iter().find(|w| w["name"] == "raw").unwrap()["ips"][0].clone();
    let ok = app::get(c, Path::new(HTTP), &client, &[WEB, "-n", "3"]);
    assert_eq!(ok["statuses"]["200"], 3, "{ok}");
    (client, format!("{}:8080", raw.as_str().unwrap()))
}

/// Requests through the Service and streams to `raw` from `client` all succeed.
fn serves(c: &Cluster, client: &mesh_tests::Pod, raw: &str) {
    let ok = app::get(c, Path::new(HTTP), client, &[WEB, "-n", "5"]);
    assert_eq!(ok["statuses"]["200"], 5, "{ok}");
    let report = c.testbin(client, &["streams", raw, "2", "1"]).unwrap();
    assert_eq!(report["ok"], 2, "{report}");
}

fn failed_requests(load: &Value) -> (u64, u64) {
    let errors = load["errors"].as_u64().unwrap_or(u64::MAX);
    (errors, load["requests"].as_u64().unwrap_or(0) + errors)
}

/// Upgrades `node`'s agent with surge under keep-alive HTTP load and long-lived streams from `client`; returns
/// (failed requests, requests, broken streams) and checks the old agent left on its own once its streams ended.
fn surge_under_load(c: &mut Cluster, client: &mesh_tests::Pod, raw: &str, node: usize) -> (u64, u64, u64) {
    let seconds = LOAD_SECONDS.to_string();
    let load = c.start_in(client, Path::new(HTTP), &["load", WEB, RATE, &seconds, "-c", "8"]).unwrap();
    let streams = c.testbin_start(client, &["streams", raw, &STREAMS.to_string(), &seconds]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let upgraded = c.upgrade_agent(node, Rollout::Surge).unwrap();
    let load = load.wait().unwrap();
    let streams = streams.wait().unwrap();
    assert!(load.success, "{}", load.stderr);
    let (failed, total) = failed_requests(&load.json);
    assert!(total >= 500 * (LOAD_SECONDS - 2), "the load ran: {}", load.json);
    assert!(streams.json["roundTrips"].as_u64().unwrap() > 200, "{}", streams.json);
    let left_after = c.wait_exited(&upgraded).unwrap();
    eprintln!("old agent {} exited {left_after:?} after SIGTERM", node + 1);
    if failed > 0 || streams.ok_connections() != STREAMS as u64 {
        eprintln!("load: {}\nstreams: {}", load.json, streams.json);
    }
    (failed, total, STREAMS as u64 - streams.ok_connections())
}

/// Each agent in turn gets a successor started beside it, and SIGTERM once the successor answers ready on the
/// node's admin port (`maxSurge: 1, maxUnavailable: 0`): not one request fails and not one stream breaks, on
/// the calling side's agent or on the receiving side's.
#[test]
fn surge_upgrade_of_both_agents_loses_no_request_and_no_connection() {
    let mut c = cluster!(2);
    let (client, raw) = meshed(&mut c);
    let mut lost = 0;
    for (node, side) in [(0, "client-side"), (1, "server-side")] {
        let (failed, total, broken) = surge_under_load(&mut c, &client, &raw, node);
        eprintln!("{side} agent upgraded: failed requests {failed} / {total}, broken connections {broken} / {STREAMS}");
        lost += failed + broken;
    }
    assert_eq!(lost, 0, "requests failed or connections broke during the upgrades (above)");
    // The new agents carry new traffic on their own.
    serves(&c, &client, &raw);
}

/// A plain SIGTERM (no successor yet, as with `maxUnavailable: 1`) drains in seconds, not the whole drain
/// timeout: keep-alive clients are told `connection: close` and the agent exits once they have gone. What the
/// gap until the new agent is up costs is counted (connections refused meanwhile, never hung or leaked).
#[test]
fn sigterm_without_a_successor_drains_keep_alive_clients_in_seconds() {
    let mut c = cluster!(2);
    let (client, raw) = meshed(&mut c);
    let load = c.start_in(&client, Path::new(HTTP), &["load", WEB, RATE, "12", "-c", "8"]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let upgraded = c.upgrade_agent(0, Rollout::Replace).unwrap();
    let exited_after = c.wait_exited(&upgraded).unwrap();
    let load = load.wait().unwrap();
    let (failed, total) = failed_requests(&load.json);
    eprintln!("old agent exited {exited_after:?} after SIGTERM; failed requests {failed} / {total} in the gap");
    assert!(exited_after < Duration::from_secs(5), "drained in {exited_after:?} (drain timeout 60 s)");
    assert!(load.success, "{}", load.stderr);
    // Requests went on after the new agent came up.
    assert!(total > failed + 500 * 6, "{}", load.json);
    serves(&c, &client, &raw);
}

/// A successor that says hello, takes the sockets and dies before it serves them leaves the running agent as it
/// was: not ready only while the successor was there, then ready, carrying traffic and enrolling pods again.
#[test]
fn a_successor_that_dies_during_the_handover_leaves_the_running_agent_serving() {
    let mut c = cluster!(2);
    let (client, raw) = meshed(&mut c);
    let socket = c.nodes[0].state_dir.join("handover.sock");
    let successor = Channel::connect(&socket).unwrap().expect("the agent waits for a successor");
    successor.send(br#"{"type":"hello","pid":1,"version":"test"}"#, &[]).unwrap();
    wait_for("the agent to report not ready while a successor prepares", || c.ready_status(0) == 503);
    successor.send(br#"{"type":"take"}"#, &[]).unwrap();
    let (body, listeners) = successor.recv().unwrap();
    let message: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(message["type"], "listeners", "{message}");
    assert_eq!(message["entries"].as_array().unwrap().len(), listeners.len());
    assert!(listeners.len() >= 4, "admin, metrics, CNI and the client pod's: {message}");
    drop(listeners);
    drop(successor);
    wait_for("the agent to be ready again", || c.ready_status(0) == 200);
    serves(&c, &client, &raw);
    // The CNI socket is served again (it was stopped for the exchange).
    let late = c.add_pod(0, "late").unwrap();
    c.enroll(&late).unwrap();
    // And the next successor can still take over.
    let upgraded = c.upgrade_agent(0, Rollout::Surge).unwrap();
    c.wait_exited(&upgraded).unwrap();
    serves(&c, &client, &raw);
}

/// An agent started beside one that offers no handover (its socket gone: an older version, or a broken one)
/// finds the pods' listeners taken and exits with an error, touching nothing: it used to release the pods'
/// capture as "cannot re-adopt", and their traffic bypassed the mesh.
#[test]
fn an_agent_that_cannot_take_over_leaves_the_running_agents_pods_captured() {
    let mut c = cluster!(2);
    let (client, raw) = meshed(&mut c);
    std::fs::remove_file(c.nodes[0].state_dir.join("handover.sock")).unwrap();
    let (status, log) = c.run_rival_agent(0).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("another agent holds the pod's listeners"), "{log}");
    // The client pod is still captured and served by the running agent, in mTLS.
    let before = c.mutual_tls_opened(0);
    let report = c.testbin(&client, &["streams", &raw, "2", "1"]).unwrap();
    assert_eq!(report["ok"], 2, "{report}");
    assert!(c.mutual_tls_opened(0) >= before + 2.0, "the streams went through the running agent in mTLS");
}
