//! Checking a custom resource against its CRD's OpenAPI schema — the very schema `manifests/crds/` installs,
//! generated from the Rust types, so there is one source of truth for what a valid object is. The API server
//! applies these rules in Kubernetes; the directory source has none, and without this a `percent: 150` or a
//! `fixedDelay: 2 seconds` was applied as it came. Unknown fields are errors, as with
//! `kubectl apply --validate=strict`: pruned silently, a misspelled `rules` turns an ALLOW policy into "deny
//! everything". Covers the keywords the generated schemas use (type, properties, required, nullable,
//! additionalProperties, items, enum, minimum/maximum and integer formats, pattern, min/maxLength).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// The spec schema of each nodemesh.io kind, by `(apiVersion, kind)`.
fn schemas() -> &'static HashMap<(String, String), Value> {
    static SCHEMAS: OnceLock<HashMap<(String, String), Value>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut out = HashMap::new();
        for crd in crate::crds::definitions() {
            for version in crd.spec.versions {
                let schema =
                    version.schema.and_then(|s| s.open_api_v3_schema).and_then(|s| serde_json::to_value(s).ok());
                if let Some(spec) = schema.as_ref().and_then(|s| s.get("properties")?.get("spec")) {
                    let api_version = format!("{}/{}", crd.spec.group, version.name);
                    out.insert((api_version, crd.spec.names.kind.clone()), spec.clone());
                }
            }
        }
        out
    })
}

/// Checks the `spec` of an object of `api_version` and `kind` (kinds that are not nodemesh.io's pass). The
/// error lists every problem with its path.
pub fn check_spec(api_version: &str, kind: &str, spec: &Value) -> Result<(), String> {
    let Some(schema) = schemas().get(&(api_version.to_string(), kind.to_string())) else { return Ok(()) };
    let mut problems = Vec::new();
    check(schema, spec, "spec", &mut problems);
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            out.push(format!("{path}: must be set"));
        }
        return;
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => match value.as_object() {
            Some(fields) => object(schema, fields, path, out),
            None => out.push(format!("{path}: must be an object")),
        },
        Some("array") => match value.as_array() {
            Some(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        check(item_schema, item, &format!("{path}[{i}]"), out);
                    }
                }
            }
            None => out.push(format!("{path}: must be a list")),
        },
        Some("string") => match value.as_str() {
            Some(s) => string(schema, s, path, out),
            None => out.push(format!("{path}: must be a string")),
        },
        Some("integer") => match value.as_i64().map(|i| i as f64).or_else(|| value.as_u64().map(|u| u as f64)) {
            Some(n) => number(schema, n, path, out),
            None => out.push(format!("{path}: {value} is not an integer")),
        },
        Some("number") => match value.as_f64() {
            Some(n) => number(schema, n, path, out),
            None => out.push(format!("{path}: {value} is not a number")),
        },
        Some("boolean") if !value.is_boolean() => out.push(format!("{path}: {value} is not true or false")),
        _ => {}
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
            out.push(format!("{path}: {value} is not one of {}", names.join(", ")));
        }
    }
}

fn object(schema: &Value, fields: &Map<String, Value>, path: &str, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    let known = schema.get("properties").and_then(Value::as_object);
    let extra = schema.get("additionalProperties").filter(|a| a.is_object());
    for (name, value) in fields {
        let field_path = format!("{path}.{name}");
        match (known.and_then(|k| k.get(name)), extra) {
            (Some(field_schema), _) | (None, Some(field_schema)) => check(field_schema, value, &field_path, out),
            (None, None) => out.push(format!("{field_path}: unknown field")),
        }
    }
    for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        if let Some(name) = required.as_str().filter(|name| !fields.contains_key(*name)) {
            out.push(format!("{path}.{name}: required"));
        }
    }
}

fn number(schema: &Value, n: f64, path: &str, out: &mut Vec<String>) {
    let (mut low, mut high) =
        (schema.get("minimum").and_then(Value::as_f64), schema.get("maximum").and_then(Value::as_f64));
    // Unsigned and sized integers carry their range in `format` only.
    let format_range = match schema.get("format").and_then(Value::as_str) {
        Some("uint8") => Some((0.0, u8::MAX as f64)),
        Some("uint16") => Some((0.0, u16::MAX as f64)),
        Some("uint32") => Some((0.0, u32::MAX as f64)),
        Some("uint64" | "uint") => Some((0.0, u64::MAX as f64)),
        Some("int32") => Some((i32::MIN as f64, i32::MAX as f64)),
        _ => None,
    };
    if let Some((format_low, format_high)) = format_range {
        low = Some(low.map_or(format_low, |l| l.max(format_low)));
        high = Some(high.map_or(format_high, |h| h.min(format_high)));
    }
    if let Some(low) = low.filter(|low| n < *low) {
        out.push(format!("{path}: {n} is below the minimum {low}"));
    }
    if let Some(high) = high.filter(|high| n > *high) {
        out.push(format!("{path}: {n} is above the maximum {high}"));
    }
}

fn string(schema: &Value, s: &str, path: &str, out: &mut Vec<String>) {
    let length = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64).filter(|min| length < *min) {
        out.push(format!("{path}: {s:?} is shorter than {min} characters"));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64).filter(|max| length > *max) {
        out.push(format!("{path}: longer than {max} characters"));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex_lite::Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => out.push(format!("{path}: {s:?} does not match {pattern}")),
            Ok(_) => {}
            // The schemas are generated from our own types: a pattern that does not compile is our bug.
            Err(e) => out.push(format!("{path}: the schema's pattern {pattern} does not compile: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const V1: &str = "nodemesh.io/v1alpha1";

    fn problems(kind: &str, spec: Value) -> String {
        check_spec(V1, kind, &spec).err().unwrap_or_default()
    }

    #[test]
    fn traffic_policy_fields_are_checked_by_the_crd_schema() {
        let target = json!({"name": "ratings"});
        let fault = |fault: Value| json!({"targetRef": target, "faultInjection": fault});
        assert_eq!(problems("TrafficPolicy", fault(json!({"abort": {"httpStatus": 503, "percent": 50}}))), "");
        let low = problems("TrafficPolicy", fault(json!({"abort": {"httpStatus": 503, "percent": -10}})));
        assert!(low.contains("spec.faultInjection.abort.percent: -10 is below the minimum 0"), "{low}");
        let high = problems("TrafficPolicy", fault(json!({"delay": {"fixedDelay": "1s", "percent": 150}})));
        assert!(high.contains("percent: 150 is above the maximum 100"), "{high}");
        let status = problems("TrafficPolicy", fault(json!({"abort": {"httpStatus": 999, "percent": 5}})));
        assert!(status.contains("httpStatus: 999 is above the maximum 599"), "{status}");
        let delay = problems("TrafficPolicy", fault(json!({"delay": {"fixedDelay": "2 seconds", "percent": 5}})));
        assert!(delay.contains("fixedDelay: \"2 seconds\" does not match"), "{delay}");
        let budget = problems("TrafficPolicy", json!({"targetRef": target, "retryBudget": {"percent": 4294967296u64}}));
        assert!(budget.contains("above the maximum"), "{budget}");
        let algorithm =
            problems("TrafficPolicy", json!({"targetRef": target, "loadBalancer": {"algorithm": "Random"}}));
        assert!(algorithm.contains("\"Random\" is not one of"), "{algorithm}");
        let missing = problems("TrafficPolicy", json!({"faultInjection": {}}));
        assert!(missing.contains("spec.targetRef: required"), "{missing}");
    }

    #[test]
    fn unknown_fields_anywhere_are_errors() {
        let typo = problems("AuthorizationPolicy", json!({"action": "ALLOW", "rulez": [{}]}));
        assert_eq!(typo, "spec.rulez: unknown field");
        let deep = problems("AuthorizationPolicy", json!({"rules": [{"from": [{"principal": ["x"]}]}]}));
        assert_eq!(deep, "spec.rules[0].from[0].principal: unknown field");
        // Maps (label selectors) take any key.
        let labels = json!({"selector": {"matchLabels": {"app": "web", "any-key": "v"}}, "mode": "STRICT"});
        assert_eq!(problems("PeerAuthentication", labels), "");
        let mode = problems("PeerAuthentication", json!({"mode": "LOOSE"}));
        assert!(mode.contains("spec.mode: \"LOOSE\" is not one of"), "{mode}");
    }

    #[test]
    fn kinds_without_a_schema_here_pass() {
        assert_eq!(check_spec("v1", "Service", &json!({"anything": 1})), Ok(()));
        assert_eq!(check_spec("gateway.networking.k8s.io/v1", "HTTPRoute", &json!({"x": 1})), Ok(()));
    }
}
