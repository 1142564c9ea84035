//! Who is calling: every gRPC call carries `authorization: Bearer <token>` and the node name in
//! `x-nodemesh-node`; the result is the node the caller may act for.
//!
//! - Bootstrap token (directory mode): one shared secret. It proves membership, not the node: a holder can claim
//!   any node, as with kubelet bootstrap tokens.
//! - Kubernetes: the agent's service-account token, checked through TokenReview. It must belong to the agent's
//!   service account, and the node comes from the token itself (pod-bound projected tokens carry
//!   `authentication.kubernetes.io/node-name`), so an agent cannot ask for another node's config or identities.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use tonic::{Request, Status};

pub const NODE_HEADER: &str = "x-nodemesh-node";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Reviewed tokens are trusted this long before the API server is asked again.
const REVIEW_CACHE: Duration = Duration::from_secs(60);

pub enum Authenticator {
    Bootstrap { token: String },
    TokenReview { client: kube::Client, username: String, reviewed: Mutex<HashMap<String, (String, Instant)>> },
}

impl Authenticator {
    /// `service_account` as `namespace:name`.
    pub fn token_review(client: kube::Client, service_account: &str) -> Self {
        Authenticator::TokenReview {
            client,
            username: format!("system:serviceaccount:{service_account}"),
            reviewed: Mutex::new(HashMap::new()),
        }
    }

    /// The node the caller is, after checking its credentials.
    pub async fn node_of<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let claimed = req
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|n| !n.is_empty())
            .map(String::from)
            .ok_or_else(|| Status::invalid_argument(format!("the {NODE_HEADER} header names the calling node")))?;
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
        match self {
            Authenticator::Bootstrap { token: expected } if token == expected => Ok(claimed),
            Authenticator::Bootstrap { .. } => Err(Status::unauthenticated("a valid bootstrap token is required")),
            Authenticator::TokenReview { client, username, reviewed } => {
                let cached = {
                    let mut cache = reviewed.lock().unwrap_or_else(|p| p.into_inner());
                    cache.retain(|_, (_, at)| at.elapsed() < REVIEW_CACHE);
                    cache.get(token).map(|(node, _)| node.clone())
                };
                let node = match cached {
                    Some(node) => node,
                    None => {
                        let node = review(client, username, token).await?;
                        let mut cache = reviewed.lock().unwrap_or_else(|p| p.into_inner());
                        cache.insert(token.to_string(), (node.clone(), Instant::now()));
                        node
                    }
                };
                if node != claimed {
                    return Err(Status::permission_denied(format!("the token belongs to node {node}, not {claimed}")));
                }
                Ok(node)
            }
        }
    }
}

async fn review(client: &kube::Client, username: &str, token: &str) -> Result<String, Status> {
    let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_string()), ..Default::default() },
        ..Default::default()
    };
    let answer = reviews.create(&PostParams::default(), &request).await.map_err(|e| {
        tracing::warn!(error = %e, "TokenReview failed");
        Status::unavailable("cannot review the token right now")
    })?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Status::unauthenticated(status.error.unwrap_or_else(|| "the token is not valid".into())));
    }
    let user = status.user.unwrap_or_default();
    if user.username.as_deref() != Some(username) {
        return Err(Status::permission_denied(format!(
            "{} is not the agent's service account {username}",
            user.username.unwrap_or_default()
        )));
    }
    user.extra
        .and_then(|mut extra| extra.remove(NODE_NAME_EXTRA))
        .and_then(|nodes| nodes.into_iter().next())
        .ok_or_else(|| Status::permission_denied("the token is not bound to a pod on a node (use a projected token)"))
}
