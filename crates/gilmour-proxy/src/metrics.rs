//! The proxy's metrics, on `prometheus-client`: calls, errors and a latency histogram per kind
//! of call (`request`, `signal`, `service`, `slot`, `lambda`) and topic. Topics are chosen by
//! callers, so the number of series is capped: calls past the cap count under the topic
//! `_other`. The proxy's state (nodes, its Gilmour node's queue and losses) is read at each
//! scrape by a collector in `server.rs`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];
/// At most this many (kind, topic) series.
pub const MAX_SERIES: usize = 1000;

/// The labels of a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Call {
    kind: String,
    topic: String,
}

/// The labels of a failed call: the call's, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Failure {
    kind: String,
    topic: String,
    error: &'static str,
}

/// What a failing code says: `timeout` (499), `busy` (503), `unknown` (404: nobody serves the
/// topic), `failed` (any other code of 300 and above); `None` for a success.
pub fn error_of(code: i64) -> Option<&'static str> {
    match code {
        ..300 => None,
        404 => Some("unknown"),
        499 => Some("timeout"),
        503 => Some("busy"),
        _ => Some("failed"),
    }
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Counters by (kind, topic).
#[derive(Debug)]
pub struct Metrics {
    requests: Family<Call, Counter>,
    errors: Family<Failure, Counter>,
    duration: Family<Call, Histogram, fn() -> Histogram>,
    seen: Mutex<HashSet<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(histogram),
            seen: Mutex::new(HashSet::new()),
        }
    }
}

impl Metrics {
    /// Counts one call of `kind` on `topic`, that took `took` and failed with `error` (an
    /// [`error_of`] value) or not.
    pub fn record(&self, kind: &str, topic: &str, took: Duration, error: Option<&'static str>) {
        let topic = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let key = (kind.to_owned(), topic.to_owned());
            if seen.contains(&key) || seen.len() < MAX_SERIES {
                seen.insert(key);
                topic
            } else {
                "_other"
            }
        };
        let call = Call {
            kind: kind.to_owned(),
            topic: topic.to_owned(),
        };
        self.requests.get_or_create(&call).inc();
        if let Some(error) = error {
            let failure = Failure {
                kind: call.kind.clone(),
                topic: call.topic.clone(),
                error,
            };
            self.errors.get_or_create(&failure).inc();
        }
        self.duration
            .get_or_create(&call)
            .observe(took.as_secs_f64());
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let requests = encoder.encode_descriptor(
            "gilmour_proxy_requests",
            "Calls through the proxy.",
            None,
            self.requests.metric_type(),
        )?;
        self.requests.encode(requests)?;
        let errors = encoder.encode_descriptor(
            "gilmour_proxy_errors",
            "Calls that failed, by what went wrong: timeout (499), busy (503), unknown (404), failed (other codes of 300 and above, or no answer).",
            None,
            self.errors.metric_type(),
        )?;
        self.errors.encode(errors)?;
        let duration = encoder.encode_descriptor(
            "gilmour_proxy_duration_seconds",
            "How long calls took.",
            None,
            self.duration.metric_type(),
        )?;
        self.duration.encode(duration)
    }
}
