//! The node's other duties on a real Redis: compositions of every kind, error records, the
//! bound on running handlers, removing subscriptions, stopping a handler past its timeout, and
//! a Redis of the test's own for AUTH and a restart.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use rylm_gilmour::compose::{Composition, Executable, Kind};
use rylm_gilmour::node::{self, Node, NodeOptions};
use rylm_gilmour::protocol::{self, Envelope, ErrorRecord};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);

fn topic(name: &str) -> String {
    format!("{name}.{}", uuid::Uuid::new_v4())
}

async fn serve_math(node: &Node, add1: &str, double: &str, fail: &str) {
    node.reply_to(add1, "math", DEADLINE, |v: Value| async move {
        Ok(json!(v.as_i64().unwrap_or(0) + 1))
    })
    .await
    .expect("add1");
    node.reply_to(double, "math", DEADLINE, |v: Value| async move {
        Ok(json!(v.as_i64().unwrap_or(0) * 2))
    })
    .await
    .expect("double");
    node.reply_to(fail, "math", DEADLINE, |_| async { Err("boom".to_owned()) })
        .await
        .expect("fail");
}

#[tokio::test]
async fn compositions_of_every_kind_run_on_redis() {
    let Some(url) = rylm_testkit::redis_url("compositions_of_every_kind_run_on_redis") else {
        return;
    };
    let node = Node::connect(&url).await.expect("connects");
    let (add1, double, fail) = (topic("add1"), topic("double"), topic("fail"));
    serve_math(&node, &add1, &double, &fail).await;
    let nobody = topic("nobody");
    let req = |t: &str| Executable::request(t.to_owned());
    let wrap = node::lambda(|v| async move { Ok(json!({ "wrapped": v })) });
    let run = |c: Composition<node::Lambda>, input: Value| {
        let node = &node;
        async move { serde_json::to_value(node.compose(&c, input, DEADLINE).await).unwrap() }
    };

    let pipe = Composition::new(Kind::Pipe, vec![req(&add1), req(&double), req(&add1)]);
    assert_eq!(
        run(pipe, json!(1)).await["messages"],
        json!([{"data": 5, "code": 200}])
    );
    let andand = Composition::new(Kind::AndAnd, vec![req(&add1), req(&fail), req(&double)]);
    assert_eq!(
        run(andand, json!(1)).await["messages"],
        json!([{"data": "boom", "code": 500}])
    );
    let oror = Composition::new(Kind::OrOr, vec![req(&nobody), req(&double), req(&fail)]);
    assert_eq!(
        run(oror, json!(4)).await["messages"],
        json!([{"data": 8, "code": 200}])
    );
    let batch = Composition::new(Kind::Batch { record: true }, vec![req(&fail), req(&add1)]);
    assert_eq!(
        run(batch, json!(1)).await,
        json!({"messages": [{"data": "boom", "code": 500}, {"data": 2, "code": 200}], "code": 500, "length": 2})
    );
    let last = Composition::new(Kind::Batch { record: false }, vec![req(&fail), req(&add1)]);
    assert_eq!(run(last, json!(1)).await["code"], json!(200));
    let parallel = Composition::new(Kind::Parallel, vec![req(&add1), req(&double), req(&nobody)]);
    let out = run(parallel, json!(5)).await;
    let mut datas: Vec<String> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].to_string())
        .collect();
    datas.sort();
    assert_eq!(datas.len(), 3);
    assert!(datas.contains(&"6".to_owned()) && datas.contains(&"10".to_owned()));
    assert_eq!(
        out["code"],
        json!(404),
        "the highest code: nobody serves one topic"
    );
    // Nested: pipe(add1, parallel(double, andand(add1, add1)), lambda).
    let nested = Composition::new(
        Kind::Pipe,
        vec![
            req(&add1),
            Composition::new(
                Kind::Parallel,
                vec![
                    req(&double),
                    Composition::new(Kind::AndAnd, vec![req(&add1), req(&add1)]).into(),
                ],
            )
            .into(),
            Executable::Lambda(wrap),
        ],
    );
    let out = run(nested, json!(1)).await;
    let mut wrapped: Vec<i64> = out["messages"][0]["data"]["wrapped"]
        .as_array()
        .expect("the parallel's datas as one array")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    wrapped.sort_unstable();
    assert_eq!(
        wrapped,
        [3, 4],
        "double(2) and add1(2) on the pipe's value 2"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_failing_reply_is_published_as_an_error_record() {
    let test = "a_failing_reply_is_published_as_an_error_record";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let queue = format!("rylm-test-errors-{}", uuid::Uuid::new_v4());
    let options = NodeOptions {
        mirror_errors: true,
        error_queue: Some(queue.clone()),
        ..NodeOptions::default()
    };
    let node = Node::connect_with(&url, options).await.expect("connects");
    let listener = Builder::from_config(Config::from_url(&url).unwrap())
        .build_subscriber_client()
        .expect("a subscriber");
    listener.init().await.expect("connects");
    let mut messages = listener.message_rx();
    listener
        .subscribe("gilmour.error")
        .await
        .expect("subscribes");
    listener
        .subscribe("gilmour.errors")
        .await
        .expect("subscribes");
    let fail = topic("fail");
    node.reply_to(&fail, "g", DEADLINE, |_| async { Err("boom".to_owned()) })
        .await
        .expect("serves");
    let before = std::time::SystemTime::now();
    let reply = node
        .request(&fail, json!({"x": 1}), DEADLINE)
        .await
        .expect("requests");
    assert_eq!((reply.code(), reply.data), (500, json!("boom")));
    let mut channels = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while channels.len() < 2 && Instant::now() < deadline {
        let message = tokio::time::timeout(DEADLINE, messages.recv())
            .await
            .expect("a record arrives")
            .expect("a message");
        let envelope = Envelope::decode(message.value.as_bytes().unwrap_or_default());
        let record: ErrorRecord = serde_json::from_value(envelope.data).expect("a record");
        if record.topic != fail {
            continue; // another test's record
        }
        assert_eq!(record.code, 500);
        assert_eq!(record.userdata, json!("boom"));
        assert_eq!(record.request_data, json!({"x": 1}));
        assert!(!record.multi_process);
        assert_eq!(envelope.code, Some(500));
        assert_eq!(
            record.timestamp.len(),
            24,
            "RFC 3339 with milliseconds: {}",
            record.timestamp
        );
        let year = before
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| 1970 + d.as_secs() / 31_556_952)
            .unwrap_or(0);
        assert!(
            record.timestamp.starts_with(&year.to_string()),
            "{}",
            record.timestamp
        );
        channels.push(message.channel.to_string());
    }
    channels.sort();
    assert_eq!(channels, ["gilmour.error", "gilmour.errors"]);
    let raw = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    raw.init().await.expect("connects");
    let queued: Vec<String> = raw.lrange(&queue, 0, -1).await.expect("LRANGE");
    assert_eq!(queued.len(), 1, "the record is queued once");
    let _: i64 = raw.del(&queue).await.expect("DEL");
    node.shutdown().await;
}

#[tokio::test]
async fn handlers_run_at_most_the_configured_number_at_once() {
    let Some(url) = rylm_testkit::redis_url("handlers_run_at_most_the_configured_number_at_once")
    else {
        return;
    };
    let options = NodeOptions {
        concurrency: 2,
        ..NodeOptions::default()
    };
    let server = Node::connect_with(&url, options).await.expect("connects");
    let client = Arc::new(Node::connect(&url).await.expect("connects"));
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let busy = topic("busy");
    let (r, m) = (running.clone(), most.clone());
    server
        .reply_to(&busy, "g", DEADLINE, move |v| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(v)
            }
        })
        .await
        .expect("serves");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (client, busy) = (client.clone(), busy.clone());
        calls.spawn(async move { (i, client.request(&busy, json!(i), DEADLINE).await) });
    }
    let mut answered = 0;
    while let Some(done) = calls.join_next().await {
        let (i, reply) = done.expect("a call");
        let reply = reply.expect("requests");
        assert_eq!((reply.code(), reply.data), (200, json!(i)));
        answered += 1;
    }
    assert_eq!(answered, 8);
    assert_eq!(most.load(Ordering::SeqCst), 2, "two at once, never more");
    server.shutdown().await;
    client.shutdown().await;
}

/// A relay to Redis that holds what the client sends on its second connection (a node's
/// subscriber; the first is its command connection) for `delay` before passing it on.
async fn slow_subscriber_relay(redis: &str, delay: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().expect("an address").port();
    let redis = common::redis_address(redis);
    tokio::spawn(async move {
        let mut index = 0;
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&redis).await else {
                continue;
            };
            let slow = index == 1;
            index += 1;
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 << 10];
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    if slow {
                        tokio::time::sleep(delay).await;
                    }
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_request_is_published_only_once_its_response_channel_is_subscribed() {
    // fred completes SUBSCRIBE when it is written, not when Redis has run it; a reply published
    // in between is lost. With the requester's subscriber connection slowed down, every
    // request would time out unless the node waits for Redis to confirm.
    let test = "a_request_is_published_only_once_its_response_channel_is_subscribed";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let server = Node::connect(&url).await.expect("connects");
    let echo = topic("echo");
    server
        .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("serves");
    // Both ways of receiving replies: a subscription per request, and the node's one pattern.
    for shared_responses in [false, true] {
        let port = slow_subscriber_relay(&url, Duration::from_millis(150)).await;
        let db = url.rsplit_once('/').map(|(_, db)| db).unwrap_or("0");
        let options = NodeOptions {
            shared_responses,
            ..NodeOptions::default()
        };
        let client = Node::connect_with(&format!("redis://127.0.0.1:{port}/{db}"), options)
            .await
            .expect("connects through the relay");
        for n in 0..3 {
            let reply = client
                .request(&echo, json!(n), Duration::from_secs(3))
                .await
                .expect("requests");
            assert_eq!(
                (reply.code(), reply.data),
                (200, json!(n)),
                "request {n}, shared responses {shared_responses}"
            );
        }
        client.shutdown().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn removed_services_and_slots_stop_hearing_and_a_late_handler_is_stopped() {
    let test = "removed_services_and_slots_stop_hearing_and_a_late_handler_is_stopped";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let node = Node::connect(&url).await.expect("connects");
    let echo = topic("echo");
    let served = node
        .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("serves");
    let second = node
        .reply_to(&echo, "other", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("a second group on the same topic");
    assert!(node.remove(served).await.expect("removes"));
    assert_eq!(
        node.request(&echo, json!(1), DEADLINE)
            .await
            .unwrap()
            .code(),
        200,
        "the other group still answers"
    );
    assert!(node.remove(second).await.expect("removes"));
    assert!(!node.remove(second).await.expect("removes"), "only once");
    assert_eq!(
        node.request(&echo, json!(1), DEADLINE)
            .await
            .unwrap()
            .code(),
        404
    );
    let evt = topic("evt");
    let slot = node
        .slot(&evt, None, |_, _| async {})
        .await
        .expect("a slot");
    assert_eq!(node.signal(&evt, json!(1)).await.unwrap(), 1);
    node.remove(slot).await.expect("removes");
    assert_eq!(node.signal(&evt, json!(1)).await.unwrap(), 0);

    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let slow = topic("slow");
    node.reply_to(&slow, "g", Duration::from_millis(200), move |_| {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            done.store(true, Ordering::SeqCst);
            Ok(Value::Null)
        }
    })
    .await
    .expect("serves");
    let reply = node.request(&slow, Value::Null, DEADLINE).await.unwrap();
    assert_eq!(reply.code(), 499);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !finished.load(Ordering::SeqCst),
        "the handler was stopped at its timeout"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn nodes_authenticate_and_come_back_after_a_redis_restart() {
    let test = "nodes_authenticate_and_come_back_after_a_redis_restart";
    let Some(program) = rylm_testkit::redis_server(test) else {
        return;
    };
    let mut redis = rylm_testkit::PrivateRedis::start(&program, "s3cret");
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let wrong = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let refused = Node::connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    let said = refused.to_string();
    assert!(
        said.contains("connecting") && !said.contains("wrong"),
        "{said}"
    );
    let none = Node::connect(&format!("redis://127.0.0.1:{}", redis.port))
        .await
        .map(|_| ())
        .expect_err("no password is refused");
    assert!(none.to_string().to_lowercase().contains("auth"), "{none}");

    let server = Node::connect(&url).await.expect("connects with AUTH");
    let client = Node::connect(&url).await.expect("connects with AUTH");
    let echo = topic("echo");
    let evt = topic("evt");
    server
        .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("serves");
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
    server
        .slot(&format!("{evt}.*"), None, move |topic, _| {
            let heard = heard.clone();
            async move {
                let _ = heard.send(topic);
            }
        })
        .await
        .expect("a pattern slot");
    let ident = server
        .enable_health()
        .await
        .expect("joins the health registry");
    assert_eq!(
        client
            .request(&echo, json!("before"), DEADLINE)
            .await
            .unwrap()
            .code(),
        200
    );

    redis.kill();
    redis.run();
    // Both nodes reconnect and the server subscribes again; every attempt is bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(&echo, json!("after"), Duration::from_secs(2)),
        )
        .await;
        if let Ok(Ok(reply)) = &attempt
            && reply.code() == 200
        {
            break reply.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the nodes came back within 30 s: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(answer.data, json!("after"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = client
            .signal(&format!("{evt}.created"), json!(1))
            .await
            .unwrap_or(0);
        if sent == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pattern slot is back within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let topic = tokio::time::timeout(DEADLINE, hearing.recv())
        .await
        .expect("heard")
        .expect("a topic");
    assert_eq!(topic, format!("{evt}.created"));
    // The restarted Redis kept nothing; the node has joined the health registry again, and
    // answers its ping.
    let raw = Builder::from_config(Config::from_url(&url).expect("a valid URL"))
        .build()
        .expect("a client");
    raw.init().await.expect("connects");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let registered: Option<String> =
            raw.hget(protocol::HEALTH_HASH, &ident).await.expect("HGET");
        if registered.as_deref() == Some("true") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node is in the health registry again within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pong = client
        .request(&protocol::health_channel(&ident), json!(null), DEADLINE)
        .await
        .expect("pinged");
    assert_eq!(pong.code(), 200);
    let _ = raw.quit().await;
    server.shutdown().await;
    client.shutdown().await;
}

#[tokio::test]
async fn a_ruby_request_is_answered_and_panics_and_code_zero_are_replies_too() {
    let test = "a_ruby_request_is_answered_and_panics_and_code_zero_are_replies_too";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let node = Node::connect(&url).await.expect("connects");
    let (panics, zero) = (topic("panics"), topic("zero"));
    node.reply_to(&panics, "g", DEADLINE, |_| async {
        if true {
            panic!("on purpose");
        }
        Ok(Value::Null)
    })
    .await
    .expect("serves");
    node.reply_to_with(&zero, "g", DEADLINE, |incoming: rylm_gilmour::node::Incoming| async move {
        rylm_gilmour::node::Reply {
            data: json!({"topic": incoming.topic, "sender": incoming.sender, "data": incoming.data}),
            code: 0,
        }
    })
    .await
    .expect("serves");
    let reply = node.request(&panics, Value::Null, DEADLINE).await.unwrap();
    assert_eq!(reply.code(), 500);
    assert!(
        reply.data.as_str().unwrap_or_default().contains("panicked"),
        "{}",
        reply.data
    );

    // A Ruby requester: code 0, a 32-hex sender, its own subscription to the response channel.
    let sender = uuid::Uuid::new_v4().simple().to_string();
    let listener = Builder::from_config(Config::from_url(&url).unwrap())
        .build_subscriber_client()
        .unwrap();
    listener.init().await.unwrap();
    let mut messages = listener.message_rx();
    listener
        .subscribe(format!("gilmour.response.{sender}"))
        .await
        .unwrap();
    let _: fred::types::Value = listener.ping(None).await.unwrap();
    let raw = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    raw.init().await.unwrap();
    let ruby = json!({"data": "from ruby", "code": 0, "sender": sender}).to_string();
    let _: i64 = raw
        .publish(format!("gilmour.request.{zero}"), ruby)
        .await
        .unwrap();
    let message = tokio::time::timeout(DEADLINE, messages.recv())
        .await
        .expect("a reply")
        .unwrap();
    let reply = Envelope::decode(message.value.as_bytes().unwrap_or_default());
    assert_eq!(reply.code, Some(200), "a handler's code 0 is sent as 200");
    assert_eq!(
        reply.data,
        json!({"topic": zero, "sender": sender, "data": "from ruby"})
    );
    let _ = listener.quit().await;
    let _ = raw.quit().await;
    node.shutdown().await;
}
