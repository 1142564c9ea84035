//! The demo's walk-through, after Istio's Bookinfo tasks: enrolment by namespace label, mTLS on the wire,
//! traffic shifting, request routing, fault injection with a timeout, authorization, and `meshctl stat`. Each
//! step shows what it does and checks that the mesh behaved.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::Demo;
use super::bookinfo::{self, DEPLOYMENTS, NAMESPACE, TITLE, details_policy, ratings_delay, reviews_route, url};
use crate::sniff::{Sniffer, contains, tcp_segments};

type Step = fn(&mut Demo<'_>) -> Result<()>;

const STEPS: &[(&str, Step)] = &[
    ("Label namespace bookinfo into the mesh", enrol),
    ("mTLS, proven on the wire", mtls_on_the_wire),
    ("STRICT mTLS: plaintext from outside the mesh is refused", strict_mtls),
    ("No route yet: the reviews Service balances over all its versions", no_route),
    ("Traffic shifting: 90% of reviews to v1, 10% to v3", canary),
    ("Request routing: user jason sees reviews v2", header_routing),
    ("Fault injection: ratings answers 2 s late", fault_delay),
    ("A 0.5 s timeout on jason's reviews route", timeout),
    ("Authorization: only productpage may read details", authorization),
    ("meshctl stat: golden signals per workload", stat),
];

pub(super) fn run(d: &mut Demo<'_>) -> Result<()> {
    for (i, (title, step)) in STEPS.iter().enumerate() {
        if d.stopped() {
            bail!("interrupted");
        }
        println!("\n━━ {}/{} {title}", i + 1, STEPS.len());
        let started = Instant::now();
        step(d).with_context(|| format!("step {}: {title}", i + 1))?;
        println!("   ({:.1}s)", started.elapsed().as_secs_f64());
    }
    Ok(())
}

fn productpage() -> String {
    url("productpage", "/productpage")
}

/// How many of a `fetch` report's pages were served by each reviews version (`unavailable`: none could).
fn versions(report: &Value) -> std::collections::BTreeMap<String, u64> {
    report["reviews"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect()
}

fn status_count(report: &Value, status: u16) -> u64 {
    report["status"][status.to_string()].as_u64().unwrap_or(0)
}

fn show_page(report: &Value) {
    for line in report["page"].as_str().unwrap_or("(no page)").lines() {
        println!("   │ {line}");
    }
}

fn latency_ms(report: &Value, which: &str) -> f64 {
    report["latencyMs"][which].as_f64().unwrap_or(f64::NAN)
}

fn enrolled_per_node(d: &Demo<'_>) -> Vec<usize> {
    (0..d.c.nodes.len())
        .map(|n| d.c.admin(n, "/stats").map_or(0, |s| s["enrolledPods"].as_u64().unwrap_or(0) as usize))
        .collect()
}

fn enrol(d: &mut Demo<'_>) -> Result<()> {
    let before = enrolled_per_node(d);
    d.progress.check(before.iter().all(|n| *n == 0), format!("the pods run, outside the mesh: enrolled {before:?}"))?;
    println!("   $ kubectl label namespace {NAMESPACE} nodemesh.io/mesh=enabled");
    d.c.write_objects("namespace.yaml", Some(&bookinfo::namespace(true)))?;
    // Every pod of the namespace plus curl; the pods were already running: the agents take them over in place.
    let expected: Vec<usize> = (0..d.c.nodes.len())
        .map(|n| DEPLOYMENTS.iter().filter(|dep| dep.node == n).count() + usize::from(n == d.app.curl.node))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let enrolled = loop {
        let now = enrolled_per_node(d);
        if now == expected || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    d.progress.check(enrolled == expected, format!("pods enrolled per node: {enrolled:?} (expected {expected:?})"))?;
    for node in 0..d.c.nodes.len() {
        let certs = d.c.admin(node, "/certs")?;
        let prefix = bookinfo::spiffe("");
        let accounts: Vec<&str> = certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["identity"].as_str()?.strip_prefix(&prefix))
            .collect();
        println!("   node-{} holds certificates for {prefix}{{{}}}", node + 1, accounts.join(", "));
    }
    let page = d.fetch(&productpage(), &[])?;
    show_page(&page);
    d.progress.check(
        status_count(&page, 200) == 1 && page["last"]["details"]["error"].is_null(),
        "curl → productpage → details and reviews: the page renders",
    )
}

fn mtls_on_the_wire(d: &mut Demo<'_>) -> Result<()> {
    println!("   capturing every packet between the nodes while curl loads the product page 5 times ...");
    let sniffer = Sniffer::start(&d.c.fabric)?;
    let report = d.fetch(&productpage(), &["-n", "5", "-H", "end-user: jason"])?;
    let frames = sniffer.finish_frames()?;
    // The agents' own channel to the controller (TLS on 15012) crosses the fabric too, whenever a certificate
    // signing or a config acknowledgement happens to fall into the capture: it is not the workloads' traffic.
    let controller: std::net::IpAddr = crate::cluster::CONTROLLER_IP.parse()?;
    let segments: Vec<_> =
        tcp_segments(&frames).into_iter().filter(|s| s.src != controller && s.dst != controller).collect();
    let mut flows = BTreeSet::new();
    for s in &segments {
        // Name each connection by its client → server side (the server port is the lower one here).
        let flow = if s.dst_port <= s.src_port { (s.src, s.dst, s.dst_port) } else { (s.dst, s.src, s.src_port) };
        flows.insert(flow);
    }
    for (client, server, port) in &flows {
        println!("   traffic {client} → {server}:{port}");
    }
    let wire = frames.concat();
    d.progress.check(status_count(&report, 200) == 5, "5 pages served")?;
    let hbone = segments.iter().filter(|s| s.src_port == 15008 || s.dst_port == 15008).count();
    d.progress.check(
        hbone > 0 && hbone == segments.len(),
        format!(
            "all {} TCP segments between the nodes' pods are to or from port 15008 (HBONE: mutual TLS)",
            segments.len()
        ),
    )?;
    d.progress.check(
        !contains(&wire, TITLE.as_bytes()) && !contains(&wire, b"Reviewer1"),
        format!("the page's text ({TITLE:?}, reviewers' names) is nowhere in the {} bytes captured", wire.len()),
    )?;
    let mut pairs = BTreeSet::new();
    for node in 0..d.c.nodes.len() {
        for t in d.c.admin(node, "/tunnels")?.as_array().into_iter().flatten() {
            if t["direction"] == "inbound" {
                let id = |k: &str| t[k].as_str().unwrap_or("?").to_string();
                pairs.insert((id("peerIdentity"), id("localIdentity")));
            }
        }
    }
    for (peer, local) in &pairs {
        println!("   tunnel: {peer}  →  {local}");
    }
    d.progress.check(
        pairs.contains(&(bookinfo::spiffe("bookinfo-productpage"), bookinfo::spiffe("bookinfo-details"))),
        "details' agent verified productpage's SPIFFE identity",
    )?;

    println!("   for contrast, the same page fetched from node-2 itself, outside the mesh, straight to the pod:");
    let sniffer = Sniffer::start(&d.c.fabric)?;
    let out = fetch_from_outside(d)?;
    let wire = sniffer.finish()?;
    d.progress.check(out.status.success(), "node-2 → productpage answered (plaintext accepted: PERMISSIVE)")?;
    d.progress.check(
        contains(&wire, TITLE.as_bytes()),
        format!("{TITLE:?} is readable on the wire this time: the capture would have seen it"),
    )
}

/// `bookinfo fetch` of the product page from node-2 itself, outside the mesh, straight to the pod.
fn fetch_from_outside(d: &Demo<'_>) -> Result<std::process::Output> {
    let pod = d.app.pod("productpage-v1");
    let mut cmd = Command::new(&d.bookinfo);
    cmd.args(["fetch", &format!("http://{}:{}/productpage", pod.ipv4, bookinfo::PORT)]);
    crate::sys::output_in_netns(&d.c.nodes[1].netns, &mut cmd)
}

fn strict_mtls(d: &mut Demo<'_>) -> Result<()> {
    d.apply("strict.yaml", Some(&bookinfo::strict_mtls()))?;
    d.wait_config("STRICT", true)?;
    let outside = fetch_from_outside(d)?;
    let said = String::from_utf8_lossy(&outside.stderr);
    println!("   node-2 → productpage (plaintext): {}", said.trim());
    d.progress.check(!outside.status.success(), "refused: the agent resets plaintext connections to the pod")?;
    let page = d.fetch(&productpage(), &[])?;
    d.progress.check(status_count(&page, 200) == 1, "curl (in the mesh, mTLS) still gets the page")?;
    // Back to PERMISSIVE, so the port forward for your browser (plaintext from node-2) keeps working.
    d.apply("strict.yaml", None)?;
    d.wait_config("STRICT", false)
}

fn no_route(d: &mut Demo<'_>) -> Result<()> {
    let report = d.fetch(&productpage(), &["-n", "30"])?;
    let v = versions(&report);
    println!("   30 pages: reviews versions {v:?}");
    println!("   (least request by default: of two endpoints drawn at random the faster one answers; v1 calls no");
    println!("   ratings service and runs on productpage's node, so it tends to win)");
    d.progress.check(
        v.len() >= 2 && v.keys().all(|k| ["v1", "v2", "v3"].contains(&k.as_str())) && v.values().sum::<u64>() == 30,
        "every page had reviews, from more than one version",
    )
}

fn canary(d: &mut Demo<'_>) -> Result<()> {
    d.apply("reviews-route.yaml", Some(&reviews_route(None, &[("reviews-v1", 90), ("reviews-v3", 10)])))?;
    d.wait_config("\"weight\":90", true)?;
    let report = d.fetch(&productpage(), &["-n", "100"])?;
    let v = versions(&report);
    let (v1, v3) = (v.get("v1").copied().unwrap_or(0), v.get("v3").copied().unwrap_or(0));
    println!("   100 pages: reviews v1 {v1}, v3 {v3} (no stars: v1, red stars: v3)");
    d.progress.check(v1 + v3 == 100, "only v1 and v3 answered")?;
    // 90/10 over 100 requests: the standard deviation is 3, so this band is 5 deviations wide either way.
    d.progress.check((75..=99).contains(&v1), "about 90 of 100 went to v1")
}

fn header_routing(d: &mut Demo<'_>) -> Result<()> {
    let route = reviews_route(Some(("reviews-v2", None)), &[("reviews-v1", 90), ("reviews-v3", 10)]);
    d.apply("reviews-route.yaml", Some(&route))?;
    d.wait_config("jason", true)?;
    let jason = d.fetch(&productpage(), &["-n", "20", "-H", "end-user: jason"])?;
    show_page(&jason);
    let v = versions(&jason);
    d.progress.check(v.get("v2") == Some(&20), format!("jason: 20 of 20 pages from v2 (black stars) {v:?}"))?;
    let others = d.fetch(&productpage(), &["-n", "20", "-H", "end-user: guest"])?;
    let v = versions(&others);
    d.progress.check(!v.contains_key("v2") && v.values().sum::<u64>() == 20, format!("everyone else: no v2 {v:?}"))
}

fn fault_delay(d: &mut Demo<'_>) -> Result<()> {
    d.apply("ratings-fault.yaml", Some(&ratings_delay("2s")))?;
    d.wait_config("ratings-delay", true)?;
    let jason = d.fetch(&productpage(), &["-n", "2", "-H", "end-user: jason"])?;
    show_page(&jason);
    let slowest = latency_ms(&jason, "min");
    d.progress.check(
        slowest >= 1900.0 && versions(&jason).get("v2") == Some(&2),
        format!("jason's page waited for ratings: {slowest:.0} ms, still with stars"),
    )
}

fn timeout(d: &mut Demo<'_>) -> Result<()> {
    let route = reviews_route(Some(("reviews-v2", Some("500ms"))), &[("reviews-v1", 90), ("reviews-v3", 10)]);
    d.apply("reviews-route.yaml", Some(&route))?;
    d.wait_config("\"requestMs\":500", true)?;
    let jason = d.fetch(&productpage(), &["-n", "3", "-H", "end-user: jason"])?;
    show_page(&jason);
    let slowest = latency_ms(&jason, "max");
    d.progress.check(
        versions(&jason).get("unavailable") == Some(&3) && slowest < 1500.0,
        format!(
            "productpage's agent gave up on reviews after 0.5 s (504): page in {slowest:.0} ms, reviews unavailable"
        ),
    )?;
    d.apply("ratings-fault.yaml", None)?;
    d.wait_config("ratings-delay", false)?;
    let jason = d.fetch(&productpage(), &["-H", "end-user: jason"])?;
    d.progress.check(versions(&jason).get("v2") == Some(&1), "without the fault jason's reviews are back")
}

fn authorization(d: &mut Demo<'_>) -> Result<()> {
    d.apply("details-policy.yaml", Some(&details_policy()))?;
    d.wait_config("details-viewer", true)?;
    let direct = d.fetch(&url("details", "/details/0"), &[])?;
    println!("   curl → details: {} {}", direct["lastStatus"], direct["last"].as_str().unwrap_or_default().trim());
    d.progress.check(status_count(&direct, 403) == 1, "curl may not read details: 403 from details' agent")?;
    let page = d.fetch(&productpage(), &["-n", "3"])?;
    show_page(&page);
    d.progress.check(
        status_count(&page, 200) == 3 && page["last"]["details"]["error"].is_null(),
        "productpage still reads details",
    )
}

fn stat(d: &mut Demo<'_>) -> Result<()> {
    let mut cmd = Command::new(&d.meshctl);
    cmd.args(["stat", NAMESPACE, "--window", "3s"]);
    for m in &d.endpoints.metrics {
        cmd.args(["--metrics", &m.to_string()]);
    }
    println!("   $ meshctl stat {NAMESPACE} --window 3s --metrics ... (while curl loads pages)");
    let d: &Demo<'_> = d;
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut pages = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) && pages < 400 {
                pages += d.fetch(&productpage(), &["-n", "10"]).map_or(0, |r| r["requests"].as_u64().unwrap_or(0));
            }
            pages
        });
        std::thread::sleep(Duration::from_millis(300));
        let out = cmd.output();
        done.store(true, std::sync::atomic::Ordering::Release);
        let _ = load.join();
        out
    })?;
    let table = String::from_utf8_lossy(&out.stdout);
    for line in table.lines() {
        println!("   │ {line}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    d.progress.check(out.status.success(), format!("meshctl stat succeeded {}", stderr.trim()))?;
    let missing: Vec<&str> = DEPLOYMENTS.iter().map(|dep| dep.name).filter(|w| !table.contains(w)).collect();
    d.progress.check(missing.is_empty(), format!("a row for every Bookinfo workload (missing: {missing:?})"))?;
    Ok(())
}
