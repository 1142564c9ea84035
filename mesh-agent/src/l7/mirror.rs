//! RequestMirror: a copy of a share of the requests goes to another Service once the primary request's body is
//! known; its response is read and dropped. The copy runs in its own task after the primary was sent, so it
//! never delays or fails the primary request.

use std::time::Duration;

use http::request::Parts;
use http_body_util::BodyExt;
use mesh_common::route::Mirror;

use super::client::Guard;
use super::destination::Here;
use super::outbound::Call;
use super::{forward, upstream};
use crate::body::Replay;
use crate::snapshot::Snapshot;
use std::sync::Arc;

/// A mirrored request gets this long before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

pub fn send(
    call: &Call,
    config: &Arc<Snapshot>,
    mirror: &Mirror,
    parts: &Parts,
    replay: Option<&Replay>,
    called_port: u16,
) {
    if !super::roll(mirror.percent) {
        return;
    }
    let Some(replay) = replay.cloned() else { return };
    let target = &mirror.service;
    let Some(endpoint_port) = forward::endpoint_port(config, target, called_port) else {
        return tracing::debug!(mirror = %target.name, "mirror Service or port not found");
    };
    let Some(dest) = call.dp.l7().destinations.get(config, &target.namespace, &target.name) else { return };
    let config = config.clone();
    let head = forward::head(parts);
    let (dp, pod, protocol) = (call.dp.clone(), call.pod.clone(), call.protocol);
    tokio::spawn(async move {
        let work = async {
            let body = replay.finished().await?;
            let endpoint = dest.pick(None, &Here::of(dp.node(), &config))?;
            let req = head.body(body).ok()?;
            let target = std::net::SocketAddr::new(endpoint.ip, endpoint_port);
            let no_limit = || Some(Box::new(()) as Guard);
            let route = upstream::route_to(&config, dp.secrets().is_some(), &pod, target);
            let pool = &dp.l7().upstreams;
            let response = upstream::send(&dp, pool, &pod, (target, route), protocol, no_limit, req).await.ok()?;
            let _ = response.into_body().collect().await;
            Some(())
        };
        if tokio::time::timeout(MIRROR_TIMEOUT, work).await.ok().flatten().is_none() {
            tracing::debug!("mirrored request not completed");
        }
    });
}
