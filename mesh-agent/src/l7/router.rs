//! Route selection with Gateway API semantics. The routes that apply to one (Service, port, caller namespace)
//! are compiled once per config into a table of (rule, match) entries sorted by precedence, so a request is
//! routed by the first entry that matches it.
//!
//! Precedence (Gateway API, with Istio's placement of regular expressions): Exact path, then
//! RegularExpression (longer first), then PathPrefix (longer first); then a method match; then more header
//! matches; then more query matches; then the older route, then `namespace/name`, then rule and match order.
//! Consumer routes (in the caller's namespace) replace producer routes (in the Service's namespace) for that
//! caller, as GAMMA specifies.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::snapshot::Snapshot;
use http::{HeaderMap, Method};
use mesh_common::route::{PathMatch, Route, RouteMatch, RouteRule, ValueMatch};
use regex_lite::Regex;

/// The part of a request routing looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    pub fn new(method: &'a Method, uri: &'a http::Uri, headers: &'a HeaderMap) -> Self {
        RequestView { method, path: uri.path(), query: uri.query(), headers }
    }
}

/// The rule a request matched.
pub struct Selected<'a> {
    pub route: &'a Route,
    pub rule: &'a RouteRule,
    /// The PathPrefix that matched (for ReplacePrefixMatch rewrites and redirects).
    pub prefix: Option<&'a str>,
}

enum PathMatcher {
    Exact(String),
    /// Without the trailing slash; matches whole path segments.
    Prefix(String),
    Regex(Regex),
}

enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(e) => e == v,
            ValueMatcher::Regex(r) => r.is_match(v),
        }
    }
}

struct Entry {
    route: Arc<Route>,
    rule: usize,
    path: PathMatcher,
    /// The prefix as written, for rewrites.
    prefix: Option<String>,
    method: Option<Method>,
    headers: Vec<(String, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

/// Path kind, path length, no method, header and query match counts, creation time, `namespace/name`, rule.
type Precedence = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>, String, (String, String), usize);

/// Full-string regex match, as Gateway API means it.
fn anchored(re: &str) -> Result<Regex, regex_lite::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

fn value_matchers(list: &[ValueMatch], lowercase: bool) -> Result<Vec<(String, ValueMatcher)>, regex_lite::Error> {
    list.iter()
        .map(|m| {
            let name = if lowercase { m.name.to_ascii_lowercase() } else { m.name.clone() };
            let matcher =
                if m.regex { ValueMatcher::Regex(anchored(&m.value)?) } else { ValueMatcher::Exact(m.value.clone()) };
            Ok((name, matcher))
        })
        .collect()
}

impl Entry {
    fn compile(route: &Arc<Route>, rule: usize, m: &RouteMatch) -> Result<Self, String> {
        let bad = |e: regex_lite::Error| format!("route {}/{}: {e}", route.namespace, route.name);
        let (path, prefix) = match &m.path {
            Some(PathMatch::Exact(p)) => (PathMatcher::Exact(p.clone()), None),
            Some(PathMatch::RegularExpression(re)) => (PathMatcher::Regex(anchored(re).map_err(bad)?), None),
            Some(PathMatch::PathPrefix(p)) => {
                (PathMatcher::Prefix(p.trim_end_matches('/').to_string()), Some(p.clone()))
            }
            // Gateway API's default match is PathPrefix `/`.
            None => (PathMatcher::Prefix(String::new()), Some("/".to_string())),
        };
        let method =
            m.method.as_deref().map(|s| Method::from_bytes(s.as_bytes())).transpose().map_err(|e| e.to_string())?;
        Ok(Entry {
            route: route.clone(),
            rule,
            path,
            prefix,
            method,
            headers: value_matchers(&m.headers, true).map_err(bad)?,
            query: value_matchers(&m.query_params, false).map_err(bad)?,
        })
    }

    /// Sort key: smaller is more specific.
    fn precedence(&self) -> Precedence {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (0, p.len()),
            PathMatcher::Regex(r) => (1, r.as_str().len()),
            // As written: `/api/` is longer than `/api` although both match the same paths.
            PathMatcher::Prefix(p) => (2, self.prefix.as_ref().map_or(p.len(), String::len)),
        };
        (
            kind,
            Reverse(len),
            self.method.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query.len()),
            self.route.created.clone().unwrap_or_default(),
            (self.route.namespace.clone(), self.route.name.clone()),
            self.rule,
        )
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => req.path == p,
            PathMatcher::Regex(r) => r.is_match(req.path),
            PathMatcher::Prefix(p) => {
                req.path.starts_with(p.as_str()) && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self
                .headers
                .iter()
                .all(|(name, m)| req.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| m.matches(v)))
            && self.query.iter().all(|(name, m)| {
                req.query.is_some_and(|q| {
                    q.split('&')
                        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                        .any(|(k, v)| k == name && m.matches(v))
                })
            })
    }
}

#[derive(Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
}

impl RouteTable {
    /// The routes of `config` for callers in `caller_namespace` of `service_namespace/service` on `port`.
    pub fn build(config: &Snapshot, service_namespace: &str, service: &str, port: u16, caller_namespace: &str) -> Self {
        let attached = |r: &&Route| {
            r.parents
                .iter()
                .any(|p| p.namespace == service_namespace && p.name == service && p.port.is_none_or(|pp| pp == port))
        };
        let consumer: Vec<&Route> = if caller_namespace != service_namespace {
            config.routes.iter().filter(attached).filter(|r| r.namespace == caller_namespace).collect()
        } else {
            Vec::new()
        };
        let chosen = if consumer.is_empty() {
            config.routes.iter().filter(attached).filter(|r| r.namespace == service_namespace).collect()
        } else {
            consumer
        };
        let mut entries = Vec::new();
        for route in chosen {
            let route = Arc::new(route.clone());
            for (i, rule) in route.rules.iter().enumerate() {
                let default = [RouteMatch::default()];
                let matches = if rule.matches.is_empty() { &default[..] } else { &rule.matches[..] };
                for m in matches {
                    match Entry::compile(&route, i, m) {
                        Ok(e) => entries.push(e),
                        Err(e) => tracing::warn!(error = %e, "route match skipped"),
                    }
                }
            }
        }
        // Stable: equal keys keep match order within a rule.
        entries.sort_by_cached_key(Entry::precedence);
        RouteTable { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn select(&self, req: &RequestView<'_>) -> Option<Selected<'_>> {
        let e = self.entries.iter().find(|e| e.matches(req))?;
        Some(Selected { route: &e.route, rule: &e.route.rules[e.rule], prefix: e.prefix.as_deref() })
    }
}

type TableKey = (String, String, u16, String);

/// The tables of one config.
type Tables = (Option<Arc<Snapshot>>, HashMap<TableKey, Arc<RouteTable>>);

/// Route tables by (Service namespace, Service, port, caller namespace), built on first use after each config.
#[derive(Default)]
pub struct RouteTables {
    inner: Mutex<Tables>,
}

impl RouteTables {
    pub fn get(
        &self,
        config: &Arc<Snapshot>,
        service_namespace: &str,
        service: &str,
        port: u16,
        caller_namespace: &str,
    ) -> Arc<RouteTable> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !inner.0.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            *inner = (Some(config.clone()), HashMap::new());
        }
        let key = (service_namespace.to_string(), service.to_string(), port, caller_namespace.to_string());
        inner
            .1
            .entry(key)
            .or_insert_with(|| Arc::new(RouteTable::build(config, service_namespace, service, port, caller_namespace)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Snapshot {
        Snapshot::new(mesh_common::config::NodeConfig::from_yaml(yaml).unwrap())
    }

    const ROUTES: &str = r#"
routes:
  - namespace: shop
    name: api
    kind: HTTPRoute
    created: "2026-01-01T00:00:00Z"
    parents: [{namespace: shop, name: api}]
    rules:
      - name: catch-all
        backends: [{service: {namespace: shop, name: api-v1}, weight: 1}]
      - name: v2
        matches: [{path: {type: PathPrefix, value: /api/v2/}}]
        backends: [{service: {namespace: shop, name: api-v2}, weight: 1}]
      - name: exact
        matches: [{path: {type: Exact, value: /api/v2/health}}]
        backends: [{service: {namespace: shop, name: health}, weight: 1}]
      - name: beta
        matches: [{path: {type: PathPrefix, value: /api/v2}, headers: [{name: X-User, value: beta}]}]
        backends: [{service: {namespace: shop, name: api-beta}, weight: 1}]
      - name: regex
        matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}, queryParams: [{name: debug, value: "1"}]}]
        backends: [{service: {namespace: shop, name: items}, weight: 1}]
  - namespace: web
    name: consumer
    kind: HTTPRoute
    parents: [{namespace: shop, name: api, port: 80}]
    rules:
      - backends: [{service: {namespace: shop, name: api-canary}, weight: 1}]
"#;

    fn route(table: &RouteTable, method: &str, path_and_query: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let view = RequestView { method: &method, path, query, headers: &map };
        table.select(&view).map(|s| s.rule.backends[0].service.name.clone())
    }

    #[test]
    fn most_specific_match_wins() {
        let c = config(ROUTES);
        let t = RouteTable::build(&c, "shop", "api", 80, "shop");
        assert_eq!(route(&t, "GET", "/", &[]).as_deref(), Some("api-v1"));
        assert_eq!(route(&t, "GET", "/api/v2/x", &[]).as_deref(), Some("api-v2"));
        assert_eq!(route(&t, "GET", "/api/v2", &[]).as_deref(), Some("api-v2"), "trailing slash of the prefix ignored");
        assert_eq!(route(&t, "GET", "/api/v2x", &[]).as_deref(), Some("api-v1"), "prefixes match whole segments");
        assert_eq!(route(&t, "GET", "/api/v2/health", &[("x-user", "beta")]).as_deref(), Some("health"));
        assert_eq!(
            route(&t, "GET", "/api/v2/x", &[("x-user", "beta")]).as_deref(),
            Some("api-v2"),
            "longer prefix wins"
        );
        assert_eq!(route(&t, "GET", "/api/v2", &[("X-User", "beta")]).as_deref(), Some("api-v2"));
        assert_eq!(route(&t, "GET", "/items/42?debug=1", &[]).as_deref(), Some("items"));
        assert_eq!(route(&t, "GET", "/items/42?debug=0", &[]).as_deref(), Some("api-v1"));
        assert_eq!(route(&t, "GET", "/items/42x?debug=1", &[]).as_deref(), Some("api-v1"), "regex is anchored");
    }

    #[test]
    fn consumer_routes_replace_producer_routes_for_their_namespace() {
        let c = config(ROUTES);
        assert_eq!(
            route(&RouteTable::build(&c, "shop", "api", 80, "web"), "GET", "/api/v2/x", &[]).as_deref(),
            Some("api-canary")
        );
        assert_eq!(
            route(&RouteTable::build(&c, "shop", "api", 8080, "web"), "GET", "/", &[]).as_deref(),
            Some("api-v1"),
            "port-bound"
        );
        assert_eq!(
            route(&RouteTable::build(&c, "shop", "api", 80, "other"), "GET", "/", &[]).as_deref(),
            Some("api-v1")
        );
        assert!(RouteTable::build(&c, "shop", "cart", 80, "shop").is_empty());
    }

    #[test]
    fn header_precedence_and_age_break_ties() {
        let c = config(
            r#"
routes:
  - {namespace: a, name: young, kind: HTTPRoute, created: "2026-02-01T00:00:00Z", parents: [{namespace: a, name: s}],
     rules: [{matches: [{path: {type: PathPrefix, value: /x}}], backends: [{service: {namespace: a, name: young}, weight: 1}]}]}
  - {namespace: a, name: old, kind: HTTPRoute, created: "2026-01-01T00:00:00Z", parents: [{namespace: a, name: s}],
     rules: [{matches: [{path: {type: PathPrefix, value: /x}}], backends: [{service: {namespace: a, name: old}, weight: 1}]},
             {matches: [{path: {type: PathPrefix, value: /x}, method: POST}], backends: [{service: {namespace: a, name: post}, weight: 1}]}]}
"#,
        );
        let t = RouteTable::build(&c, "a", "s", 80, "a");
        assert_eq!(route(&t, "GET", "/x", &[]).as_deref(), Some("old"));
        assert_eq!(route(&t, "POST", "/x", &[]).as_deref(), Some("post"), "a method match beats none");
    }
}
