//! The gateway under hostile and careless clients: one concurrency limit over every
//! connection (503 with Retry-After at once), header and idle timeouts against slowloris,
//! abandoned requests withdrawn so they do not starve fresh ones, a dead worker answered 502 at
//! once, health endpoints and request ids.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use rylm_components::{Functions, Heartbeat, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(10);

fn functions() -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
        })
        .add_parameterized("sleep", |ms: String, p: Bytes| async move {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Ok::<_, String>(p)
        })
}

fn config() -> GatewayConfig {
    GatewayConfig {
        deadline: Duration::from_secs(30),
        heartbeat: Heartbeat {
            interval: Duration::from_millis(200),
            misses: 10,
        },
        ..GatewayConfig::default()
    }
}

async fn gateway_with_worker(config: GatewayConfig, credits: usize) -> (HttpGateway, Worker) {
    gateway_with(config, functions(), credits).await
}

/// A gateway and one worker of `functions` with `credits`, ready.
async fn gateway_with(
    config: GatewayConfig,
    functions: Functions,
    credits: usize,
) -> (HttpGateway, Worker) {
    let gateway = HttpGateway::start(config).await.expect("starts");
    let worker = Worker::builder(functions)
        .credits(credits)
        .heartbeat(Duration::from_millis(200))
        .connect(gateway.worker_address())
        .await
        .expect("a worker connects");
    let client = http_client();
    let started = Instant::now();
    while get(&client, &gateway, "/readyz").await.0 != StatusCode::OK {
        assert!(
            started.elapsed() < DEADLINE,
            "the worker never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (gateway, worker)
}

fn http_client() -> HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

type Answer = (StatusCode, hyper::HeaderMap, String);

async fn send(
    client: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Answer {
    let response = client.request(request).await.expect("answered");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// `upper` of `fresh`, which must answer `FRESH`.
async fn fresh_call(
    client: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    address: std::net::SocketAddr,
) {
    let request = Request::post(format!("http://{address}/upper"))
        .body(Full::new(Bytes::from("fresh")))
        .expect("a request");
    let (status, _, body) = send(client, request).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "FRESH"));
}

async fn get(
    client: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    gateway: &HttpGateway,
    path: &str,
) -> Answer {
    let request = Request::get(format!("http://{}{path}", gateway.local_addr()))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    send(client, request).await
}

#[tokio::test]
async fn beyond_the_concurrency_limit_requests_get_503_with_retry_after_at_once() {
    let (gateway, worker) = gateway_with_worker(
        GatewayConfig {
            concurrency: 4,
            ..config()
        },
        64,
    )
    .await;
    let client = http_client();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (client, address) = (client.clone(), gateway.local_addr());
            tokio::spawn(async move {
                let started = Instant::now();
                let request = Request::get(format!("http://{address}/sleep:500"))
                    .body(Full::new(Bytes::new()))
                    .expect("a request");
                let answer = send(&client, request).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let (mut shed, mut served) = (0, 0);
    for call in calls {
        let ((status, headers, _), took) = call.await.expect("task");
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(headers.contains_key("retry-after"), "{headers:?}");
                if took < Duration::from_millis(50) {
                    shed += 1;
                }
            }
            StatusCode::OK => served += 1,
            other => panic!("{other}"),
        }
    }
    eprintln!("concurrency 4, 50 slow calls: {shed} refused within 50 ms, {served} served");
    assert!(shed >= 40, "only {shed} requests were refused within 50 ms");
    assert_eq!(served, 4, "as many as the limit were served");
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_thousand_half_sent_requests_are_closed_while_a_normal_one_is_served() {
    let header_timeout = Duration::from_secs(1);
    let (gateway, worker) = gateway_with_worker(
        GatewayConfig {
            header_timeout,
            ..config()
        },
        8,
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut stream = tokio::net::TcpStream::connect(gateway.local_addr())
            .await
            .expect("connects");
        stream
            .write_all(b"GET /upper HTTP/1.1\r\nHo")
            .await
            .expect("writes");
        slow.push(stream);
    }
    let started = Instant::now();
    let client = http_client();
    let request = Request::post(format!("http://{}/upper", gateway.local_addr()))
        .body(Full::new(Bytes::from("served")))
        .expect("a request");
    let (status, _, body) = send(&client, request).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "SERVED"));
    // Each half-sent request's connection is closed by the header timeout.
    for mut stream in slow {
        let mut buffer = [0u8; 512];
        let left = (header_timeout * 4).saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left.max(Duration::from_millis(1)), async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 before the close
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a half-sent request's connection stayed open");
    }
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn abandoned_requests_are_withdrawn_and_do_not_starve_a_fresh_one() {
    let (gateway, worker) = gateway_with_worker(config(), 4).await;
    let address = gateway.local_addr();
    // 5,000 requests whose clients hang up after 20 ms, 500 at a time.
    for _ in 0..10 {
        let batch: Vec<_> = (0..500)
            .map(|_| {
                tokio::spawn(async move {
                    let client = http_client();
                    let request = Request::get(format!("http://{address}/sleep:200"))
                        .body(Full::new(Bytes::new()))
                        .expect("a request");
                    let _ =
                        tokio::time::timeout(Duration::from_millis(20), client.request(request))
                            .await;
                })
            })
            .collect();
        for call in batch {
            call.await.expect("task");
        }
    }
    // What runs now is at most the worker's four credits of 200 ms each.
    let started = Instant::now();
    fresh_call(&http_client(), address).await;
    let took = started.elapsed();
    eprintln!("a fresh request after 5,000 abandoned ones: answered in {took:?}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

/// A gateway whose one worker of `functions` has a single credit, and a call of `hold` on it
/// whose HTTP client hung up once the function started (`started` counts its starts): returns
/// when the pool has had the worker confirm the cancel, which must come within `within`, with
/// the gateway, the worker, the pool's status and when the client hung up.
async fn abandoned_on_the_only_credit(
    functions: Functions,
    started: &std::sync::atomic::AtomicUsize,
    within: Duration,
) -> (
    HttpGateway,
    Worker,
    std::sync::Arc<rylm_components::PoolStatus>,
    Instant,
) {
    use std::sync::atomic::Ordering;
    let (gateway, worker) = gateway_with(config(), functions, 1).await;
    let pool = gateway.pool_status().expect("the gateway's pool");
    let address = gateway.local_addr();
    let abandoned = tokio::spawn(async move {
        let request = Request::post(format!("http://{address}/hold"))
            .body(Full::new(Bytes::from("x")))
            .expect("a request");
        http_client().request(request).await.map(|_| ())
    });
    let began = Instant::now();
    while started.load(Ordering::SeqCst) == 0 {
        assert!(began.elapsed() < DEADLINE, "the function never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held_at = Instant::now();
    abandoned.abort();
    // The worker is told to stop it, and says so.
    while pool.counters().cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            held_at.elapsed() < within,
            "the abandoned call was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (gateway, worker, pool, held_at)
}

#[tokio::test]
async fn an_abandoned_requests_function_is_stopped_and_its_credit_comes_back_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const HOLD: Duration = Duration::from_secs(3);
    let (started_holds, finished_holds) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (started, finished) = (started_holds.clone(), finished_holds.clone());
    let functions = functions().add("hold", move |p: Bytes| {
        let (started, finished) = (started.clone(), finished.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(HOLD).await;
            finished.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(p)
        }
    });
    // One credit: while the abandoned call holds it, nothing else runs; its credit is back
    // long before the function would have ended.
    let (gateway, worker, pool, held_at) =
        abandoned_on_the_only_credit(functions, &started_holds, HOLD / 2).await;
    let address = gateway.local_addr();
    fresh_call(&http_client(), address).await;
    let took = held_at.elapsed();
    assert!(took < HOLD / 2, "the fresh call waited {took:?}");
    eprintln!(
        "a fresh call after an abandoned one on the only credit: answered {took:?} after the hang-up"
    );

    // And the function was stopped, not left to run for nobody.
    tokio::time::sleep((HOLD + Duration::from_millis(500)).saturating_sub(held_at.elapsed())).await;
    assert_eq!(
        finished_holds.load(Ordering::SeqCst),
        0,
        "the abandoned function ran to its end"
    );
    assert_eq!(pool.free_credits(), 1);
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

/// A blocking function cannot be stopped in the middle: cancelled, it runs on to its end on
/// tokio's blocking pool, but its credit comes back at once and its result goes nowhere.
#[tokio::test]
async fn an_abandoned_blocking_function_runs_on_but_its_credit_and_result_are_let_go() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const HOLD: Duration = Duration::from_secs(2);
    let (started_holds, finished_holds) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (started, finished) = (started_holds.clone(), finished_holds.clone());
    let functions = functions().add_blocking("hold", move |p: Bytes| {
        started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(HOLD);
        finished.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(p)
    });
    let (gateway, worker, pool, held_at) =
        abandoned_on_the_only_credit(functions, &started_holds, HOLD / 2).await;
    // The credit is back while the function still runs.
    fresh_call(&http_client(), gateway.local_addr()).await;
    assert_eq!(finished_holds.load(Ordering::SeqCst), 0, "it ended early");
    let took = held_at.elapsed();
    assert!(took < HOLD / 2, "the fresh call waited {took:?}");
    // It runs on to its end ...
    while finished_holds.load(Ordering::SeqCst) == 0 {
        assert!(
            held_at.elapsed() < HOLD + DEADLINE,
            "the blocking function never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... and its result goes nowhere: the only answer the pool took is the fresh call's (an
    // answer sent after the cancel would be counted as dropped).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counters = pool.counters();
    assert_eq!(
        (
            counters.answered.load(Ordering::Relaxed),
            counters.dropped_answers.load(Ordering::Relaxed)
        ),
        (1, 0)
    );
    assert_eq!(pool.free_credits(), 1);
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn the_only_worker_killed_mid_request_is_answered_502_at_once() {
    let (gateway, worker) = gateway_with_worker(config(), 4).await;
    let client = http_client();
    let call = {
        let (client, address) = (client.clone(), gateway.local_addr());
        tokio::spawn(async move {
            let request = Request::get(format!("http://{address}/sleep:3000"))
                .body(Full::new(Bytes::new()))
                .expect("a request");
            send(&client, request).await
        })
    };
    // The request reaches the worker well within this; nothing outside tells when it has.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    worker.abort();
    let (status, _, body) = call.await.expect("task");
    let took = killed.elapsed();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("worker-died"), "{body}");
    assert!(
        took < Duration::from_secs(1),
        "answered {took:?} after the kill"
    );
    let (status, _, _) = get(&client, &gateway, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no worker, not ready"
    );
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn health_endpoints_and_request_ids() {
    let gateway = HttpGateway::start(config()).await.expect("starts");
    let client = http_client();
    assert_eq!(get(&client, &gateway, "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        get(&client, &gateway, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let worker = Worker::builder(functions())
        .connect(gateway.worker_address())
        .await
        .expect("a worker connects");
    let started = Instant::now();
    while get(&client, &gateway, "/readyz").await.0 != StatusCode::OK {
        assert!(started.elapsed() < DEADLINE, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let request = Request::post(format!("http://{}/upper", gateway.local_addr()))
        .header("x-request-id", "trace-me-42")
        .body(Full::new(Bytes::from("id")))
        .expect("a request");
    let (status, headers, _) = send(&client, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-request-id"], "trace-me-42");
    let (_, headers, _) = get(&client, &gateway, "/upper").await;
    assert_eq!(
        headers["x-request-id"].len(),
        36,
        "a request id is made when none is given"
    );
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    let (gateway, worker) = gateway_with_worker(config(), 8).await;
    let h2 = HttpClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let (h2, address) = (h2.clone(), gateway.local_addr());
            tokio::spawn(async move {
                let request = Request::post(format!("http://{address}/upper"))
                    .body(Full::new(Bytes::from(format!("stream {i}"))))
                    .expect("a request");
                let response = h2.request(request).await.expect("answered");
                let version = response.version();
                let body = response.into_body().collect().await.expect("a body");
                (version, body.to_bytes())
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let (version, body) = call.await.expect("task");
        assert_eq!(version, hyper::Version::HTTP_2);
        assert_eq!(body, Bytes::from(format!("STREAM {i}")));
    }
    // HTTP/1.1 on the same port, still.
    let (status, _, body) = get(&http_client(), &gateway, "/upper").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_mux_functions_parts_come_as_a_stream_one_line_each() {
    let gateway = HttpGateway::start(config()).await.expect("starts");
    let split = Functions::new().add_mux("split", |p: Bytes| async move {
        let mut parts: Vec<Bytes> = p
            .split(|b| *b == b' ')
            .map(Bytes::copy_from_slice)
            .collect();
        parts.push(Bytes::from_static(&[0xff, 0x00]));
        Ok::<_, String>(parts)
    });
    let worker = Worker::builder(split)
        .connect(gateway.worker_address())
        .await
        .expect("a worker connects");
    let client = http_client();
    let started = Instant::now();
    while get(&client, &gateway, "/readyz").await.0 != StatusCode::OK {
        assert!(started.elapsed() < DEADLINE, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let request = Request::post(format!("http://{}/split", gateway.local_addr()))
        .body(Full::new(Bytes::from("one two three")))
        .expect("a request");
    let response = client.request(request).await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let mut lines = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("a frame");
        if let Some(data) = frame.data_ref() {
            lines.push(String::from_utf8_lossy(data).into_owned());
        }
    }
    assert_eq!(
        lines,
        [
            "\"one\"\n",
            "\"two\"\n",
            "\"three\"\n",
            "{\"base64\":\"/wA=\"}\n"
        ],
        "one part per frame, in order"
    );
    worker.shutdown().await;
    gateway.shutdown().await.expect("clean");
}
