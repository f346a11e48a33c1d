//! The HTTP gateway in front of real pylm workers (pylm 0.14.4, in the environment
//! `cargo xtask test` creates).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use rylm_gateway::{GatewayConfig, HttpGateway};

#[tokio::test]
async fn the_gateway_serves_http_with_pylm_workers() {
    let Some(python) = rylm_testkit::pylm_python("the_gateway_serves_http_with_pylm_workers")
    else {
        return;
    };
    let gateway = HttpGateway::start(GatewayConfig {
        pylm: true,
        deadline: Duration::from_secs(10),
        ..GatewayConfig::default()
    })
    .await
    .expect("starts");
    let db = gateway
        .db_address()
        .expect("a cache in pylm mode")
        .to_owned();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../components/tests/py/pylm_worker.py"
    );
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(
            tokio::process::Command::new(&python)
                .args([script, &format!("w{i}"), &db])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("python starts"),
        );
    }
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let post = |path: &str, body: &'static str| {
        let request = Request::post(format!("http://{}{path}", gateway.local_addr()))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a request");
        let client = client.clone();
        async move {
            let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
                .await
                .expect("an answer in time")
                .expect("an HTTP answer");
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("a body")
                .to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // Until `/readyz` reports `count` connected pylm workers (bounded).
    let until_connected = |count: usize, failure: &'static str| {
        let (client, address) = (client.clone(), gateway.local_addr());
        async move {
            let started = std::time::Instant::now();
            loop {
                let request = Request::get(format!("http://{address}/readyz"))
                    .body(Full::new(Bytes::new()))
                    .expect("a request");
                let response = client.request(request).await.expect("answered");
                let body = response.into_body().collect().await.expect("a body");
                let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                if text.contains(&format!("\"workers\":{count}")) {
                    return;
                }
                assert!(started.elapsed() < Duration::from_secs(30), "{failure}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Before any pylm worker connects: 503 at once, not a request that waits in a queue.
    let (status, _) = post("/upper", "too early").await;
    assert!(
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::OK,
        "{status}"
    );
    // The pylm workers join in their own time: ready once both are connected.
    until_connected(2, "the pylm workers never joined").await;
    assert_eq!(
        post("/upper", "hello pylm").await,
        (StatusCode::OK, "HELLO PYLM".to_owned())
    );
    assert_eq!(
        post("/gateway.reverse", "abc").await,
        (StatusCode::OK, "cba".to_owned())
    );
    assert_eq!(
        post("/fail", "x").await,
        (StatusCode::OK, "0".to_owned()),
        "pylm's answer to a failure"
    );
    // One worker killed: every request goes to the one left, none to the dead peer.
    let mut workers = workers.into_iter();
    if let Some(mut dead) = workers.next() {
        dead.kill().await.expect("killed");
    }
    until_connected(1, "the dead worker stayed a peer").await;
    for i in 0..10 {
        let started = std::time::Instant::now();
        assert_eq!(
            post("/upper", "still here").await,
            (StatusCode::OK, "STILL HERE".to_owned()),
            "request {i}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} was not held"
        );
    }
    for mut worker in workers {
        let _ = worker.kill().await;
    }
    gateway.shutdown().await.expect("clean");
}
