//! Label and field selectors, as `?labelSelector=` and `?fieldSelector=` give them.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    labels: Vec<Requirement>,
    /// Dotted paths (`spec.nodeName`, `metadata.name`) with `=`/`==`/`!=`.
    fields: Vec<Requirement>,
}

/// Splits on commas outside parentheses (`env in (a,b),tier`).
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|s| !s.is_empty()).collect()
}

fn set(values: &str) -> Result<Vec<String>, String> {
    let inner = values.trim().strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or("expected (values)")?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}

fn parse(s: &str) -> Result<Vec<Requirement>, String> {
    split_top(s)
        .into_iter()
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Ok(Requirement::Equals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = term.split_once(" notin ") {
                Ok(Requirement::NotIn(k.trim().into(), set(v)?))
            } else if let Some((k, v)) = term.split_once(" in ") {
                Ok(Requirement::In(k.trim().into(), set(v)?))
            } else if let Some(k) = term.strip_prefix('!') {
                Ok(Requirement::NotExists(k.trim().into()))
            } else if term.chars().all(|c| c.is_alphanumeric() || "-_./".contains(c)) {
                Ok(Requirement::Exists(term.into()))
            } else {
                Err(format!("unable to parse requirement: {term:?}"))
            }
        })
        .collect()
}

fn holds(r: &Requirement, get: &dyn Fn(&str) -> Option<String>) -> bool {
    match r {
        Requirement::Equals(k, v) => get(k).as_deref() == Some(v),
        Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v),
        Requirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
        Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(&x)),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    }
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selector, String> {
        Ok(Selector {
            labels: labels.map(parse).transpose()?.unwrap_or_default(),
            fields: fields.map(parse).transpose()?.unwrap_or_default(),
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let label = |k: &str| object["metadata"]["labels"].get(k).and_then(Value::as_str).map(String::from);
        let field = |path: &str| {
            let v = path.split('.').try_fold(object, |v, k| v.get(k))?;
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        self.labels.iter().all(|r| holds(r, &label))
            // A field selector on a missing field compares against "".
            && self.fields.iter().all(|r| holds(r, &|p: &str| Some(field(p).unwrap_or_default())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_and_field_selectors() {
        let pod = serde_json::json!({"metadata": {"name": "a", "labels": {"app": "cart", "tier": "web"}},
                                     "spec": {"nodeName": "n1"}});
        let s = |l: &str, f: &str| {
            Selector::parse((!l.is_empty()).then_some(l), (!f.is_empty()).then_some(f)).unwrap().matches(&pod)
        };
        assert!(s("app=cart", ""));
        assert!(s("app==cart,tier", ""));
        assert!(!s("app!=cart", ""));
        assert!(s("app in (cart, web),!missing", ""));
        assert!(!s("tier notin (web)", ""));
        assert!(s("", "spec.nodeName=n1,metadata.name!=b"));
        assert!(!s("", "spec.nodeName=n2"));
        assert!(Selector::parse(Some("a in b"), None).is_err());
    }
}
