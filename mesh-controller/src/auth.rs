//! Who is calling: every gRPC call carries `authorization: Bearer <token>` and the node name in
//! `x-nodemesh-node`; the result is the node the caller may act for.
//!
//! - Bootstrap token (directory mode): one shared secret. It proves membership, not the node: a holder can claim
//!   any node, as with kubelet bootstrap tokens.
//! - Kubernetes: the agent's service-account token, checked through TokenReview. It must belong to the agent's
//!   service account, and the node comes from the token itself (pod-bound projected tokens carry
//!   `authentication.kubernetes.io/node-name`), so an agent cannot ask for another node's config or identities.
//!   It must be minted for the controller's audience (a projected token with `audience: nodemesh-controller`, as
//!   ztunnel's is for `istio-ca`): a token the controller sees is then worthless against the API server, and a
//!   token for the API server or any other audience is refused — except, while `legacy_api_tokens` is on (an
//!   upgrade from agents that sent their default token), one for the API server's own audience.

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

/// The audience agents' projected tokens are minted for, unless `--token-audience` says otherwise.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "nodemesh-controller";

pub enum Authenticator {
    Bootstrap { token: String },
    TokenReview(Box<TokenReviewer>),
}

pub struct TokenReviewer {
    client: kube::Client,
    username: String,
    audience: String,
    legacy_api_tokens: bool,
    reviewed: Mutex<HashMap<String, (String, Instant)>>,
}

impl Authenticator {
    /// `service_account` as `namespace:name`; tokens must be for `audience`, or with `legacy_api_tokens` for the
    /// API server's own.
    pub fn token_review(client: kube::Client, service_account: &str, audience: &str, legacy_api_tokens: bool) -> Self {
        Authenticator::TokenReview(Box::new(TokenReviewer {
            client,
            username: format!("system:serviceaccount:{service_account}"),
            audience: audience.to_string(),
            legacy_api_tokens,
            reviewed: Mutex::new(HashMap::new()),
        }))
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
            Authenticator::TokenReview(reviewer) => {
                let node = reviewer.node_of(token).await?;
                if node != claimed {
                    return Err(Status::permission_denied(format!("the token belongs to node {node}, not {claimed}")));
                }
                Ok(node)
            }
        }
    }
}

impl TokenReviewer {
    async fn node_of(&self, token: &str) -> Result<String, Status> {
        let cached = {
            let mut cache = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (_, at)| at.elapsed() < REVIEW_CACHE);
            cache.get(token).map(|(node, _)| node.clone())
        };
        if let Some(node) = cached {
            return Ok(node);
        }
        let node = match review(&self.client, &self.username, token, Some(&self.audience)).await {
            Err(refused) if refused.code() == tonic::Code::Unauthenticated && self.legacy_api_tokens => {
                let node = review(&self.client, &self.username, token, None).await.map_err(|_| refused)?;
                tracing::warn!(
                    node,
                    audience = self.audience,
                    "an agent authenticated with a token for the API server, not for this controller (an agent \
                     from before audience-bound tokens?); accepted while --legacy-api-tokens is on"
                );
                node
            }
            other => other?,
        };
        let mut cache = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(token.to_string(), (node.clone(), Instant::now()));
        Ok(node)
    }
}

/// Asks the API server about `token`: for `audience` (the API server's own when `None`), of `username`, bound to
/// a node. The node.
async fn review(client: &kube::Client, username: &str, token: &str, audience: Option<&str>) -> Result<String, Status> {
    let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_string()), audiences: audience.map(|a| vec![a.to_string()]) },
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
    // The API server answers with the requested audiences the token is valid for; an authenticator that
    // ignores audiences answers none, which proves nothing about the token's audience.
    let for_us = audience.is_none_or(|wanted| status.audiences.iter().flatten().any(|a| a == wanted));
    if !for_us {
        return Err(Status::unauthenticated(format!("the token is not for the audience {}", audience.unwrap_or(""))));
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
