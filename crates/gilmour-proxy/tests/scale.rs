//! The proxy holds many nodes and refuses what it must: 1,000 nodes registered and deleted give
//! their memory back, compositions and timeouts past the limits are refused, no node publishes
//! on the protocol's own channels, a node's token acts for that node only, and a node that
//! registers again replaces its old registration. Real Redis, real HTTP.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config, EventInterface, PubsubInterface};
use serde_json::{Value, json};

mod common;

use common::*;

/// The RSS of a process once it stops changing (the proxy trims a second after deletions).
async fn settled_rss_kib(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = rylm_testkit::rss_kib(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = rylm_testkit::rss_kib(pid);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Polls `/healthz` until the proxy holds `nodes` nodes.
async fn wait_for_nodes(http: &Client, base: &str, nodes: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, health) = common::http(http, "GET", &format!("{base}/healthz"), None, None).await;
        if health["nodes"] == json!(nodes) {
            return;
        }
        assert!(Instant::now() < deadline, "{nodes} nodes: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `count` nodes, each with a service and a slot, then deletes them: the RSS of the
/// proxy with them all registered, and once they are gone and it has given memory back.
async fn register_and_delete(
    http: &Client,
    base: &str,
    pid: u32,
    count: usize,
    start: u64,
) -> (u64, u64) {
    let mut nodes = Vec::with_capacity(count);
    for _ in 0..count {
        nodes.push(TestNode::start().await);
    }
    let mut ids = Vec::with_capacity(count);
    for node in &nodes {
        let body = json!({
            "port": node.port,
            "services": [{"topic": topic("echo"), "group": "g", "path": "/echo"}],
            "slots": [{"topic": topic("evt"), "path": "/slot"}],
        })
        .to_string();
        let (status, answer) =
            common::http(http, "POST", &format!("{base}/nodes"), Some(&body), None).await;
        assert_eq!(status, 200, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    wait_for_nodes(http, base, count).await;
    let full = rylm_testkit::rss_kib(pid);
    for id in &ids {
        let (status, answer) =
            common::http(http, "DELETE", &format!("{base}/nodes/{id}"), None, None).await;
        assert_eq!(status, 200, "{answer}");
    }
    wait_for_nodes(http, base, 0).await;
    // The nodes go away too. The proxy gives its memory back within seconds.
    drop(nodes);
    let deadline = Instant::now() + Duration::from_secs(20);
    let end = loop {
        let now = rylm_testkit::rss_kib(pid);
        if now as f64 <= start as f64 * 1.10 || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    (full, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_nodes_registered_then_deleted_give_their_memory_back() {
    const NODES: usize = 1000;
    let test = "a_thousand_nodes_registered_then_deleted_give_their_memory_back";
    let Some(redis) = rylm_testkit::redis_url(test) else {
        return;
    };
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm-gilmour-proxy"))
        .args(["--redis", &redis, "--listen", &listen])
        .args(["--health-interval", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy starts");
    let pid = proxy.id().expect("a pid");
    let base = format!("http://{listen}");
    let http = client();
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(&listen).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_nodes(&http, &base, 0).await;
    // One-time costs (the worker threads' allocator arenas, lazily made statics) are paid by a
    // few nodes first; what is measured is what 1,000 nodes leave behind.
    register_and_delete(&http, &base, pid, 10, 0).await;
    let start = settled_rss_kib(pid).await;
    let (full, end) = register_and_delete(&http, &base, pid, NODES, start).await;
    let per_node = full.saturating_sub(start) as f64 / NODES as f64;
    eprintln!(
        "proxy RSS: {start} KiB at the start, {full} KiB with {NODES} nodes ({per_node:.1} KiB \
         per node), {end} KiB after deleting them"
    );
    assert!(
        per_node < 100.0,
        "a node costs {per_node:.1} KiB of the proxy"
    );
    assert!(
        end as f64 <= start as f64 * 1.10,
        "RSS at the end {end} KiB within 10% of the start {start} KiB"
    );
    let _ = proxy.kill().await;
}

#[tokio::test]
async fn compositions_and_timeouts_past_the_limits_are_refused() {
    let Some(setup) = Setup::new(
        "compositions_and_timeouts_past_the_limits_are_refused",
        |c| {
            c.limits.max_steps = 10;
            c.limits.max_timeout = Duration::from_secs(60);
        },
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let id = setup.register(json!({"port": node.port})).await;
    let steps = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({"topic": "x"})).collect() };
    let cases = [
        (json!({"composition": {"parallel": steps(11)}}), 422),
        // Nested steps count: 2 compositions of 5, each a step itself.
        (
            json!({"composition": {"pipe": [{"batch": steps(5)}, {"oror": steps(5)}]}}),
            422,
        ),
        (json!({"topic": "x", "timeout": 61}), 422),
        (json!({"topic": "x", "timeout": 31_536_000}), 422),
        (
            json!({"composition": {"pipe": [{"topic": "x", "timeout": 3600}]}}),
            422,
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = setup
            .call("POST", &format!("/request/{id}"), Some(body.clone()))
            .await;
        assert_eq!(status, want, "{body}: {answer}");
        assert!(answer["status"].as_str().is_some(), "{answer}");
    }
    // Within the limits it runs (nobody serves `x`: 404).
    let (status, _) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"composition": {"parallel": steps(10)}, "timeout": 60})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/nodes/{id}/services"),
            Some(json!({"topic": topic("t"), "group": "g", "path": "/echo", "timeout": 3600})),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn nodes_may_not_publish_on_response_or_health_channels() {
    let Some(setup) = Setup::new(
        "nodes_may_not_publish_on_response_or_health_channels",
        |_| {},
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let id = setup.register(json!({"port": node.port})).await;
    let victim = format!("gilmour.response.{}", uuid::Uuid::new_v4());
    let subscriber = Builder::from_config(Config::from_url(&setup.url).unwrap())
        .build_subscriber_client()
        .unwrap();
    subscriber.init().await.unwrap();
    subscriber.subscribe(&victim).await.unwrap();
    let _: fred::types::Value = subscriber.ping(None).await.unwrap();
    let mut heard = subscriber.message_rx();
    let forged = json!({"data": "forged", "code": 200});
    let attempts = [
        ("signal", json!({"topic": victim, "message": forged})),
        ("request", json!({"topic": victim, "message": forged})),
        (
            "request",
            json!({"topic": "gilmour.health.some-node", "message": null}),
        ),
        (
            "request",
            json!({"composition": {"pipe": [{"topic": "ok"}, {"topic": victim}]}}),
        ),
    ];
    for (route, body) in attempts {
        let (status, answer) = setup
            .call("POST", &format!("/{route}/{id}"), Some(body.clone()))
            .await;
        assert_eq!(status, 403, "{route} {body}: {answer}");
    }
    // Nothing reached the victim's channel: the first message it hears is this one.
    let publisher = Builder::from_config(Config::from_url(&setup.url).unwrap())
        .build()
        .unwrap();
    publisher.init().await.unwrap();
    let _: i64 = publisher.publish(&victim, "sentinel").await.unwrap();
    let first = tokio::time::timeout(DEADLINE, heard.recv())
        .await
        .expect("heard in time")
        .expect("a message");
    assert_eq!(first.value.as_str().as_deref(), Some("sentinel"));
    let _ = publisher.quit().await;
    let _ = subscriber.quit().await;
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn a_node_token_acts_for_its_own_node_only() {
    let Some(setup) = Setup::new("a_node_token_acts_for_its_own_node_only", |c| {
        c.token = Some("operator".to_owned());
        c.register_token = Some("registrar".to_owned());
    })
    .await
    else {
        return;
    };
    let call = |method: &'static str, path: String, body: Option<Value>, token: &str| {
        let (http, base, token) = (&setup.http, &setup.base, token.to_owned());
        async move {
            let body = body.map(|b| b.to_string());
            common::http(
                http,
                method,
                &format!("{base}{path}"),
                body.as_deref(),
                Some(&token),
            )
            .await
        }
    };
    let (a, b) = (TestNode::start().await, TestNode::start().await);
    let mut nodes = Vec::new();
    for node in [&a, &b] {
        let (status, answer) = call(
            "POST",
            "/nodes".into(),
            Some(json!({"port": node.port})),
            "registrar",
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let token = answer["token"].as_str().expect("a token").to_owned();
        nodes.push((answer["id"].as_str().unwrap().to_owned(), token));
    }
    let [(a_id, a_token), (b_id, b_token)] = [nodes[0].clone(), nodes[1].clone()];
    assert_ne!(a_token, b_token);
    let signal = json!({"topic": topic("t"), "message": 1});
    // A's token: A's routes, nothing else.
    assert_eq!(
        call("DELETE", format!("/nodes/{b_id}"), None, &a_token)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            "POST",
            format!("/signal/{b_id}"),
            Some(signal.clone()),
            &a_token
        )
        .await
        .0,
        403
    );
    assert_eq!(call("GET", "/nodes".into(), None, &a_token).await.0, 401);
    assert_eq!(
        call(
            "POST",
            format!("/signal/{a_id}"),
            Some(signal.clone()),
            &a_token
        )
        .await
        .0,
        200
    );
    // The registration token registers and does nothing else.
    assert_eq!(
        call("DELETE", format!("/nodes/{b_id}"), None, "registrar")
            .await
            .0,
        403
    );
    assert_eq!(call("GET", "/nodes".into(), None, "registrar").await.0, 403);
    // B is still there; A deletes itself; the operator deletes B.
    assert_eq!(
        call("GET", format!("/nodes/{b_id}"), None, &b_token)
            .await
            .0,
        200
    );
    assert_eq!(
        call("DELETE", format!("/nodes/{a_id}"), None, &a_token)
            .await
            .0,
        200
    );
    assert_eq!(
        call("DELETE", format!("/nodes/{b_id}"), None, "operator")
            .await
            .0,
        200
    );
    assert_eq!(setup.proxy.nodes(), 0);
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn a_node_that_registers_again_replaces_its_old_registration() {
    let Some(setup) = Setup::new(
        "a_node_that_registers_again_replaces_its_old_registration",
        |_| {},
    )
    .await
    else {
        return;
    };
    let mut node = TestNode::start().await;
    let evt = topic("evt");
    let registration = json!({"port": node.port, "slots": [{"topic": evt, "path": "/slot"}]});
    let first = setup.register(registration.clone()).await;
    // The node restarts and registers again, from the same host and port.
    let second = setup.register(registration).await;
    assert_ne!(first, second);
    assert_eq!(setup.proxy.nodes(), 1);
    assert_eq!(
        setup.call("GET", &format!("/nodes/{first}"), None).await.0,
        404
    );
    assert_eq!(
        setup.subscribers(&format!("gilmour.slot.{evt}")).await,
        1,
        "one subscription for the slot"
    );
    // One signal, one POST: the next call the slot gets is the next signal.
    for n in [1, 2] {
        let (status, answer) = setup
            .call(
                "POST",
                &format!("/signal/{second}"),
                Some(json!({"topic": evt, "message": n})),
            )
            .await;
        assert_eq!((status, &answer["receivers"]), (200, &json!(1)), "{answer}");
    }
    for n in [1, 2] {
        let call = tokio::time::timeout(DEADLINE, node.signals.recv())
            .await
            .expect("called in time")
            .expect("a call");
        assert_eq!(call["data"], json!(n), "{call}");
    }
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn connections_nodes_headers_and_bodies_past_their_limits_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(setup) = Setup::new(
        "connections_nodes_headers_and_bodies_past_their_limits_are_refused",
        |c| {
            c.max_connections = 2;
            c.max_nodes = 1;
            c.max_body = 1024;
            c.header_timeout = Duration::from_millis(300);
        },
    )
    .await
    else {
        return;
    };
    let address = setup.proxy.local_addr();
    // A client that never finishes its headers is cut off.
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the proxy closes a connection whose headers never end"
    );
    drop(slow);
    // Two connections held open: a third is answered 503 and closed.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        held.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, third.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(held);
    drop(third);
    // One node at most; a body over 1 KiB is a 413.
    let (a, b) = (TestNode::start().await, TestNode::start().await);
    let deadline = Instant::now() + DEADLINE;
    let id = loop {
        let (status, answer) = setup
            .call("POST", "/nodes", Some(json!({"port": a.port})))
            .await;
        if status == 200 {
            break answer["id"].as_str().unwrap().to_owned();
        }
        // The held connections may still be closing.
        assert!(Instant::now() < deadline, "{status}: {answer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, answer) = setup
        .call("POST", "/nodes", Some(json!({"port": b.port})))
        .await;
    assert_eq!(status, 503, "{answer}");
    let big = json!({"topic": "t", "message": "x".repeat(2000)});
    let (status, _) = setup
        .call("POST", &format!("/signal/{id}"), Some(big))
        .await;
    assert_eq!(status, 413);
    setup.proxy.shutdown().await;
}

/// One GET on the admin listener: the status and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    rylm_testkit::http_get(&address.to_string(), path)
        .await
        .expect("answered")
}

fn sample(body: &str, name: &str) -> f64 {
    rylm_testkit::metric_sample(body, name, None)
}

#[tokio::test]
async fn the_admin_listener_shows_the_nodes_and_redis() {
    let Some(setup) = Setup::new("the_admin_listener_shows_the_nodes_and_redis", |c| {
        c.admin = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    else {
        return;
    };
    let admin = setup.proxy.admin_addr().expect("an admin address");
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert_eq!(get(admin, "/healthz").await.0, 200);
    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&body, "gilmour_proxy_nodes"), 0.0);
    assert_eq!(sample(&body, "gilmour_proxy_redis_connected"), 1.0);
    let node = TestNode::start().await;
    let echo = topic("echo");
    let id = setup
        .register(json!({"port": node.port, "services": [{"topic": echo, "group": "g", "path": "/echo"}]}))
        .await;
    let (status, _) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"topic": echo, "message": 1})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, body) = get(admin, "/metrics").await;
    assert_eq!(sample(&body, "gilmour_proxy_nodes"), 1.0);
    assert_eq!(sample(&body, "gilmour_proxy_busy_total"), 0.0);
    assert!(
        body.contains(&format!(
            "gilmour_proxy_requests_total{{kind=\"service\",topic=\"{echo}\"}} 1"
        )),
        "{body}"
    );
    setup.proxy.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener stops"
    );
}
