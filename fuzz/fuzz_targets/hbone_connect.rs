//! The receiving side of HBONE after mTLS: arbitrary bytes from a peer, after the HTTP/2 preface, into an h2
//! server configured as the agent's, and every request through `connect_target` (method and authority checks).
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mesh_agent::l7::detect::Protocol;
use mesh_agent::proxy::hbone_inbound::connect_target;
use tokio::io::AsyncWriteExt;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let pod_ips: [IpAddr; 2] = ["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
    runtime().block_on(async {
        let (mut peer, server) = tokio::io::duplex(64 * 1024);
        let input = [PREFACE, data].concat();
        let writer = async move {
            let _ = peer.write_all(&input).await;
            let _ = peer.shutdown().await;
            // Keep our end open (reading nothing) until the server is done with it.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut sink).await;
        };
        let serve = async move {
            let Ok(mut h2) = h2::server::Builder::new().max_concurrent_streams(100).handshake::<_, Bytes>(server).await
            else {
                return;
            };
            while let Some(Ok((request, mut respond))) = h2.accept().await {
                let authority = request.uri().authority().map(|a| a.as_str());
                match connect_target(request.method(), authority, &pod_ips) {
                    Ok(target) => {
                        assert_eq!(request.method(), http::Method::CONNECT);
                        assert!(pod_ips.contains(&target.ip().to_canonical()));
                    }
                    Err(code) => {
                        let _ = respond.send_response(http::Response::builder().status(code).body(()).unwrap(), true);
                    }
                }
                if let Some(l7) = request.headers().get("x-nodemesh-l7").and_then(|v| v.to_str().ok()) {
                    let _ = Protocol::parse(l7);
                }
            }
        };
        tokio::join!(writer, serve);
    });
});
