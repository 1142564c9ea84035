//! CRD structural-schema validation (the OpenAPI v3 subset CRDs use), with the API server's wording, so a bad
//! custom resource gets a 422 as it would from a real cluster. CEL rules (`x-kubernetes-validations`) are not run.

use serde_json::Value;

/// One violated rule: the field path (`spec.rules[0].weight`) and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub field: String,
    pub message: String,
}

pub fn validate(schema: &Value, value: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    check(schema, value, "", &mut causes);
    causes
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn check(schema: &Value, v: &Value, path: &str, out: &mut Vec<Cause>) {
    let mut fail = |message: String| out.push(Cause { field: path.to_string(), message });
    if v.is_null() {
        // Optional fields may be null where the schema says nullable; absent fields never get here.
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) && schema.get("type").is_some() {
            fail(format!("{path} in body must be of type {}: \"null\"", schema["type"].as_str().unwrap_or("object")));
        }
        return;
    }
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = type_of(v);
        if got != want && !(want == "number" && got == "integer") {
            fail(format!("{path} in body must be of type {want}: \"{got}\""));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            fail(format!("Unsupported value: {v}: supported values: {}", list.join(", ")));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                fail(format!("{path} in body should be greater than or equal to {}", schema["minimum"]));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                fail(format!("{path} in body should be less than or equal to {}", schema["maximum"]));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|m| len < m) {
            fail(format!("{path} in body should be at least {} chars long", schema["minLength"]));
        }
        if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| len > m) {
            fail(format!("{path} in body may not be longer than {}", schema["maxLength"]));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match regex_lite::Regex::new(pattern) {
                Ok(re) if !re.is_match(s) => fail(format!("{path} in body should match '{pattern}'")),
                Ok(_) => {}
                Err(e) => fail(format!("bad pattern {pattern:?} in the schema: {e}")),
            }
        }
    }
    for (keyword, any) in [("anyOf", true), ("oneOf", false)] {
        if let Some(branches) = schema.get(keyword).and_then(Value::as_array) {
            let ok = branches.iter().filter(|b| validate_at(b, v, path).is_empty()).count();
            if (any && ok == 0) || (!any && ok != 1) {
                fail(format!(
                    "{path} in body must match {} of the schemas in {keyword}",
                    if any { "one" } else { "exactly one" }
                ));
            }
        }
    }
    match v {
        Value::Object(map) => {
            for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(name) = required.as_str() {
                    if !map.contains_key(name) {
                        out.push(Cause {
                            field: join(path, name),
                            message: format!("{} : Required value", join(path, name)),
                        });
                    }
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, item) in map {
                let sub = properties.and_then(|p| p.get(key)).or(additional);
                if let Some(sub) = sub {
                    check(sub, item, &join(path, key), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(sub, item, &format!("{path}[{i}]"), out);
                }
            }
            if schema.get("maxItems").and_then(Value::as_u64).is_some_and(|m| items.len() as u64 > m) {
                out.push(Cause { field: path.into(), message: format!("{path}: Too many: {}", items.len()) });
            }
        }
        _ => {}
    }
}

fn validate_at(schema: &Value, v: &Value, path: &str) -> Vec<Cause> {
    let mut out = Vec::new();
    check(schema, v, path, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structural_rules() {
        let schema = json!({"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object",
            "required": ["weight"], "properties": {
                "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                "mode": {"type": "string", "enum": ["A", "B"]},
                "timeout": {"type": "string", "pattern": "^[0-9]+s$"},
                "tags": {"type": "array", "items": {"type": "string"}}}}}});
        assert!(
            validate(&schema, &json!({"spec": {"weight": 5, "mode": "A", "timeout": "3s", "tags": ["x"]}})).is_empty()
        );
        let bad = validate(&schema, &json!({"spec": {"weight": -1, "mode": "C", "timeout": "3m", "tags": [1]}}));
        let fields: Vec<&str> = bad.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.mode", "spec.tags[0]", "spec.timeout", "spec.weight"], "{bad:?}");
        assert!(bad[3].message.contains("greater than or equal to 0"));
        assert_eq!(validate(&schema, &json!({"spec": {}}))[0].field, "spec.weight");
    }
}
