//! Gateway API filters on requests and responses: header modifiers, URL rewrites and redirects. Mirrors are
//! sent by the outbound pipeline (they need the body).

use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use mesh_common::route::{HeaderModifier, PathModifier, Redirect, Rewrite};

use crate::body::{self, Body};

/// RequestHeaderModifier / ResponseHeaderModifier: set replaces, add appends, remove deletes. Invalid names or
/// values (the controller validates them) are skipped.
pub fn modify_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    let parse = |k: &str, v: &str| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?));
    for (name, value) in m.set.iter().filter_map(|(k, v)| parse(k, v)) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(|(k, v)| parse(k, v)) {
        headers.append(name, value);
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// `path` with the matched `prefix` replaced (Gateway API: whole segments; `/` as replacement keeps one slash).
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let replacement = replacement.trim_end_matches('/');
    let joined = format!("{replacement}{rest}");
    if joined.is_empty() {
        "/".into()
    } else if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

fn modified_path(m: &PathModifier, path: &str, prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(r) => replace_prefix(path, prefix.unwrap_or("/"), r),
    }
}

/// The request's authority: the URI's (HTTP/2) or the Host header's (HTTP/1).
pub fn authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority().map(|a| a.to_string()).or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()).map(String::from))
}

/// URLRewrite: a new hostname (Host and :authority) and/or path; the query stays.
pub fn rewrite(r: &Rewrite, prefix: Option<&str>, uri: &mut Uri, headers: &mut HeaderMap) {
    let mut parts = std::mem::take(uri).into_parts();
    if let Some(host) = &r.hostname {
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert(HOST, value);
        }
        if parts.authority.is_some() {
            parts.authority = Authority::try_from(host.as_str()).ok().or(parts.authority);
        }
    }
    if let Some(m) = &r.path {
        let old = parts.path_and_query.clone().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut new = modified_path(m, old.path(), prefix);
        if let Some(q) = old.query() {
            new = format!("{new}?{q}");
        }
        parts.path_and_query = PathAndQuery::try_from(new).ok().or(Some(old));
    }
    *uri = Uri::from_parts(parts).unwrap_or_default();
}

/// RequestRedirect: the Location is the request's URL with the given parts replaced. A port is kept only when
/// neither it nor the scheme was changed, and left out when it is the scheme's default.
pub fn redirect(r: &Redirect, prefix: Option<&str>, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    let scheme = r.scheme.clone().unwrap_or_else(|| uri.scheme_str().unwrap_or("http").to_string());
    let authority = authority(uri, headers).and_then(|a| Authority::try_from(a).ok());
    let host = authority.as_ref().map(|a| a.host().to_string()).unwrap_or_default();
    let port = authority.as_ref().and_then(Authority::port_u16);
    let host = r.hostname.clone().unwrap_or(host);
    let port = r.port.or(if r.scheme.is_some() { None } else { port });
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = port.filter(|p| *p != default_port).map(|p| format!(":{p}")).unwrap_or_default();
    let path = match &r.path {
        Some(m) => modified_path(m, uri.path(), prefix),
        None => uri.path().to_string(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_gateway_api() {
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/xyz"), "/xyz/bar");
        assert_eq!(replace_prefix("/foo/bar", "/foo/", "/xyz/"), "/xyz/bar");
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/"), "/bar");
        assert_eq!(replace_prefix("/foo", "/foo", "/"), "/");
        assert_eq!(replace_prefix("/foo", "/foo", "/xyz"), "/xyz");
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        let m = HeaderModifier {
            set: vec![("x-a".into(), "2".into())],
            add: vec![("x-b".into(), "3".into()), ("x-a".into(), "4".into())],
            remove: vec!["X-Gone".into()],
        };
        modify_headers(&m, &mut h);
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["2", "4"]);
        assert_eq!(h["x-b"], "3");
        assert!(h.get("x-gone").is_none());
    }

    #[test]
    fn rewrite_keeps_the_query() {
        let mut uri: Uri = "/old/thing?q=1".parse().unwrap();
        let mut h = HeaderMap::new();
        let r = Rewrite {
            hostname: Some("new.example".into()),
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
        };
        rewrite(&r, Some("/old"), &mut uri, &mut h);
        assert_eq!(uri, "/new/thing?q=1");
        assert_eq!(h[HOST], "new.example");
        let mut uri: Uri = "http://a:8080/x".parse().unwrap();
        rewrite(&Rewrite { hostname: Some("b".into()), path: None }, None, &mut uri, &mut h);
        assert_eq!(uri, "http://b/x");
    }

    #[test]
    fn redirect_builds_the_location() {
        let mut h = HeaderMap::new();
        h.insert(HOST, "shop:8080".parse().unwrap());
        let uri: Uri = "/old/a?x=1".parse().unwrap();
        let r = Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            port: None,
            status_code: 301,
        };
        let resp = redirect(&r, Some("/old"), &uri, &h);
        assert_eq!(resp.status(), 301);
        assert_eq!(resp.headers()[LOCATION], "https://shop/new/a?x=1");
        let r = Redirect { hostname: Some("other".into()), status_code: 302, ..Default::default() };
        assert_eq!(redirect(&r, None, &uri, &h).headers()[LOCATION], "http://other:8080/old/a?x=1");
    }
}
