//! OpenTelemetry export: the spans rylm's servers open for traced requests (target
//! `rylm::trace`, fields `trace_id`, `span_id`, `parent_id`, `otel.name`; see
//! `rylm_message::trace::Hop`) sent to an OTLP/HTTP receiver as JSON (`POST /v1/traces`), the
//! encoding every OpenTelemetry collector, Jaeger and Tempo accept. Plain HTTP only: no TLS
//! stack (none that builds without C), so it is meant for a collector on the same host or pod.
//!
//! The layer copies a span's ids and its start time when it opens and queues it when it closes;
//! a thread of its own sends what is queued every [`Otlp::interval`] or at [`BATCH`] spans, each
//! request within [`TIMEOUT`]. The queue is bounded ([`QUEUE`]): past it, and when the receiver
//! fails, spans are dropped and counted ([`ExportCounters`]), never waited for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans exported.
pub const TARGET: &str = "rylm::trace";
/// Spans queued for export at most.
pub const QUEUE: usize = 8_192;
/// Spans sent in one request at most.
pub const BATCH: usize = 512;
/// The deadline of one export request (connecting included).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// The receiver's base URL, `http://host:port` (`/v1/traces` is added), as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` gives it.
    pub endpoint: String,
    /// `service.name` of the spans' resource.
    pub service: String,
    /// How often queued spans are sent.
    pub interval: Duration,
}

/// What the exporter did, for an operator.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans the receiver accepted.
    pub exported: AtomicU64,
    /// Spans dropped: the queue was full or the receiver failed.
    pub dropped: AtomicU64,
}

/// One finished span.
#[derive(Debug, Clone)]
struct Finished {
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    start: u128,
    end: u128,
}

/// A span's ids and start, kept in the span's extensions while it is open.
#[derive(Debug, Default)]
struct Open {
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    start: u128,
}

impl Visit for Open {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, text.trim_matches('"'));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "otel.name" => &mut self.name,
            "trace_id" => &mut self.trace_id,
            "span_id" => &mut self.span_id,
            "parent_id" => &mut self.parent_id,
            _ => return,
        };
        value.clone_into(slot);
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
}

/// The layer that queues finished rylm spans for export.
#[derive(Debug)]
pub struct SpanLayer {
    queue: mpsc::Sender<Finished>,
    counters: Arc<ExportCounters>,
}

impl<S> tracing_subscriber::Layer<S> for SpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut open = Open {
            start: unix_nanos(),
            ..Open::default()
        };
        attributes.record(&mut open);
        if open.name.is_empty() {
            attributes.metadata().name().clone_into(&mut open.name);
        }
        span.extensions_mut().insert(open);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        if open.trace_id.is_empty() || open.span_id.is_empty() {
            return;
        }
        let finished = Finished {
            name: open.name,
            trace_id: open.trace_id,
            span_id: open.span_id,
            parent_id: open.parent_id,
            start: open.start,
            end: unix_nanos(),
        };
        if self.queue.try_send(finished).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The OTLP/HTTP JSON body of `spans`.
fn body(service: &str, spans: &[Finished]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|span| {
            serde_json::json!({
                "traceId": span.trace_id,
                "spanId": span.span_id,
                "parentSpanId": span.parent_id,
                "name": span.name,
                "kind": 1,
                "startTimeUnixNano": span.start.to_string(),
                "endTimeUnixNano": span.end.to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": service}}
            ]},
            "scopeSpans": [{"scope": {"name": "rylm"}, "spans": spans}]
        }]
    })
}

/// The exporter's handle: dropping it sends what is queued (within [`TIMEOUT`]) and stops it.
#[derive(Debug)]
pub struct Exporter {
    counters: Arc<ExportCounters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// What it has exported and dropped so far.
    pub fn counters(&self) -> Arc<ExportCounters> {
        self.counters.clone()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the exporter's thread; the layer goes into the program's subscriber.
pub fn start(config: Otlp) -> Result<(SpanLayer, Exporter), crate::Error> {
    let target = Target::parse(&config.endpoint)?;
    let (queue, spans) = mpsc::channel(QUEUE);
    let counters = Arc::new(ExportCounters::default());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::Error::Io)?;
    let sending = counters.clone();
    let thread = std::thread::Builder::new()
        .name("rylm-otlp".into())
        .spawn(move || runtime.block_on(export(config, target, spans, stopped, sending)))
        .map_err(crate::Error::Io)?;
    let layer = SpanLayer {
        queue,
        counters: counters.clone(),
    };
    let exporter = Exporter {
        counters,
        stop: Some(stop),
        thread: Some(thread),
    };
    Ok((layer, exporter))
}

/// The receiver's address and path.
#[derive(Debug, Clone)]
struct Target {
    authority: String,
    path: String,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Target, crate::Error> {
        let refuse = |why: &str| crate::Error::Config(format!("OTLP endpoint {endpoint:?}: {why}"));
        let rest = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| refuse("only http:// is supported (no TLS): use a local collector"))?;
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(refuse("no host"));
        }
        let base = base.trim_end_matches('/');
        let path = if base.is_empty() {
            "/v1/traces".to_owned()
        } else {
            format!("/{base}/v1/traces")
        };
        Ok(Target {
            authority: authority.to_owned(),
            path,
        })
    }
}

async fn export(
    config: Otlp,
    target: Target,
    mut spans: mpsc::Receiver<Finished>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    counters: Arc<ExportCounters>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(config.interval.max(Duration::from_millis(10)));
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            _ = &mut stopped => stopping = true,
            _ = tick.tick() => {}
            received = spans.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    stopping = true;
                } else if batch.len() < BATCH {
                    continue;
                }
            }
        }
        while let Ok(span) = spans.try_recv() {
            batch.push(span);
            if batch.len() >= BATCH {
                send(&config, &target, &mut batch, &counters).await;
            }
        }
        if !batch.is_empty() {
            send(&config, &target, &mut batch, &counters).await;
        }
    }
}

/// Sends `batch` (and empties it); a failure drops it, counted and logged (throttled).
async fn send(
    config: &Otlp,
    target: &Target,
    batch: &mut Vec<Finished>,
    counters: &ExportCounters,
) {
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    let json = body(&config.service, &spans).to_string();
    match tokio::time::timeout(TIMEOUT, post(target, json)).await {
        Ok(Ok(())) => {
            counters.exported.fetch_add(count, Ordering::Relaxed);
        }
        Ok(Err(error)) => {
            counters.dropped.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(%error, spans = count, "the OTLP receiver did not take spans");
        }
        Err(_) => {
            counters.dropped.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(
                spans = count,
                "the OTLP receiver did not answer within 10 s"
            );
        }
    }
}

async fn post(target: &Target, json: String) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(json)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string());
    let outcome = match response {
        Ok(response) if response.status().is_success() => {
            let _ = response.into_body().collect().await;
            Ok(())
        }
        Ok(response) => Err(format!("it answered {}", response.status())),
        Err(error) => Err(error),
    };
    driver.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_read_and_https_is_refused() {
        let target = Target::parse("http://127.0.0.1:4318").expect("valid");
        assert_eq!(
            (target.authority.as_str(), target.path.as_str()),
            ("127.0.0.1:4318", "/v1/traces")
        );
        let target = Target::parse("http://collector:4318/otlp/").expect("valid");
        assert_eq!(target.path, "/otlp/v1/traces");
        assert!(Target::parse("https://collector:4318").is_err());
        assert!(Target::parse("http:///v1").is_err());
    }
}
