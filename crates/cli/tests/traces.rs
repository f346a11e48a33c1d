//! Trace context across processes: each `rylm` process exports the spans of traced requests to
//! an OTLP receiver in the test, and the spans of one request share one trace id, each hop's
//! parent the span of the hop before it.
#![cfg(feature = "otlp")]

mod common;

use std::time::Duration;

use common::{Ports, Rylm, until_ok};
use rylm_testkit::{OtlpReceiver, ReceivedSpan};

/// The span of `service` in `spans` (panics when there is not exactly one).
fn one_of<'a>(spans: &'a [ReceivedSpan], service: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.service == service).collect();
    assert_eq!(found.len(), 1, "one span of {service} in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_call_through_a_client_a_master_and_a_worker_is_one_trace() {
    let receiver = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint()];
    let ports = Ports::new();
    let mut args = ports.master("m");
    args.extend(otlp.iter().map(|s| (*s).to_owned()));
    let _master = Rylm::start(&args).await;
    let mut worker = vec!["worker", "--db", &ports.db];
    worker.extend(otlp);
    let _worker = Rylm::start(&worker).await;
    // The worker has joined once a call goes through; the receiver then holds the spans of
    // those calls too: the trace is looked for by the client's own span.
    let output = until_ok(Duration::from_secs(30), || async {
        let output = Rylm::command(None, &["client", "--db", &ports.db, "eval", "echo", "hi"])
            .args(otlp)
            .env("OTEL_SERVICE_NAME", "test-client")
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    })
    .await
    .0;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "hi");
    let spans = receiver
        .until(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.service == "test-client")
                && spans.iter().any(|s| s.service == "rylm-worker")
        })
        .await;
    let client = spans
        .iter()
        .rfind(|s| s.service == "test-client")
        .expect("the client's span");
    assert_eq!(client.name, "rylm.client.call");
    let trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == client.trace_id)
        .cloned()
        .collect();
    let master = one_of(&trace, "rylm-master");
    let worker = one_of(&trace, "rylm-worker");
    assert_eq!(master.name, "rylm.master.dispatch");
    assert_eq!(worker.name, "echo");
    assert_eq!(master.parent_id, client.span_id, "{trace:#?}");
    assert_eq!(worker.parent_id, master.span_id, "{trace:#?}");
    assert!(client.parent_id.is_empty(), "the client started the trace");
}

#[tokio::test]
async fn an_http_request_through_the_gateway_and_a_worker_continues_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint()];
    let http = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let workers = common::free_address();
    let mut gateway = vec!["gateway", "--listen", &http, "--workers", &workers];
    gateway.extend(otlp);
    let _gateway = Rylm::start(&gateway).await;
    let mut worker = vec!["worker", "--connect", &workers];
    worker.extend(otlp);
    let _worker = Rylm::start(&worker).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    let request = format!(
        "POST /upper HTTP/1.1\r\nHost: x\r\ntraceparent: {traceparent}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    );
    let answer = until_ok(Duration::from_secs(30), || {
        common::http_raw(&http, &request)
    })
    .await
    .0;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let spans = receiver
        .until(Duration::from_secs(20), |spans| {
            spans.iter().filter(|s| s.trace_id == caller_trace).count() >= 2
        })
        .await;
    let trace: Vec<ReceivedSpan> = spans
        .into_iter()
        .filter(|s| s.trace_id == caller_trace)
        .collect();
    // Calls before the worker joined were answered 503 by the gateway alone, each its span;
    // the one that reached the worker goes worker -> the gateway's pool -> its HTTP span ->
    // the caller.
    let worker = one_of(&trace, "rylm-worker");
    let parent_of = |span: &ReceivedSpan| {
        trace
            .iter()
            .find(|s| s.span_id == span.parent_id)
            .cloned()
            .unwrap_or_else(|| panic!("the parent of {span:?} in {trace:#?}"))
    };
    let dispatch = parent_of(worker);
    assert_eq!(
        (dispatch.service.as_str(), dispatch.name.as_str()),
        ("rylm-gateway", "rylm.master.dispatch")
    );
    let http = parent_of(&dispatch);
    assert_eq!(
        (http.service.as_str(), http.name.as_str()),
        ("rylm-gateway", "rylm.gateway")
    );
    assert_eq!(http.parent_id, "00f067aa0ba902b7", "the caller's span");
    assert_eq!(worker.name, "upper");
}
