//! Gateway API HTTPRoute and GRPCRoute (GAMMA: a Service as `parentRef`) into the agent's route model. Specs are
//! read through the `gateway-api` crate's types (experimental channel, for GEP-1731 retries), so anything the
//! Gateway API schema does not allow fails here as it would on the API server.

use gateway_api::experimental::grpcroutes::{GRPCRouteRules, GRPCRouteRulesMatches, GRPCRouteSpec};
use gateway_api::experimental::httproutes::{
    HTTPRouteRules, HTTPRouteRulesBackendRefs, HTTPRouteRulesFilters, HTTPRouteRulesMatches, HTTPRouteSpec,
};
use mesh_common::route::{
    Backend, Filter, HeaderModifier, Mirror, PathMatch, PathModifier, Redirect, Retry, Rewrite, Route, RouteKind,
    RouteMatch, RouteRule, ServiceRef, Timeouts, ValueMatch,
};
use serde::Serialize;
use serde_json::Value;

use crate::mesh::{Object, Rejection};

fn unsupported(message: impl Into<String>) -> Rejection {
    Rejection { reason: "UnsupportedValue", message: message.into() }
}

/// The route, with `parents` holding only its Service parentRefs; `None` when it has none (it belongs to a
/// Gateway, which is not the mesh's business).
pub fn route(o: &Object) -> Result<Option<Route>, Rejection> {
    let invalid = |e: serde_json::Error| Rejection { reason: "Invalid", message: format!("spec: {e}") };
    let namespace = o.namespace().to_string();
    let (kind, parent_refs, hostnames, rules) = match o.kind.as_str() {
        "HTTPRoute" => {
            let spec: HTTPRouteSpec = serde_json::from_value(o.spec.clone()).map_err(invalid)?;
            let rules: Result<Vec<RouteRule>, Rejection> =
                spec.rules.unwrap_or_default().iter().map(|r| http_rule(r, &namespace)).collect();
            (RouteKind::Http, json(&spec.parent_refs), spec.hostnames, rules)
        }
        _ => {
            let spec: GRPCRouteSpec = serde_json::from_value(o.spec.clone()).map_err(invalid)?;
            let rules: Result<Vec<RouteRule>, Rejection> =
                spec.rules.unwrap_or_default().iter().map(|r| grpc_rule(r, &namespace)).collect();
            (RouteKind::Grpc, json(&spec.parent_refs), spec.hostnames, rules)
        }
    };
    let parents: Vec<ServiceRef> = parent_refs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service(p, "Gateway"))
        .map(|p| service_ref(p, &namespace))
        .collect::<Result<_, _>>()?;
    if parents.is_empty() {
        return Ok(None);
    }
    Ok(Some(Route {
        namespace,
        name: o.metadata.name.clone(),
        kind,
        created: o.metadata.creation_timestamp.clone(),
        parents,
        hostnames: hostnames.unwrap_or_default(),
        rules: rules?,
    }))
}

fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A parentRef's kind defaults to Gateway, a backendRef's to Service; a Service is in the core group.
fn is_service(r: &Value, default_kind: &str) -> bool {
    r.get("kind").and_then(Value::as_str).unwrap_or(default_kind) == "Service"
        && matches!(r.get("group").and_then(Value::as_str), None | Some("" | "core"))
}

fn service_ref(r: &Value, route_namespace: &str) -> Result<ServiceRef, Rejection> {
    let port = match r.get("port").and_then(Value::as_i64) {
        None => None,
        Some(p) => Some(u16::try_from(p).map_err(|_| unsupported(format!("port {p} is out of range")))?),
    };
    Ok(ServiceRef {
        namespace: r.get("namespace").and_then(Value::as_str).unwrap_or(route_namespace).to_string(),
        name: r.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
        port,
    })
}

fn backend(r: &Value, filters: Vec<Filter>, route_namespace: &str) -> Result<Backend, Rejection> {
    if !is_service(r, "Service") {
        return Err(unsupported("backendRefs must be Services"));
    }
    let weight = r.get("weight").and_then(Value::as_i64).unwrap_or(1);
    Ok(Backend {
        service: service_ref(r, route_namespace)?,
        weight: u32::try_from(weight).map_err(|_| unsupported(format!("weight {weight} is negative")))?,
        filters,
    })
}

fn http_rule(rule: &HTTPRouteRules, ns: &str) -> Result<RouteRule, Rejection> {
    if rule.session_persistence.is_some() {
        return Err(unsupported("sessionPersistence is not supported"));
    }
    let mut backends = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        backends.push(http_backend(b, ns)?);
    }
    let timeouts = rule
        .timeouts
        .as_ref()
        .map(|t| {
            Ok::<_, Rejection>(Timeouts {
                request_ms: t.request.as_deref().map(millis).transpose()?,
                backend_request_ms: t.backend_request.as_deref().map(millis).transpose()?,
            })
        })
        .transpose()?;
    let retry = rule
        .retry
        .as_ref()
        .map(|r| {
            let codes = r.codes.iter().flatten().map(|c| u16::try_from(*c).unwrap_or(0)).collect();
            Ok::<_, Rejection>(Retry {
                attempts: r.attempts.map_or(1, |a| a.clamp(0, 100) as u32),
                codes,
                backoff_ms: r.backoff.as_deref().map(millis).transpose()?,
            })
        })
        .transpose()?;
    Ok(RouteRule {
        name: rule.name.clone(),
        matches: rule.matches.iter().flatten().map(http_match).collect(),
        filters: filters(&json(&rule.filters), ns)?,
        backends,
        timeouts,
        retry,
    })
}

fn http_backend(b: &HTTPRouteRulesBackendRefs, ns: &str) -> Result<Backend, Rejection> {
    backend(&json(b), filters(&json(&b.filters), ns)?, ns)
}

/// Header and query-parameter matches of both route kinds: `{name, value, type: Exact|RegularExpression}`.
fn value_matches(list: Option<&Value>) -> Vec<ValueMatch> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|h| ValueMatch {
            name: str_of(h, "name").to_string(),
            value: str_of(h, "value").to_string(),
            regex: str_of(h, "type") == "RegularExpression",
        })
        .collect()
}

fn http_match(m: &HTTPRouteRulesMatches) -> RouteMatch {
    let m = json(m);
    let path = m.get("path").map(|p| {
        let value = p.get("value").and_then(Value::as_str).unwrap_or("/").to_string();
        match str_of(p, "type") {
            "Exact" => PathMatch::Exact(value),
            "RegularExpression" => PathMatch::RegularExpression(value),
            _ => PathMatch::PathPrefix(value),
        }
    });
    RouteMatch {
        path,
        headers: value_matches(m.get("headers")),
        query_params: value_matches(m.get("queryParams")),
        method: m.get("method").and_then(Value::as_str).map(String::from),
    }
}

fn grpc_rule(rule: &GRPCRouteRules, ns: &str) -> Result<RouteRule, Rejection> {
    if rule.session_persistence.is_some() {
        return Err(unsupported("sessionPersistence is not supported"));
    }
    let mut backends = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        backends.push(backend(&json(b), filters(&json(&b.filters), ns)?, ns)?);
    }
    Ok(RouteRule {
        name: rule.name.clone(),
        matches: rule.matches.iter().flatten().map(grpc_match).collect(),
        filters: filters(&json(&rule.filters), ns)?,
        backends,
        timeouts: None,
        retry: None,
    })
}

/// A gRPC call is a POST to `/package.Service/Method`.
fn grpc_match(m: &GRPCRouteRulesMatches) -> RouteMatch {
    let m = json(m);
    let method = m.get("method");
    let service = method.and_then(|x| x.get("service")).and_then(Value::as_str);
    let name = method.and_then(|x| x.get("method")).and_then(Value::as_str);
    let regex = method.map(|x| str_of(x, "type")) == Some("RegularExpression");
    let path = match (service, name, regex) {
        (None, None, _) => None,
        (s, n, true) => {
            Some(PathMatch::RegularExpression(format!("/{}/{}", s.unwrap_or("[^/]+"), n.unwrap_or("[^/]+"))))
        }
        (Some(s), Some(n), false) => Some(PathMatch::Exact(format!("/{s}/{n}"))),
        (Some(s), None, false) => Some(PathMatch::PathPrefix(format!("/{s}"))),
        (None, Some(n), false) => Some(PathMatch::RegularExpression(format!("/[^/]+/{}", regex_lite::escape(n)))),
    };
    RouteMatch { path, headers: value_matches(m.get("headers")), query_params: Vec::new(), method: None }
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// Route, backend and GRPCRoute filters share one JSON shape, so they are read as HTTPRoute rule filters.
fn filters(list: &Value, ns: &str) -> Result<Vec<Filter>, Rejection> {
    let list: Vec<HTTPRouteRulesFilters> = match list {
        Value::Null => return Ok(Vec::new()),
        v => serde_json::from_value(v.clone())
            .map_err(|e| Rejection { reason: "Invalid", message: format!("filters: {e}") })?,
    };
    list.iter().map(|f| filter(f, ns)).collect()
}

fn filter(f: &HTTPRouteRulesFilters, ns: &str) -> Result<Filter, Rejection> {
    let kind = json(&f.r#type);
    let kind = kind.as_str().unwrap_or_default();
    let missing = || Rejection { reason: "Invalid", message: format!("filter {kind} without its settings") };
    let header_modifier = |v: Value| HeaderModifier {
        set: pairs(v.get("set")),
        add: pairs(v.get("add")),
        remove: v.get("remove").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default(),
    };
    let path_modifier = |v: Option<&Value>| {
        v.and_then(|p| match str_of(p, "type") {
            "ReplaceFullPath" => Some(PathModifier::ReplaceFullPath(str_of(p, "replaceFullPath").into())),
            "ReplacePrefixMatch" => Some(PathModifier::ReplacePrefixMatch(str_of(p, "replacePrefixMatch").into())),
            _ => None,
        })
    };
    Ok(match kind {
        "RequestHeaderModifier" => Filter::RequestHeaderModifier(header_modifier(json(
            f.request_header_modifier.as_ref().ok_or_else(missing)?,
        ))),
        "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(header_modifier(json(
            f.response_header_modifier.as_ref().ok_or_else(missing)?,
        ))),
        "RequestRedirect" => {
            let r = json(f.request_redirect.as_ref().ok_or_else(missing)?);
            Filter::RequestRedirect(Redirect {
                scheme: r.get("scheme").and_then(Value::as_str).map(String::from),
                hostname: r.get("hostname").and_then(Value::as_str).map(String::from),
                path: path_modifier(r.get("path")),
                port: r.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()),
                status_code: r
                    .get("statusCode")
                    .and_then(|c| c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())))
                    .map_or(302, |c| c as u16),
            })
        }
        "URLRewrite" => {
            let r = json(f.url_rewrite.as_ref().ok_or_else(missing)?);
            Filter::UrlRewrite(Rewrite {
                hostname: r.get("hostname").and_then(Value::as_str).map(String::from),
                path: path_modifier(r.get("path")),
            })
        }
        "RequestMirror" => {
            let m = f.request_mirror.as_ref().ok_or_else(missing)?;
            let percent = match (&m.fraction, m.percent) {
                (Some(fr), _) => 100.0 * f64::from(fr.numerator) / f64::from(fr.denominator.unwrap_or(100).max(1)),
                (None, Some(p)) => f64::from(p),
                (None, None) => 100.0,
            };
            let target = backend(&json(&m.backend_ref), Vec::new(), ns)?;
            Filter::RequestMirror(Mirror { service: target.service, percent })
        }
        other => return Err(unsupported(format!("filter type {other} is not supported"))),
    })
}

fn pairs(v: Option<&Value>) -> Vec<(String, String)> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|h| (str_of(h, "name").to_string(), str_of(h, "value").to_string()))
        .collect()
}

/// Gateway API durations (`500ms`, `10s`, `1h30m`).
fn millis(d: &str) -> Result<u64, Rejection> {
    humantime::parse_duration(d)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| Rejection { reason: "Invalid", message: format!("duration {d:?}: {e}") })
}
