//! The proxy's counters, rendered as Prometheus text: requests, errors and a latency histogram
//! per kind of call and topic. Topics are caller-chosen, so the number of series is capped;
//! calls past the cap count under the topic `_other`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];
/// At most this many (kind, topic) series.
pub const MAX_SERIES: usize = 1000;

#[derive(Debug, Default, Clone)]
struct Series {
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
}

/// Counters by (kind, topic).
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String), Series>>,
}

impl Metrics {
    /// Counts one call of `kind` (`request`, `signal`, `service`, `slot`, `lambda`) on
    /// `topic`, that took `took` and failed or not.
    pub fn record(&self, kind: &str, topic: &str, took: Duration, failed: bool) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (kind.to_owned(), topic.to_owned());
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            key.1 = "_other".to_owned();
        }
        let entry = series.entry(key).or_default();
        entry.requests += 1;
        entry.errors += u64::from(failed);
        let seconds = took.as_secs_f64();
        entry.sum += seconds;
        for (bucket, bound) in entry.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let series = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::new();
        let label = |kind: &str, topic: &str| {
            format!("kind=\"{}\",topic=\"{}\"", escape(kind), escape(topic))
        };
        out.push_str("# HELP gilmour_proxy_requests_total Calls through the proxy.\n");
        out.push_str("# TYPE gilmour_proxy_requests_total counter\n");
        for ((kind, topic), s) in &series {
            let _ = writeln!(
                out,
                "gilmour_proxy_requests_total{{{}}} {}",
                label(kind, topic),
                s.requests
            );
        }
        out.push_str("# HELP gilmour_proxy_errors_total Calls that failed (code 300 and above, or no answer).\n");
        out.push_str("# TYPE gilmour_proxy_errors_total counter\n");
        for ((kind, topic), s) in &series {
            let _ = writeln!(
                out,
                "gilmour_proxy_errors_total{{{}}} {}",
                label(kind, topic),
                s.errors
            );
        }
        out.push_str("# HELP gilmour_proxy_duration_seconds How long calls took.\n");
        out.push_str("# TYPE gilmour_proxy_duration_seconds histogram\n");
        for ((kind, topic), s) in &series {
            let labels = label(kind, topic);
            for (count, bound) in s.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "gilmour_proxy_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "gilmour_proxy_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.requests
            );
            let _ = writeln!(
                out,
                "gilmour_proxy_duration_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "gilmour_proxy_duration_seconds_count{{{labels}}} {}",
                s.requests
            );
        }
        out
    }
}

/// A label value as Prometheus text wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
