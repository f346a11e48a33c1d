//! A receiver of OTLP/HTTP JSON spans on loopback, for tests that check which spans the
//! processes they start export: every span it is sent, with its service, as plain data.

use std::time::Duration;

use crate::HttpRecorder;

/// One span as a receiver got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The `service.name` of its resource.
    pub service: String,
    /// Its name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, or empty for a root span.
    pub parent_id: String,
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    endpoint: String,
    recorder: HttpRecorder,
}

impl OtlpReceiver {
    /// Listens on a free loopback port.
    ///
    /// # Panics
    ///
    /// When it cannot listen.
    pub async fn start() -> OtlpReceiver {
        let recorder = HttpRecorder::start("{}").await;
        OtlpReceiver {
            endpoint: format!("http://{}", recorder.address()),
            recorder,
        }
    }

    /// `http://127.0.0.1:PORT`, as `--otlp-endpoint` takes it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.recorder
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/v1/traces"))
            .flat_map(|r| parse(&r.body))
            .collect()
    }

    /// Waits (at most `within`) until the spans received satisfy `done`; returns them.
    pub async fn until(
        &self,
        within: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The spans of one OTLP JSON export request; nothing from a body that is not one.
fn parse(body: &[u8]) -> Vec<ReceivedSpan> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
    let mut out = Vec::new();
    for resource in json["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| text(&a["value"]["stringValue"]))
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: text(&span["name"]),
                    trace_id: text(&span["traceId"]),
                    span_id: text(&span["spanId"]),
                    parent_id: text(&span["parentSpanId"]),
                });
            }
        }
    }
    out
}
