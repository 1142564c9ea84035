//! Building Prometheus metric families by hand, for metrics computed at scrape time (the traffic store and the
//! agent's state) rather than kept in the registry's own counters.

use prometheus::proto::{Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};

/// Label names and values of one sample.
pub type Labels<'a> = [(&'a str, String)];

pub fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f
}

fn labelled(labels: &Labels<'_>) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut p = LabelPair::default();
                p.set_name(k.to_string());
                p.set_value(v.clone());
                p
            })
            .collect(),
    );
    m
}

pub fn counter(labels: &Labels<'_>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = labelled(labels);
    m.set_counter(c);
    m
}

pub fn gauge(labels: &Labels<'_>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = labelled(labels);
    m.set_gauge(g);
    m
}

pub fn histogram(labels: &Labels<'_>, h: Histogram) -> Metric {
    let mut m = labelled(labels);
    m.set_histogram(h);
    m
}
