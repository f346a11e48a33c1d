//! The HTTP gateway in front of real workers, over real HTTP and ZeroMQ on loopback.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use rylm_components::{Functions, Heartbeat, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};

const DEADLINE: Duration = Duration::from_secs(10);

fn functions() -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(String::from_utf8_lossy(&p).to_uppercase()))
        })
        .add("fail", |_p: Bytes| async move {
            Err::<Bytes, _>("failed on purpose")
        })
        .add_parameterized("sleep", |ms: String, p: Bytes| async move {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Ok::<_, String>(p)
        })
        .add_message("traced", |m: rylm_message::Message| async move {
            Ok::<_, String>(Bytes::from(
                m.header("traceparent").unwrap_or("-").to_owned(),
            ))
        })
        .add_message("inspect", |m: rylm_message::Message| async move {
            let text = format!(
                "method={} lang={} trace={}",
                m.header("http.method").unwrap_or("-"),
                m.header("query.lang").unwrap_or("-"),
                m.header("header.x-trace").unwrap_or("-")
            );
            Ok::<_, String>(Bytes::from(text))
        })
}

fn config() -> GatewayConfig {
    GatewayConfig {
        deadline: Duration::from_millis(1500),
        max_body: 1024,
        heartbeat: Heartbeat {
            interval: Duration::from_millis(100),
            misses: 3,
        },
        ..GatewayConfig::default()
    }
}

async fn worker(gateway: &HttpGateway) -> Worker {
    Worker::builder(functions())
        .heartbeat(Duration::from_millis(100))
        .connect(gateway.worker_address())
        .await
        .expect("a worker connects")
}

/// Waits (polling with a deadline) until the gateway has a live worker.
async fn until_ready(gateway: &HttpGateway) {
    let started = std::time::Instant::now();
    loop {
        let (_, body) = call(gateway, Method::GET, "/", "").await;
        if body.contains("\"workers\":") && !body.contains("\"workers\":0") {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "no worker joined: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn call(
    gateway: &HttpGateway,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gateway.local_addr()))
        .header("x-trace", "t-42")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a request");
    let response = tokio::time::timeout(DEADLINE, client.request(request))
        .await
        .expect("an answer within the deadline")
        .expect("an HTTP answer");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn every_failure_is_a_clear_http_answer() {
    let gateway = HttpGateway::start(config()).await.expect("starts");

    let (status, body) = call(&gateway, Method::POST, "/upper", "x").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no worker yet: {body}"
    );

    let w = worker(&gateway).await;
    until_ready(&gateway).await;
    let (status, body) = call(&gateway, Method::POST, "/upper", "grüße").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "GRÜSSE"));
    let (status, body) = call(&gateway, Method::GET, "/server.upper", "a").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "A"),
        "server.function passes as is"
    );

    let (status, body) = call(&gateway, Method::GET, "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("\"upper\"") && body.contains("\"inspect\""),
        "{body}"
    );

    let (status, body) = call(&gateway, Method::GET, "/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = call(&gateway, Method::POST, "/fail", "").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("failed on purpose"), "{body}");
    let (status, body) = call(&gateway, Method::POST, "/sleep:3000", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let (status, _) = call(&gateway, Method::POST, "/upper", &"x".repeat(4096)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = call(&gateway, Method::GET, "/not/a/function", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(&gateway, Method::PUT, "/upper", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // After all that, still serving.
    let (status, body) = call(&gateway, Method::POST, "/upper", "ok").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "OK"));
    w.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn query_string_and_headers_reach_the_function_as_headers() {
    let gateway = HttpGateway::start(config()).await.expect("starts");
    let w = worker(&gateway).await;
    until_ready(&gateway).await;
    let (status, body) = call(&gateway, Method::GET, "/inspect?lang=de&x=1", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "method=GET lang=de trace=t-42");
    w.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn many_requests_at_once_are_all_answered() {
    let gateway = HttpGateway::start(config()).await.expect("starts");
    let (a, b) = (worker(&gateway).await, worker(&gateway).await);
    until_ready(&gateway).await;
    let gateway = std::sync::Arc::new(gateway);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let gateway = gateway.clone();
        calls.spawn(async move {
            (
                i,
                call(&gateway, Method::POST, "/upper", &format!("m{i}")).await,
            )
        });
    }
    while let Some(done) = calls.join_next().await {
        let (i, (status, body)) = done.expect("task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("M{i}"));
    }
    a.shutdown().await;
    b.shutdown().await;
    if let Ok(gateway) = std::sync::Arc::try_unwrap(gateway) {
        gateway.shutdown().await.expect("clean");
    }
}

/// The W3C trace context reaches the worker's function: the caller's trace, under a span of the
/// gateway (a new trace when the caller sent none or a bad one), and the answer carries it.
#[tokio::test]
async fn the_trace_context_reaches_the_worker_and_comes_back() {
    let gateway = HttpGateway::start(config()).await.expect("starts");
    let w = worker(&gateway).await;
    until_ready(&gateway).await;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let send = |traceparent: Option<&'static str>| {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{}/traced", gateway.local_addr()));
        if let Some(value) = traceparent {
            request = request.header("traceparent", value);
        }
        let request = request.body(Full::new(Bytes::new())).expect("a request");
        let client = client.clone();
        async move {
            let response = tokio::time::timeout(DEADLINE, client.request(request))
                .await
                .expect("in time")
                .expect("an answer");
            let header = response
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let seen = response
                .into_body()
                .collect()
                .await
                .expect("a body")
                .to_bytes();
            (header, String::from_utf8_lossy(&seen).into_owned())
        }
    };
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (answered, seen) = send(Some(caller)).await;
    let parse = rylm_message::trace::TraceParent::parse;
    let (caller, seen_by_worker, answered) = (
        parse(caller).expect("valid"),
        parse(&seen).expect("the worker saw a valid traceparent"),
        parse(&answered).expect("the answer carries one"),
    );
    assert_eq!(seen_by_worker.trace_id, caller.trace_id, "the same trace");
    assert_ne!(
        seen_by_worker.parent_id, caller.parent_id,
        "under the gateway's span"
    );
    // The answer names the gateway's span (the worker's parent, or the span of the gateway's
    // pool under it where spans are recorded).
    assert_eq!(answered.trace_id, caller.trace_id);
    assert_ne!(answered.parent_id, caller.parent_id);
    // None, or a bad one: a new trace all the same.
    for sent in [None, Some("00-zz-00f067aa0ba902b7-01")] {
        let (answered, seen) = send(sent).await;
        let seen = parse(&seen).expect("a new trace");
        assert_eq!(parse(&answered).map(|a| a.trace_id), Some(seen.trace_id));
        assert_ne!(seen.trace_id, caller.trace_id);
    }
    w.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn with_tracing_off_no_trace_context_is_read_or_written_until_turned_on() {
    let gateway = HttpGateway::start(GatewayConfig {
        trace: false,
        ..config()
    })
    .await
    .expect("starts");
    let _w = worker(&gateway).await;
    until_ready(&gateway).await;
    let (status, seen) = call(&gateway, Method::GET, "/traced", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen, "-", "the worker's message has no traceparent");
    // Turned on while it runs.
    gateway.set_trace(true);
    let (_, seen) = call(&gateway, Method::GET, "/traced", "").await;
    assert!(
        rylm_message::trace::TraceParent::parse(&seen).is_some(),
        "{seen}"
    );
}
