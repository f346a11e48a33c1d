//! Trace context across processes: each `rylm` process exports the spans of traced requests to
//! an OTLP receiver in the test, and the spans of one request share one trace id, each hop's
//! parent the span of the hop before it.
#![cfg(feature = "otlp")]

mod common;

use std::time::Duration;

use common::{Ports, Rylm, succeeds, until_ok};
use rylm_testkit::{OtlpReceiver, ReceivedSpan};

/// The span of `service` in `spans` (panics when there is not exactly one).
fn one_of<'a>(spans: &'a [ReceivedSpan], service: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.service == service).collect();
    assert_eq!(found.len(), 1, "one span of {service} in {spans:#?}");
    found[0]
}

/// Runs `rylm ARGS` to its end, its spans exported to `receiver` under the service
/// `test-caller`; panics unless it succeeds. Its standard output.
async fn run_traced(receiver: &OtlpReceiver, args: &[&str]) -> Vec<u8> {
    succeeds(
        Rylm::command(None, args)
            .args(["--otlp-endpoint", receiver.endpoint()])
            .env("OTEL_SERVICE_NAME", "test-caller"),
    )
    .await
    .stdout
}

/// Waits (at most 20 s) for the spans of `test-caller` and of `service`; checks that the
/// caller's span is named `called` and `service`'s one span, named `served`, is its child.
async fn one_hop(receiver: &OtlpReceiver, called: &str, service: &str, served: &str) {
    let spans = receiver
        .until(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.service == "test-caller")
                && spans.iter().any(|s| s.service == service)
        })
        .await;
    let caller = one_of(&spans, "test-caller");
    let server = one_of(&spans, service);
    assert_eq!(caller.name, called);
    assert_eq!(server.name, served);
    assert_eq!(server.trace_id, caller.trace_id);
    assert_eq!(server.parent_id, caller.span_id);
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

#[tokio::test]
async fn a_gilmour_request_from_one_process_to_a_proxys_node_is_one_trace() {
    let Some(redis) = rylm_testkit::redis_url("a_gilmour_request_is_one_trace") else {
        return;
    };
    let receiver = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint()];
    let node = rylm_testkit::HttpRecorder::start("\"pong\"").await;
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let _proxy = Rylm::command(
        None,
        &["gilmour-proxy", "--redis", &redis, "--listen", &listen],
    )
    .args(otlp)
    .kill_on_drop(true)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("the proxy starts");
    let topic = format!("traced.{}", rylm_testkit::free_port());
    let registration = serde_json::json!({
        "port": node.address().port(),
        "health_check": "/health",
        "services": [{"topic": topic, "group": "g", "path": "/echo", "timeout": 5}],
    })
    .to_string();
    let request = format!(
        "POST /nodes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{registration}",
        registration.len()
    );
    until_ok(Duration::from_secs(30), || {
        common::http_raw(&listen, &request)
    })
    .await;
    let stdout = run_traced(
        &receiver,
        &["gilmour", "request", "--redis", &redis, &topic, "{}"],
    )
    .await;
    let reply: serde_json::Value = serde_json::from_slice(&stdout).expect("JSON");
    assert_eq!(reply, serde_json::json!({"code": 200, "data": "pong"}));
    let spans = receiver
        .until(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.service == "test-caller")
                && spans.iter().any(|s| s.service == "rylm-gilmour-proxy")
        })
        .await;
    let requester = one_of(&spans, "test-caller");
    assert_eq!(requester.name, "rylm.gilmour.request");
    let handler = spans
        .iter()
        .find(|s| s.service == "rylm-gilmour-proxy" && s.trace_id == requester.trace_id)
        .unwrap_or_else(|| panic!("the proxy's span of the request in {spans:#?}"));
    assert_eq!(handler.name, topic);
    assert_eq!(handler.parent_id, requester.span_id);
    // The node got the trace context of the proxy's span, to join the trace itself.
    let call = node
        .requests()
        .into_iter()
        .find(|r| r.path == "/echo")
        .expect("the node was called");
    let traceparent = call.header("traceparent").expect("a traceparent header");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", requester.trace_id, handler.span_id)
    );
}

#[tokio::test]
async fn a_syrpc_call_from_one_process_to_a_server_is_one_trace() {
    let Some(amqp) = rylm_testkit::amqp_url("a_syrpc_call_is_one_trace") else {
        return;
    };
    let receiver = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint()];
    let app = format!("traced-{}", std::process::id());
    let mut serve = vec!["syrpc", "serve", "--url", &amqp, "--app", &app];
    serve.extend(otlp);
    let _server = Rylm::start(&serve).await;
    run_traced(
        &receiver,
        &[
            "syrpc", "call", "--url", &amqp, "--app", &app, "upper", "hi",
        ],
    )
    .await;
    one_hop(&receiver, "rylm.syrpc.call", "rylm-syrpc", "upper").await;
}

#[tokio::test]
async fn a_service_call_from_one_process_to_a_service_is_one_trace() {
    let receiver = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint()];
    let service = common::free_address();
    let mut serve = vec![
        "service", "--bind", &service, "--secret", "s", "--name", "svc",
    ];
    serve.extend(otlp);
    let _service = Rylm::start(&serve).await;
    run_traced(
        &receiver,
        &[
            "call",
            "--connect",
            &service,
            "--secret",
            "s",
            "--timeout",
            "10",
            "/echo",
        ],
    )
    .await;
    one_hop(&receiver, "rylm.service.call", "rylm-service", "svc").await;
}
