//! Security policy in the config model: PeerAuthentication (mTLS mode) and AuthorizationPolicy (L4 rules), with
//! Istio's semantics so policies port over. Evaluation lives here too, so every config source and the agent
//! share one definition of what a policy means.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Plaintext inbound (port 15006) is accepted as well as mTLS.
    #[default]
    Permissive,
    /// Only mTLS (HBONE on 15008) is accepted; plaintext inbound is refused.
    Strict,
}

/// mTLS mode for the workloads of one namespace, or those of it matching `selector`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// Labels a workload must carry (all of them). Absent: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub action: Action,
    /// A policy matches a connection when any rule does. No rules: ALLOW matches nothing (denies all),
    /// DENY matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Matches when any `from` entry matches (or there is none) and any `to` entry matches (or there is none).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
}

/// Every field given must match; a list matches when any entry does, a `not` list when none does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// `cluster.local/ns/shop/sa/cart` (a `spiffe://` prefix is accepted); `*` any authenticated peer;
    /// `prefix*` and `*suffix` wildcards.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// CIDRs of the source IP, e.g. `10.0.0.0/8`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>"))]
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
    /// HTTP methods (`GET`, `POST`); L7.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths, with `prefix*`, `*suffix` and `*` wildcards; L7.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Request headers that must be present with one of the listed values (wildcards as for paths); L7.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
}

/// What the destination agent knows about one inbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// Verified peer SPIFFE ID (`spiffe://td/ns/x/sa/y`); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
    /// The HTTP request, when the decision is taken per request; `None` at connection level.
    pub request: Option<Request<'a>>,
}

/// What L7 rules look at. Header names are lower case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, with the reason and the deciding policy (`namespace/name`), for logs and metrics.
    Deny {
        reason: DenyReason,
        policy: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    DenyPolicy,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatch,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyPolicy => "authz_deny_policy",
            DenyReason::NoAllowMatch => "authz_no_allow_match",
        }
    }
}

pub fn selector_matches(selector: Option<&BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The mTLS mode for a workload: a workload-selecting policy beats a namespace-wide one, which beats the default.
pub fn mtls_mode(
    policies: &[PeerAuthentication],
    default: MtlsMode,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> MtlsMode {
    let in_ns = || policies.iter().filter(|p| p.namespace == namespace);
    in_ns()
        .find(|p| p.selector.is_some() && selector_matches(p.selector.as_ref(), labels))
        .or_else(|| in_ns().find(|p| p.selector.is_none()))
        .map_or(default, |p| p.mode)
}

/// Istio's order: any matching DENY refuses; then, if any ALLOW policy selects the workload, one must match;
/// no policy at all allows.
pub fn authorize(
    policies: &[AuthorizationPolicy],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    conn: &Connection<'_>,
) -> Decision {
    let selected: Vec<&AuthorizationPolicy> =
        policies.iter().filter(|p| p.namespace == namespace && selector_matches(p.selector.as_ref(), labels)).collect();
    let id = |p: &AuthorizationPolicy| format!("{}/{}", p.namespace, p.name);
    // Without a request, L7 conditions cannot be checked: a DENY rule with them counts as matching and an ALLOW
    // rule with them as not matching, so missing L7 information never lets a connection through (as ztunnel).
    let deny_matches = |r: &Rule| r.matches_assuming(conn, true);
    if let Some(p) = selected.iter().find(|p| p.action == Action::Deny && p.rules.iter().any(deny_matches)) {
        return Decision::Deny { reason: DenyReason::DenyPolicy, policy: Some(id(p)) };
    }
    let allows: Vec<&&AuthorizationPolicy> = selected.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| p.rules.iter().any(|r| r.matches_assuming(conn, false))) {
        Decision::Allow
    } else {
        Decision::Deny { reason: DenyReason::NoAllowMatch, policy: None }
    }
}

/// Whether a policy selecting the workload has L7 conditions, so decisions need the request (the agent then
/// parses HTTP on the workload's inbound connections).
pub fn needs_request(policies: &[AuthorizationPolicy], namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    policies
        .iter()
        .filter(|p| p.namespace == namespace && selector_matches(p.selector.as_ref(), labels))
        .flat_map(|p| &p.rules)
        .flat_map(|r| &r.to)
        .any(Operation::has_l7)
}

impl Rule {
    /// `l7_unknown` is the answer for L7 conditions when `conn` carries no request.
    fn matches_assuming(&self, conn: &Connection<'_>, l7_unknown: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn, l7_unknown)))
    }
}

/// Strips the `spiffe://` scheme: policies name principals as Istio does (`td/ns/x/sa/y`).
fn principal_name(p: &str) -> &str {
    p.strip_prefix("spiffe://").unwrap_or(p)
}

/// `principal` (or a policy's pattern for one) with an aliased trust domain moved into the mesh's own, so that
/// the mesh's trust domain and its aliases name the same peers (Istio's `trustDomainAliases`); `None` when it
/// has no alias to fold (wildcard trust domains stay as written).
pub fn fold_trust_domain(principal: &str, mesh: &str, aliases: &[String]) -> Option<String> {
    let (scheme, name) = match principal.strip_prefix("spiffe://") {
        Some(name) => ("spiffe://", name),
        None => ("", principal),
    };
    let (td, rest) = name.split_once('/')?;
    aliases.iter().any(|a| a == td).then(|| format!("{scheme}{mesh}/{rest}"))
}

fn principal_matches(pattern: &str, principal: Option<&str>) -> bool {
    let Some(principal) = principal.map(principal_name) else { return false };
    wildcard_matches(principal_name(pattern), principal)
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` for anything.
fn wildcard_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        value == pattern
    }
}

/// Namespace of a SPIFFE ID `spiffe://td/ns/<namespace>/sa/<account>`.
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let mut parts = principal_name(principal).split('/');
    parts.next()?;
    (parts.next()? == "ns").then(|| parts.next()).flatten()
}

impl Source {
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        let ns = conn.principal.and_then(principal_namespace);
        let field = |values: &[String], m: &dyn Fn(&str) -> bool| values.is_empty() || values.iter().any(|v| m(v));
        let not_field = |values: &[String], m: &dyn Fn(&str) -> bool| !values.iter().any(|v| m(v));
        field(&self.principals, &|p| principal_matches(p, conn.principal))
            && not_field(&self.not_principals, &|p| principal_matches(p, conn.principal))
            && field(&self.namespaces, &|n| ns == Some(n))
            && not_field(&self.not_namespaces, &|n| ns == Some(n))
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|b| b.contains(&conn.source_ip)))
            && !self.not_ip_blocks.iter().any(|b| b.contains(&conn.source_ip))
    }
}

impl Operation {
    fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.headers.is_empty())
    }

    fn matches(&self, conn: &Connection<'_>, l7_unknown: bool) -> bool {
        let port = conn.destination_port;
        let l4 = (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port);
        if !l4 || !self.has_l7() {
            return l4;
        }
        let Some(req) = &conn.request else { return l7_unknown };
        let any = |patterns: &[String], value: &str| patterns.iter().any(|p| wildcard_matches(p, value));
        let method_is = |m: &String| m.eq_ignore_ascii_case(req.method);
        (self.methods.is_empty() || self.methods.iter().any(method_is))
            && !self.not_methods.iter().any(method_is)
            && (self.paths.is_empty() || any(&self.paths, req.path))
            && !any(&self.not_paths, req.path)
            && self.headers.iter().all(|(name, values)| {
                req.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case(name) && (values.is_empty() || any(values, v)))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn conn<'a>(principal: Option<&'a str>, ip: &str, port: u16) -> Connection<'a> {
        Connection { principal, source_ip: ip.parse().unwrap(), destination_port: port, request: None }
    }

    const FRONT: Option<&str> = Some("spiffe://cluster.local/ns/web/sa/frontend");
    const ADMIN: Option<&str> = Some("spiffe://cluster.local/ns/ops/sa/admin");

    #[test]
    fn no_policy_allows_and_allow_policies_restrict() {
        let app = labels(&[("app", "cart")]);
        assert_eq!(authorize(&[], "shop", &app, &conn(None, "10.0.0.1", 80)), Decision::Allow);
        let p = policies(
            r#"
- namespace: shop
  name: front-only
  selector: {app: cart}
  rules: [{from: [{principals: ["cluster.local/ns/web/sa/frontend"]}], to: [{ports: [8080]}]}]
"#,
        );
        assert_eq!(authorize(&p, "shop", &app, &conn(FRONT, "10.0.0.1", 8080)), Decision::Allow);
        let wrong_port = authorize(&p, "shop", &app, &conn(FRONT, "10.0.0.1", 9090));
        assert_eq!(wrong_port, Decision::Deny { reason: DenyReason::NoAllowMatch, policy: None });
        assert!(matches!(authorize(&p, "shop", &app, &conn(None, "10.0.0.1", 8080)), Decision::Deny { .. }));
        // Another namespace, or a workload the selector does not pick, is unaffected.
        assert_eq!(authorize(&p, "other", &app, &conn(None, "10.0.0.1", 1)), Decision::Allow);
        assert_eq!(authorize(&p, "shop", &labels(&[("app", "db")]), &conn(None, "10.0.0.1", 1)), Decision::Allow);
    }

    #[test]
    fn deny_overrides_allow() {
        let p = policies(
            r#"
- {namespace: shop, name: all, rules: [{}]}
- {namespace: shop, name: no-ops, action: DENY, rules: [{from: [{namespaces: [ops]}]}]}
"#,
        );
        let none = BTreeMap::new();
        assert_eq!(authorize(&p, "shop", &none, &conn(FRONT, "10.0.0.1", 80)), Decision::Allow);
        assert_eq!(
            authorize(&p, "shop", &none, &conn(ADMIN, "10.0.0.1", 80)),
            Decision::Deny { reason: DenyReason::DenyPolicy, policy: Some("shop/no-ops".into()) }
        );
    }

    #[test]
    fn empty_allow_policy_denies_everything() {
        let p = policies("- {namespace: shop, name: lockdown}");
        assert!(matches!(authorize(&p, "shop", &BTreeMap::new(), &conn(FRONT, "10.0.0.1", 80)), Decision::Deny { .. }));
    }

    #[test]
    fn wildcards_not_forms_and_ip_blocks() {
        let src: Source = serde_yaml::from_str(
            "{principals: ['*/sa/frontend', 'cluster.local/ns/ops/*'], notIpBlocks: [10.9.0.0/16], ipBlocks: [10.0.0.0/8]}",
        )
        .unwrap();
        assert!(src.matches(&conn(FRONT, "10.1.0.1", 80)));
        assert!(src.matches(&conn(ADMIN, "10.1.0.1", 80)));
        assert!(!src.matches(&conn(FRONT, "10.9.0.1", 80)), "notIpBlocks");
        assert!(!src.matches(&conn(FRONT, "192.168.0.1", 80)), "ipBlocks");
        assert!(!src.matches(&conn(Some("spiffe://cluster.local/ns/web/sa/other"), "10.1.0.1", 80)));
        let any: Source = serde_yaml::from_str("{principals: ['*'], notNamespaces: [ops]}").unwrap();
        assert!(any.matches(&conn(FRONT, "10.1.0.1", 80)));
        assert!(!any.matches(&conn(ADMIN, "10.1.0.1", 80)));
        assert!(!any.matches(&conn(None, "10.1.0.1", 80)), "`*` needs an authenticated peer");
        let op: Operation = serde_yaml::from_str("{notPorts: [22]}").unwrap();
        assert!(op.matches(&conn(None, "10.1.0.1", 80), false) && !op.matches(&conn(None, "10.1.0.1", 22), false));
    }

    #[test]
    fn l7_rules_per_request_and_fail_closed_without_one() {
        let p = policies(
            r#"
- {namespace: shop, name: public-get, rules: [{to: [{methods: [GET], paths: ["/public/*"]}]}]}
- {namespace: shop, name: no-admin, action: DENY, rules: [{to: [{paths: ["/admin*"], headers: {x-user: ["*"]}}]}]}
"#,
        );
        let none = BTreeMap::new();
        let at = |method, path, headers| Connection {
            request: Some(Request { method, path, headers }),
            ..conn(FRONT, "10.0.0.1", 80)
        };
        assert_eq!(authorize(&p, "shop", &none, &at("GET", "/public/x", &[])), Decision::Allow);
        assert!(matches!(authorize(&p, "shop", &none, &at("POST", "/public/x", &[])), Decision::Deny { .. }));
        assert!(matches!(authorize(&p, "shop", &none, &at("GET", "/private", &[])), Decision::Deny { .. }));
        let admin = authorize(&p, "shop", &none, &at("GET", "/admin", &[("x-user", "bob")]));
        assert_eq!(admin, Decision::Deny { reason: DenyReason::DenyPolicy, policy: Some("shop/no-admin".into()) });
        // At connection level the DENY rule's L7 part is unknown and counts as matching.
        let l4 = authorize(&p, "shop", &none, &conn(FRONT, "10.0.0.1", 80));
        assert_eq!(l4, Decision::Deny { reason: DenyReason::DenyPolicy, policy: Some("shop/no-admin".into()) });
    }

    #[test]
    fn most_specific_peer_authentication_wins() {
        let p: Vec<PeerAuthentication> = serde_yaml::from_str(
            "[{namespace: shop, mode: STRICT}, {namespace: shop, selector: {app: legacy}, mode: PERMISSIVE}]",
        )
        .unwrap();
        let legacy = labels(&[("app", "legacy")]);
        assert_eq!(mtls_mode(&p, MtlsMode::Permissive, "shop", &legacy), MtlsMode::Permissive);
        assert_eq!(mtls_mode(&p, MtlsMode::Permissive, "shop", &labels(&[("app", "cart")])), MtlsMode::Strict);
        assert_eq!(mtls_mode(&p, MtlsMode::Strict, "other", &legacy), MtlsMode::Strict);
    }

    #[test]
    fn aliased_trust_domains_fold_into_the_mesh_one() {
        let aliases = ["old.td".to_string()];
        let fold = |p| fold_trust_domain(p, "new.td", &aliases);
        assert_eq!(fold("spiffe://old.td/ns/a/sa/b").as_deref(), Some("spiffe://new.td/ns/a/sa/b"));
        assert_eq!(fold("old.td/ns/a/sa/*").as_deref(), Some("new.td/ns/a/sa/*"));
        for unchanged in ["new.td/ns/a/sa/b", "spiffe://other.td/ns/a/sa/b", "*/sa/b", "*", "old.td"] {
            assert_eq!(fold(unchanged), None, "{unchanged}");
        }
    }

    #[test]
    fn principal_namespaces() {
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/shop/sa/cart"), Some("shop"));
        assert_eq!(principal_namespace("cluster.local/ns/shop/sa/cart"), Some("shop"));
        assert_eq!(principal_namespace("spiffe://x/other"), None);
    }
}
