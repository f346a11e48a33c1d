//! The proxy's HTTP API against a real Redis and real HTTP nodes: every control and publish
//! route, the calls to a node's endpoints, the watchdog's statuses, compositions with lambdas
//! called back on the node, the bearer token, metrics, bad input, and exclusion across two
//! proxy processes.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rylm_gilmour::node::Node;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::*;

#[tokio::test]
async fn control_routes_register_list_read_and_delete_nodes_and_their_handlers() {
    let Some(setup) = Setup::new(
        "control_routes_register_list_read_and_delete_nodes_and_their_handlers",
        |_| {},
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let (echo, evt, extra) = (topic("echo"), topic("evt"), topic("extra"));
    let id = setup
        .register(json!({
            "port": node.port,
            "slots": [{"topic": format!("{evt}.*"), "group": "g1", "path": "/slot", "timeout": 5}],
            "services": [{"topic": echo, "group": "echoers", "path": "/echo", "timeout": 5}],
        }))
        .await;
    assert_eq!(
        setup.subscribers(&format!("gilmour.request.{echo}")).await,
        1
    );

    let (status, list) = setup.call("GET", "/nodes", None).await;
    assert_eq!(status, 200);
    let listed = list["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == json!(id))
        .expect("listed");
    assert_eq!(
        (
            listed["port"].clone(),
            listed["status"].clone(),
            listed["health_check"].clone()
        ),
        (json!(node.port), json!("ok"), json!("/health"))
    );

    let (status, one) = setup.call("GET", &format!("/nodes/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        one["services"],
        json!([{"topic": echo, "group": "echoers", "path": "/echo", "timeout": 5.0}])
    );
    assert_eq!(one["slots"][0]["topic"], json!(format!("{evt}.*")));

    let added = json!({"topic": extra, "group": "g", "path": "/text", "timeout": 2});
    assert_eq!(
        setup
            .call(
                "POST",
                &format!("/nodes/{id}/services"),
                Some(added.clone())
            )
            .await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        setup
            .call("POST", &format!("/nodes/{id}/services"), Some(added))
            .await
            .0,
        409,
        "the same topic and group twice"
    );
    let second = json!({"topic": extra, "path": "/slot"});
    assert_eq!(
        setup
            .call("POST", &format!("/nodes/{id}/slots"), Some(second))
            .await
            .0,
        200
    );
    let (_, services) = setup
        .call("GET", &format!("/nodes/{id}/services"), None)
        .await;
    assert_eq!(services["services"].as_array().map(Vec::len), Some(2));
    let (_, slots) = setup.call("GET", &format!("/nodes/{id}/slots"), None).await;
    assert_eq!(slots["slots"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        setup.subscribers(&format!("gilmour.request.{extra}")).await,
        1
    );
    assert_eq!(setup.subscribers(&format!("gilmour.slot.{extra}")).await, 1);

    assert_eq!(
        setup
            .call(
                "DELETE",
                &format!("/nodes/{id}/services?topic={extra}&path=/nope"),
                None
            )
            .await
            .0,
        404
    );
    assert_eq!(
        setup
            .call(
                "DELETE",
                &format!("/nodes/{id}/services?topic={extra}&path=/text"),
                None
            )
            .await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        setup
            .call("DELETE", &format!("/nodes/{id}/slots?topic={extra}"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        setup.subscribers(&format!("gilmour.request.{extra}")).await,
        0
    );
    assert_eq!(setup.subscribers(&format!("gilmour.slot.{extra}")).await, 0);
    assert_eq!(
        setup
            .call("DELETE", &format!("/nodes/{id}/slots"), None)
            .await
            .0,
        400,
        "which topic?"
    );

    assert_eq!(
        setup.call("DELETE", &format!("/nodes/{id}"), None).await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        setup.call("GET", &format!("/nodes/{id}"), None).await.0,
        404
    );
    let (_, list) = setup.call("GET", "/nodes", None).await;
    assert!(
        list["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["id"] != json!(id))
    );
    let deadline = Instant::now() + DEADLINE;
    while setup.subscribers(&format!("gilmour.request.{echo}")).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the deleted node's subscriptions are freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup.proxy.shutdown().await;
}

/// A port where something answers that is not HTTP.
async fn garbage_listener() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
            let _ = stream.write_all(b"\x00\x01 this is not HTTP\r\n\r\n").await;
        }
    });
    port
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_status_and_changes_nothing() {
    let Some(setup) = Setup::new(
        "bad_input_gets_a_4xx_with_a_status_and_changes_nothing",
        |_| {},
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let id = setup.register(json!({"port": node.port})).await;
    let echo = topic("echo");
    let (_, before) = setup.call("GET", "/nodes", None).await;
    let sick = TestNode::start().await;
    sick.healthy.store(false, Ordering::SeqCst);
    let garbage = garbage_listener().await;
    let closed = rylm_testkit::free_port();
    let service = |t: &str| json!({"topic": t, "group": "g", "path": "/echo"});
    let raw = |s: &str| s.to_owned();
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("POST", raw("/nodes"), Some(raw("{not json")), 400, "malformed JSON"),
        ("POST", raw("/nodes"), Some(raw("[1,2]")), 400, "JSON object"),
        ("POST", raw("/nodes"), Some(json!({"services": []}).to_string()), 400, "port"),
        ("POST", raw("/nodes"), Some(json!({"port": node.port, "services": [{"topic": "a.*", "group": "g", "path": "/echo"}]}).to_string()), 400, "wildcard"),
        ("POST", raw("/nodes"), Some(json!({"port": node.port, "services": [{"topic": echo, "path": "/echo"}]}).to_string()), 400, "needs a \"group\""),
        ("POST", raw("/nodes"), Some(json!({"port": node.port, "slots": [{"topic": echo, "path": "relative"}]}).to_string()), 400, "path"),
        ("POST", raw("/nodes"), Some(json!({"port": node.port, "services": [{"topic": echo, "group": "g", "path": "/echo", "timeout": "soon"}]}).to_string()), 400, "timeout"),
        ("POST", raw("/nodes"), Some(json!({"port": sick.port, "services": [service(&echo)]}).to_string()), 422, "health check"),
        ("POST", raw("/nodes"), Some(json!({"port": garbage, "services": [service(&echo)]}).to_string()), 422, "health check"),
        ("POST", raw("/nodes"), Some(json!({"port": closed, "services": [service(&echo)]}).to_string()), 422, "health check"),
        ("GET", raw("/nodes/no-such-node"), None, 404, "no node"),
        ("DELETE", raw("/nodes/no-such-node"), None, 404, "no node"),
        ("POST", raw("/nodes/no-such-node/services"), Some(service(&echo).to_string()), 404, "no node"),
        ("POST", format!("/nodes/{id}/services"), Some(json!({"topic": "w.*", "group": "g", "path": "/echo"}).to_string()), 400, "wildcard"),
        ("POST", format!("/nodes/{id}/services"), Some(json!({"topic": echo, "path": "/echo"}).to_string()), 400, "group"),
        ("POST", format!("/nodes/{id}/slots"), Some(raw("{")), 400, "malformed JSON"),
        ("POST", raw("/request/no-such-node"), Some(json!({"topic": echo}).to_string()), 404, "no node"),
        ("POST", raw("/signal/no-such-node"), Some(json!({"topic": echo}).to_string()), 404, "no node"),
        ("POST", format!("/request/{id}"), Some(json!({"message": 1}).to_string()), 400, "either"),
        ("POST", format!("/request/{id}"), Some(json!({"composition": {"pipe": [{"topic": "x.*"}]}}).to_string()), 400, "wildcard"),
        ("POST", format!("/signal/{id}"), Some(json!({"topic": "x.*"}).to_string()), 400, "one topic"),
        ("GET", raw("/nowhere"), None, 404, "no route"),
        ("PUT", raw("/nodes"), None, 405, "not allowed"),
    ];
    for (method, path, body, want, says) in cases {
        let body = body.as_deref();
        let (status, answer) = http(
            &setup.http,
            method,
            &format!("{}{path}", setup.base),
            body,
            None,
        )
        .await;
        let status_text = answer["status"].as_str().unwrap_or_default();
        assert_eq!(status, want, "{method} {path} {body:?}: {answer}");
        assert!(
            status_text.contains(says),
            "{method} {path}: {status_text:?} should say {says:?}"
        );
    }
    let (_, after) = setup.call("GET", "/nodes", None).await;
    assert_eq!(before, after, "nothing changed");
    assert_eq!(
        setup.subscribers(&format!("gilmour.request.{echo}")).await,
        0
    );
    let (_, services) = setup
        .call("GET", &format!("/nodes/{id}/services"), None)
        .await;
    assert_eq!(services, json!({"services": []}));
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn requests_and_signals_cross_between_http_nodes_and_rust_nodes() {
    let Some(setup) = Setup::new(
        "requests_and_signals_cross_between_http_nodes_and_rust_nodes",
        |_| {},
    )
    .await
    else {
        return;
    };
    let mut node = TestNode::start().await;
    let (echo, text, fail, teapot, evt) = (
        topic("echo"),
        topic("text"),
        topic("fail"),
        topic("teapot"),
        topic("evt"),
    );
    let svc = |t: &str, path: &str| json!({"topic": t, "group": "g", "path": path, "timeout": 5});
    let id = setup
        .register(json!({
            "port": node.port,
            "services": [svc(&echo, "/echo"), svc(&text, "/text"), svc(&fail, "/fail"), svc(&teapot, "/teapot")],
            "slots": [{"topic": format!("{evt}.*"), "group": "g1", "path": "/slot", "timeout": 5}],
        }))
        .await;
    let rust = Node::connect(&setup.url).await.expect("connects");

    let reply = rust
        .request(&echo, json!({"n": 1}), DEADLINE)
        .await
        .unwrap();
    assert_eq!(reply.code(), 200);
    assert_eq!(reply.data["echo"], json!({"n": 1}));
    assert_eq!(reply.data["topic"], json!(echo));
    assert_eq!(reply.data["timeout"], json!(5));
    assert!(
        reply.data["sender"].as_str().is_some_and(|s| s.len() >= 32),
        "the request's sender: {}",
        reply.data["sender"]
    );
    let reply = rust.request(&text, json!(null), DEADLINE).await.unwrap();
    assert_eq!(
        (reply.code(), reply.data),
        (200, json!("plain words")),
        "a body that is not JSON is a string"
    );
    let reply = rust.request(&fail, json!(null), DEADLINE).await.unwrap();
    assert_eq!(
        (reply.code(), reply.data),
        (500, json!("it broke")),
        "a 5xx is a 500"
    );
    let reply = rust.request(&teapot, json!(null), DEADLINE).await.unwrap();
    assert_eq!((reply.code(), reply.data), (418, json!({"why": "teapot"})));

    // The node publishes: a request to a Rust service, one to nobody, a signal to a Rust slot.
    let upper = topic("upper");
    rust.reply_to(&upper, "g", DEADLINE, |v: Value| async move {
        Ok(Value::from(v.as_str().unwrap_or_default().to_uppercase()))
    })
    .await
    .unwrap();
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"topic": upper, "message": "hi", "timeout": 5})),
        )
        .await;
    assert_eq!(
        (status, answer),
        (
            200,
            json!({"messages": [{"data": "HI", "code": 200}], "code": 200, "length": 1})
        )
    );
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"topic": topic("nobody"), "message": 1})),
        )
        .await;
    assert_eq!(
        (status, answer["code"].clone()),
        (404, json!(404)),
        "the code is the HTTP status"
    );
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
    let news = topic("news");
    rust.slot(&news, None, move |t, data| {
        let heard = heard.clone();
        async move {
            let _ = heard.send((t, data));
        }
    })
    .await
    .unwrap();
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/signal/{id}"),
            Some(json!({"topic": news, "message": {"x": 1}})),
        )
        .await;
    assert_eq!(
        (status, answer),
        (200, json!({"status": "ok", "receivers": 1}))
    );
    let (t, data) = tokio::time::timeout(DEADLINE, hearing.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t, data), (news.clone(), json!({"x": 1})));

    // A Rust signal reaches the node's grouped wildcard slot, with the concrete topic.
    assert_eq!(
        rust.signal(&format!("{evt}.made"), json!([1, 2]))
            .await
            .unwrap(),
        1
    );
    let call = tokio::time::timeout(DEADLINE, node.signals.recv())
        .await
        .expect("the slot is called")
        .unwrap();
    assert_eq!(call["topic"], json!(format!("{evt}.made")));
    assert_eq!(call["data"], json!([1, 2]));
    assert_eq!(call["timeout"], json!(5));

    let (status, metrics) = setup.call("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().expect("Prometheus text").to_owned();
    for line in [
        format!("gilmour_proxy_requests_total{{kind=\"service\",topic=\"{echo}\"}} 1"),
        format!(
            "gilmour_proxy_errors_total{{kind=\"service\",topic=\"{fail}\",error=\"failed\"}} 1"
        ),
        format!("gilmour_proxy_requests_total{{kind=\"request\",topic=\"{upper}\"}} 1"),
        format!("gilmour_proxy_requests_total{{kind=\"signal\",topic=\"{news}\"}} 1"),
        format!("gilmour_proxy_duration_seconds_count{{kind=\"slot\",topic=\"{evt}.made\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let (status, health) = setup.call("GET", "/healthz", None).await;
    assert_eq!((status, health["status"].clone()), (200, json!("ok")));
    rust.shutdown().await;
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn a_late_node_handler_gets_499_and_its_connection_is_closed() {
    let Some(setup) = Setup::new(
        "a_late_node_handler_gets_499_and_its_connection_is_closed",
        |_| {},
    )
    .await
    else {
        return;
    };
    // A node on a raw socket: it answers health checks, and for a call it reads the request,
    // never answers, and notes whether the proxy closes the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = Arc::new(AtomicBool::new(false));
    let seen_closed = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed = seen_closed.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if buffer.starts_with(b"GET") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        continue;
                    }
                    // A call: hold it and wait for the proxy to hang up.
                    let ended =
                        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                            .await;
                    if matches!(ended, Ok(Ok(0)) | Ok(Err(_))) {
                        closed.store(true, Ordering::SeqCst);
                    }
                    return;
                }
            });
        }
    });
    let slow = topic("slow");
    setup
        .register(json!({"port": port, "services": [{"topic": slow, "group": "g", "path": "/slow", "timeout": 0.5}]}))
        .await;
    let rust = Node::connect(&setup.url).await.unwrap();
    let started = Instant::now();
    let reply = rust.request(&slow, json!(null), DEADLINE).await.unwrap();
    assert_eq!(
        (reply.code(), reply.data),
        (499, json!("Execution timed out"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the service's timeout ends the call"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closed.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the proxy closes the connection to the late handler"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rust.shutdown().await;
    setup.proxy.shutdown().await;
}

async fn wait_for_status(setup: &Setup, id: &str, want: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, node) = setup.call("GET", &format!("/nodes/{id}"), None).await;
        if node["status"] == json!(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node becomes {want}; it is {}",
            node["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_watchdog_takes_subscriptions_away_gives_them_back_and_marks_a_gone_node_dirty() {
    let Some(setup) = Setup::new(
        "the_watchdog_takes_subscriptions_away_gives_them_back_and_marks_a_gone_node_dirty",
        |c| {
            c.health_interval = Duration::from_millis(100);
            c.health_timeout = Duration::from_millis(500);
            c.failure_threshold = 2;
            c.dirty_after = 3;
        },
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let (echo, evt) = (topic("echo"), topic("evt"));
    let id = setup
        .register(json!({
            "port": node.port,
            "services": [{"topic": echo, "group": "g", "path": "/echo"}],
            "slots": [{"topic": evt, "path": "/slot"}],
        }))
        .await;
    let request = format!("gilmour.request.{echo}");
    let slot = format!("gilmour.slot.{evt}");
    assert_eq!(
        (
            setup.subscribers(&request).await,
            setup.subscribers(&slot).await
        ),
        (1, 1)
    );

    node.healthy.store(false, Ordering::SeqCst);
    wait_for_status(&setup, &id, "unavailable").await;
    assert_eq!(
        (
            setup.subscribers(&request).await,
            setup.subscribers(&slot).await
        ),
        (0, 0),
        "subscriptions removed"
    );
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"topic": echo})),
        )
        .await;
    assert_eq!(
        status, 409,
        "an unavailable node does not publish: {answer}"
    );
    let (_, kept) = setup
        .call("GET", &format!("/nodes/{id}/services"), None)
        .await;
    assert_eq!(
        kept["services"].as_array().map(Vec::len),
        Some(1),
        "the registration is kept"
    );

    node.healthy.store(true, Ordering::SeqCst);
    wait_for_status(&setup, &id, "ok").await;
    assert_eq!(
        (
            setup.subscribers(&request).await,
            setup.subscribers(&slot).await
        ),
        (1, 1),
        "subscriptions back"
    );
    let rust = Node::connect(&setup.url).await.unwrap();
    assert_eq!(
        rust.request(&echo, json!(1), DEADLINE)
            .await
            .unwrap()
            .code(),
        200
    );

    node.stop();
    // Dirty: forgotten, everything of it freed; its id is answered 410 for a while.
    let deadline = Instant::now() + DEADLINE;
    while setup.call("GET", &format!("/nodes/{id}"), None).await.0 != 410 {
        assert!(Instant::now() < deadline, "the node becomes dirty");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, listed) = setup.call("GET", "/nodes", None).await;
    assert_eq!(listed["nodes"], json!([]), "no entry is kept");
    assert_eq!(setup.proxy.nodes(), 0);
    let deadline = Instant::now() + DEADLINE;
    while setup.subscribers(&request).await + setup.subscribers(&slot).await != 0 {
        assert!(Instant::now() < deadline, "a dirty node's subscriptions go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(json!({"topic": echo})),
        )
        .await;
    assert_eq!(status, 410, "a dirty node must register again");
    let (status, _) = setup
        .call(
            "POST",
            &format!("/nodes/{id}/slots"),
            Some(json!({"topic": "t", "path": "/slot"})),
        )
        .await;
    assert_eq!(status, 410);
    rust.shutdown().await;
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn compositions_through_the_proxy_call_lambdas_back_on_the_node() {
    let Some(setup) = Setup::new(
        "compositions_through_the_proxy_call_lambdas_back_on_the_node",
        |_| {},
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let id = setup.register(json!({"port": node.port})).await;
    let rust = Node::connect(&setup.url).await.unwrap();
    let (add1, double, fail) = (topic("add1"), topic("double"), topic("fail"));
    rust.reply_to(&add1, "m", DEADLINE, |v: Value| async move {
        Ok(json!(
            v["n"].as_i64().unwrap_or(v.as_i64().unwrap_or(0)) + 1
        ))
    })
    .await
    .unwrap();
    rust.reply_to(&double, "m", DEADLINE, |v: Value| async move {
        Ok(json!(v.as_i64().unwrap_or(0) * 2))
    })
    .await
    .unwrap();
    rust.reply_to(&fail, "m", DEADLINE, |_| async { Err("boom".to_owned()) })
        .await
        .unwrap();
    let request = |composition: Value| json!({"composition": composition, "message": {"n": 1, "k": 0}, "timeout": 5});

    let nested = json!({"pipe": [
        {"topic": add1, "message": {"n": 4}},
        {"parallel": [{"topic": double}, {"oror": [{"topic": fail}, {"topic": add1}]}]},
        {"lambda": "/lambda"}
    ]});
    let (status, answer) = setup
        .call("POST", &format!("/request/{id}"), Some(request(nested)))
        .await;
    assert_eq!(status, 200, "{answer}");
    let mut parts: Vec<i64> = answer["messages"][0]["data"]["lambda"]
        .as_array()
        .expect("the lambda got the parallel's datas")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    parts.sort_unstable();
    assert_eq!(
        parts,
        [6, 10],
        "add1 with n=4 merged gives 5; then double 10 and add1 6"
    );
    assert_eq!(
        answer["messages"][0]["data"]["topic"],
        Value::Null,
        "a lambda's topic is null"
    );

    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(request(
                json!({"andand": [{"topic": add1}, {"topic": fail}, {"topic": add1}]}),
            )),
        )
        .await;
    assert_eq!(
        (status, answer["messages"].clone()),
        (500, json!([{"data": "boom", "code": 500}]))
    );
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(request(
                json!({"batch": [{"topic": fail}, {"topic": add1}], "record": true}),
            )),
        )
        .await;
    assert_eq!(
        (status, answer),
        (
            500,
            json!({"messages": [{"data": "boom", "code": 500}, {"data": 2, "code": 200}], "code": 500, "length": 2})
        )
    );
    let (status, answer) = setup
        .call(
            "POST",
            &format!("/request/{id}"),
            Some(request(
                json!({"parallel": [{"topic": add1}, {"lambda": "/lambda"}]}),
            )),
        )
        .await;
    assert_eq!((status, answer["length"].clone()), (200, json!(2)));
    rust.shutdown().await;
    setup.proxy.shutdown().await;
}

#[tokio::test]
async fn a_bearer_token_guards_control_and_publish_routes_but_not_healthz_or_metrics() {
    let Some(setup) = Setup::new(
        "a_bearer_token_guards_control_and_publish_routes_but_not_healthz_or_metrics",
        |c| {
            c.token = Some("let-me-in".to_owned());
        },
    )
    .await
    else {
        return;
    };
    let node = TestNode::start().await;
    let register = json!({"port": node.port}).to_string();
    let url = format!("{}/nodes", setup.base);
    for token in [None, Some("wrong"), Some("let-me-i")] {
        let (status, answer) = http(&setup.http, "POST", &url, Some(&register), token).await;
        assert_eq!(status, 401, "{token:?}: {answer}");
        assert!(
            answer["status"]
                .as_str()
                .unwrap_or_default()
                .contains("Bearer")
        );
        assert_eq!(http(&setup.http, "GET", &url, None, token).await.0, 401);
    }
    let (status, answer) = http(
        &setup.http,
        "POST",
        &url,
        Some(&register),
        Some("let-me-in"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let publish = format!("{}/signal/{id}", setup.base);
    let signal = json!({"topic": topic("t")}).to_string();
    assert_eq!(
        http(&setup.http, "POST", &publish, Some(&signal), None)
            .await
            .0,
        401
    );
    assert_eq!(
        http(
            &setup.http,
            "POST",
            &publish,
            Some(&signal),
            Some("let-me-in")
        )
        .await
        .0,
        200
    );
    assert_eq!(
        http(
            &setup.http,
            "GET",
            &format!("{}/healthz", setup.base),
            None,
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        http(
            &setup.http,
            "GET",
            &format!("{}/metrics", setup.base),
            None,
            None
        )
        .await
        .0,
        200
    );
    setup.proxy.shutdown().await;
}

/// A `rylm-gilmour-proxy` process, stopped on drop.
struct ProxyProcess {
    child: std::process::Child,
    base: String,
}

impl ProxyProcess {
    fn start(redis: &str) -> ProxyProcess {
        let port = rylm_testkit::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rylm-gilmour-proxy"))
            .args(["--redis", redis, "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starts the proxy binary");
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the proxy listens within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        ProxyProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn one_node_of_a_group_answers_each_request_across_two_proxy_processes() {
    let test = "one_node_of_a_group_answers_each_request_across_two_proxy_processes";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let (first, second) = (ProxyProcess::start(&url), ProxyProcess::start(&url));
    let (a, b) = (TestNode::start().await, TestNode::start().await);
    let echo = topic("echo");
    let http_client = client();
    for (proxy, node) in [(&first, &a), (&second, &b)] {
        let body = json!({"port": node.port, "services": [{"topic": echo, "group": "shared", "path": "/echo"}]}).to_string();
        let (status, answer) = http(
            &http_client,
            "POST",
            &format!("{}/nodes", proxy.base),
            Some(&body),
            None,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    let rust = Node::connect(&url).await.unwrap();
    let mut answered = HashMap::new();
    for i in 0..20 {
        let reply = rust.request(&echo, json!(i), DEADLINE).await.unwrap();
        assert_eq!(reply.code(), 200);
        *answered.entry(reply.data["echo"].clone()).or_insert(0) += 1;
    }
    assert_eq!(answered.len(), 20, "every request answered once");
    // The losing node's request would be answered late, if at all; give it time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ca, cb) = (
        a.calls.load(Ordering::SeqCst),
        b.calls.load(Ordering::SeqCst),
    );
    assert_eq!(
        ca + cb,
        20,
        "each request ran on one node of the group: {ca} + {cb}"
    );
    rust.shutdown().await;
}
