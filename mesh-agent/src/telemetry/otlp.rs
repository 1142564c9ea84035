//! Span export over OTLP/gRPC: one background task per collector address batches finished spans (up to
//! [`MAX_BATCH`] or [`FLUSH_EVERY`]) into `ExportTraceServiceRequest`s, one `ResourceSpans` per workload
//! (`service.name` = `<canonical service>.<namespace>`, as Istio's proxies report). A slow or absent collector
//! costs dropped spans (counted), never request latency: the queue is bounded and sending never blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::sync::mpsc;

const QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A finished span and the workload it belongs to.
pub struct Finished {
    pub service_name: String,
    pub span: Span,
}

pub fn string_attribute(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }) }
}

pub fn int_attribute(key: &str, value: i64) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }) }
}

/// Exporters by collector address, started on first use.
#[derive(Clone, Default)]
pub struct Exporters {
    queues: Arc<Mutex<HashMap<String, mpsc::Sender<Finished>>>>,
    pub exported: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

impl Exporters {
    pub fn send(&self, collector: &str, span: Finished) {
        let queue = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues
                .entry(collector.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(run(collector.to_string(), rx, self.exported.clone(), self.dropped.clone()));
                    tx
                })
                .clone()
        };
        if queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn request(batch: Vec<Finished>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for f in batch {
        by_service.entry(f.service_name).or_default().push(f.span);
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string_attribute("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "nodemesh".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

async fn run(collector: String, mut rx: mpsc::Receiver<Finished>, exported: Arc<AtomicU64>, dropped: Arc<AtomicU64>) {
    let endpoint = if collector.contains("://") { collector.clone() } else { format!("http://{collector}") };
    let channel = match tonic::transport::Endpoint::from_shared(endpoint) {
        Ok(e) => e.connect_timeout(Duration::from_secs(3)).connect_lazy(),
        Err(e) => {
            tracing::warn!(%collector, error = %e, "invalid OTLP collector address; spans for it are dropped");
            while rx.recv().await.is_some() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request(batch))).await {
            Ok(Ok(_)) => {
                exported.fetch_add(n, Ordering::Relaxed);
            }
            Ok(Err(status)) => {
                dropped.fetch_add(n, Ordering::Relaxed);
                tracing::info!(%collector, error = %status, spans = n, "OTLP export failed");
            }
            Err(_) => {
                dropped.fetch_add(n, Ordering::Relaxed);
                tracing::info!(%collector, spans = n, "OTLP export timed out");
            }
        }
    }
}
