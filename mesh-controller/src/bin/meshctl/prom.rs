//! Just enough of the Prometheus text format to read the agents' metrics: samples with their labels.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `{a="x",b="y\"z"}` → labels; the rest of the line after the closing brace.
fn labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut out = BTreeMap::new();
    let mut rest = text.strip_prefix('{')?;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((out, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.trim().to_string(), value);
        rest = &after[end + 1..];
    }
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let split = line.find(['{', ' '])?;
            let name = &line[..split];
            let (labels, rest) = if line[split..].starts_with('{') {
                labels(&line[split..])?
            } else {
                (BTreeMap::new(), &line[split..])
            };
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some(Sample { name: name.to_string(), labels, value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_escaped_labels_parse() {
        let text = "# HELP x y\nx_total{a=\"1\",b=\"q\\\"uote\"} 3\nplain 4.5\nh_bucket{le=\"+Inf\"} 2 1700000000\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels["b"], "q\"uote");
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("plain", 4.5));
        assert_eq!(s[2].labels["le"], "+Inf");
    }
}
