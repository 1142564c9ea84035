//! The controller's check of agents' credentials in Kubernetes mode, through real TokenReviews to the fake API
//! server (which, as the real one, authenticates a token only for the audiences it was minted for): a projected
//! token for the controller's audience is accepted; tokens for other audiences are refused; a token for the API
//! server's own audience (what agents before audience-bound tokens sent) only while legacy tokens are allowed.

use mesh_controller::auth::{Authenticator, DEFAULT_TOKEN_AUDIENCE, NODE_HEADER};
use mesh_tests::fakeapi::FakeApi;
use tonic::Code;

const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";
const NODE: (&str, &str) = ("authentication.kubernetes.io/node-name", "n1");

fn call(token: &str, node: &str) -> tonic::Request<()> {
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request.metadata_mut().insert(NODE_HEADER, node.parse().unwrap());
    request
}

async fn verdict(auth: &Authenticator, token: &str, node: &str) -> Result<String, Code> {
    auth.node_of(&call(token, node)).await.map_err(|s| s.code())
}

#[tokio::test]
async fn only_tokens_minted_for_the_controller_pass_unless_legacy_api_tokens_are_allowed() {
    mesh_agent::identity::crypto::install_process_default();
    let api = FakeApi::spawn().unwrap();
    api.add_token_for("bound", AGENT, &[NODE], &[DEFAULT_TOKEN_AUDIENCE]);
    api.add_token("default-sa-token", AGENT, &[NODE]);
    api.add_token_for("for-vault", AGENT, &[NODE], &["vault"]);
    api.add_token_for("other-account", "system:serviceaccount:shop:cart", &[NODE], &[DEFAULT_TOKEN_AUDIENCE]);
    let client = || kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap();
    let service_account = "nodemesh-system:nodemesh-agent";

    let strict = Authenticator::token_review(client(), service_account, DEFAULT_TOKEN_AUDIENCE, false);
    assert_eq!(verdict(&strict, "bound", "n1").await, Ok("n1".to_string()));
    assert_eq!(verdict(&strict, "bound", "n2").await, Err(Code::PermissionDenied), "another node's token");
    assert_eq!(verdict(&strict, "default-sa-token", "n1").await, Err(Code::Unauthenticated));
    assert_eq!(verdict(&strict, "for-vault", "n1").await, Err(Code::Unauthenticated));
    assert_eq!(verdict(&strict, "other-account", "n1").await, Err(Code::PermissionDenied));
    assert_eq!(verdict(&strict, "guess", "n1").await, Err(Code::Unauthenticated));

    // An upgrade: agents of the previous release still send their default token.
    let upgrading = Authenticator::token_review(client(), service_account, DEFAULT_TOKEN_AUDIENCE, true);
    assert_eq!(verdict(&upgrading, "default-sa-token", "n1").await, Ok("n1".to_string()));
    assert_eq!(verdict(&upgrading, "bound", "n1").await, Ok("n1".to_string()));
    assert_eq!(verdict(&upgrading, "for-vault", "n1").await, Err(Code::Unauthenticated), "only the API's audience");
    assert_eq!(verdict(&upgrading, "other-account", "n1").await, Err(Code::PermissionDenied));

    // A controller configured for another audience refuses tokens for the default one.
    let elsewhere = Authenticator::token_review(client(), service_account, "mesh.example", false);
    assert_eq!(verdict(&elsewhere, "bound", "n1").await, Err(Code::Unauthenticated));
}
