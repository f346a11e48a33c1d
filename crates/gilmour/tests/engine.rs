//! A Gilmour node on the Redis that `cargo xtask test` provisions: requests and replies,
//! exclusion groups, 404 when nobody listens, handler timeouts and failures, bad input.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rylm_gilmour::Error;
use rylm_gilmour::node::Node;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);

async fn node(test: &str) -> Option<Node> {
    let url = rylm_testkit::redis_url(test)?;
    Some(Node::connect(&url).await.expect("connects"))
}

/// The recorded trace of a gilmour-e-go v5 node.
const GO_TRACE: &str = include_str!("fixtures/gilmour-go-monitor.log");

/// A topic of this test run alone (tests share one Redis).
fn topic(name: &str) -> String {
    format!("{name}.{}", uuid::Uuid::new_v4())
}

/// A plain fred client on the test Redis, to act outside the protocol.
async fn raw_client(test: &str) -> fred::prelude::Client {
    use fred::prelude::ClientLike;
    let url = rylm_testkit::redis_url(test).expect("Redis");
    let raw =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).expect("a URL"))
            .build()
            .expect("a client");
    raw.init().await.expect("connects");
    raw
}

#[tokio::test]
async fn a_request_gets_its_reply_and_failures_get_their_codes() {
    let Some(server) = node("a_request_gets_its_reply_and_failures_get_their_codes").await else {
        return;
    };
    let client = node("a_request_gets_its_reply")
        .await
        .expect("a second node");
    let (echo, slow, failing) = (topic("echo"), topic("slow"), topic("failing"));
    server
        .reply_to(&echo, "echoers", DEADLINE, |data: Value| async move {
            Ok(json!(format!("echo:{}", data.as_str().unwrap_or_default())))
        })
        .await
        .expect("serves");
    server
        .reply_to(&slow, "_default", Duration::from_millis(200), |_| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(Value::Null)
        })
        .await
        .expect("serves");
    server
        .reply_to(&failing, "_default", DEADLINE, |_| async {
            Err("failed on purpose".to_owned())
        })
        .await
        .expect("serves");

    let reply = client
        .request(&echo, json!("hi"), DEADLINE)
        .await
        .expect("replied");
    assert_eq!((reply.data, reply.code), (json!("echo:hi"), Some(200)));
    let reply = client
        .request(&slow, json!("x"), DEADLINE)
        .await
        .expect("replied");
    assert_eq!(
        (reply.data, reply.code),
        (json!("Execution timed out"), Some(499)),
        "the handler's timeout"
    );
    let reply = client
        .request(&failing, json!("x"), DEADLINE)
        .await
        .expect("replied");
    assert_eq!(
        (reply.data, reply.code),
        (json!("failed on purpose"), Some(500))
    );
    let reply = client
        .request(&topic("nobody"), json!("x"), DEADLINE)
        .await
        .expect("answered");
    assert_eq!(reply.code, Some(404), "nobody listens");
    // The requester's own deadline: 499 without waiting out the handler.
    let reply = client
        .request(&slow, json!("x"), Duration::from_millis(50))
        .await
        .expect("answered");
    assert_eq!(reply.code, Some(499));

    assert!(matches!(
        server
            .reply_to("evt.*", "g", DEADLINE, |_| async { Ok(Value::Null) })
            .await,
        Err(Error::WildcardService(_))
    ));
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn one_node_of_a_group_answers_each_request() {
    let Some(first) = node("one_node_of_a_group_answers_each_request").await else {
        return;
    };
    let second = node("one_node_of_a_group").await.expect("a second node");
    let client = node("one_node_of_a_group").await.expect("a third node");
    let work = topic("work");
    let runs = Arc::new(AtomicUsize::new(0));
    for server in [&first, &second] {
        let runs = runs.clone();
        server
            .reply_to(&work, "workers", DEADLINE, move |data| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(data)
                }
            })
            .await
            .expect("serves");
    }
    for i in 0..20 {
        let reply = client
            .request(&work, json!(i), DEADLINE)
            .await
            .expect("replied");
        assert_eq!((reply.data, reply.code), (json!(i), Some(200)));
    }
    // Both nodes hear every request; the lock lets one run it. A loser could still be on its
    // way to the lock: give it time to lose.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 20);
    for node in [client, first, second] {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn garbage_on_a_request_channel_does_not_stop_a_node() {
    let Some(server) = node("garbage_on_a_request_channel_does_not_stop_a_node").await else {
        return;
    };
    let client = node("garbage").await.expect("a second node");
    let echo = topic("echo");
    server
        .reply_to(&echo, "_default", DEADLINE, |data| async move { Ok(data) })
        .await
        .expect("serves");
    use fred::prelude::{ClientLike, PubsubInterface};
    let raw = raw_client("garbage").await;
    for garbage in ["not json", "{\"data\":1}", "[1,2", "\u{0}\u{1}"] {
        let _: i64 = raw
            .publish(format!("gilmour.request.{echo}"), garbage)
            .await
            .expect("published");
    }
    let reply = client
        .request(&echo, json!({"still": "here"}), DEADLINE)
        .await
        .expect("replied");
    assert_eq!(reply.data, json!({"still": "here"}));
    let _ = raw.quit().await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn slots_hear_signals_by_topic_and_pattern_and_a_group_runs_each_once() {
    let Some(a) = node("slots_hear_signals_by_topic_and_pattern_and_a_group_runs_each_once").await
    else {
        return;
    };
    let b = node("slots").await.expect("a second node");
    let c = node("slots").await.expect("a third node");
    let base = topic("evt");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Value)>();
    let record = |who: &'static str| {
        let tx = tx.clone();
        move |topic: String, data: Value| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((who.to_owned(), topic, data));
            }
        }
    };
    a.slot(&format!("{base}.*"), None, record("a-pattern"))
        .await
        .expect("listens");
    a.slot(&format!("{base}.created"), None, record("a-exact"))
        .await
        .expect("listens");
    b.slot(&format!("{base}.*"), Some("g1"), record("group"))
        .await
        .expect("listens");
    c.slot(&format!("{base}.*"), Some("g1"), record("group"))
        .await
        .expect("listens");
    drop(tx);

    let heard = a
        .signal(&format!("{base}.created"), json!({"id": 1}))
        .await
        .expect("published");
    assert_eq!(heard, 4, "two subscriptions of a, and b's and c's");
    let mut got = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        got.push(event);
    }
    got.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    let topic = format!("{base}.created");
    assert_eq!(
        got,
        vec![
            ("a-exact".to_owned(), topic.clone(), json!({"id": 1})),
            ("a-pattern".to_owned(), topic.clone(), json!({"id": 1})),
            ("group".to_owned(), topic.clone(), json!({"id": 1})),
        ],
        "every ungrouped slot once, the group once, the concrete topic reported"
    );
    assert_eq!(
        a.signal(&topic_of_nobody(), json!(1))
            .await
            .expect("published"),
        0,
        "no slot heard it"
    );
    assert!(matches!(
        a.signal("evt.*", json!(1)).await,
        Err(Error::WildcardService(_))
    ));
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

fn topic_of_nobody() -> String {
    topic("nobody")
}

#[tokio::test]
async fn a_node_joins_the_health_registry_answers_pings_and_leaves() {
    use fred::prelude::{ClientLike, HashesInterface};

    let Some(server) = node("a_node_joins_the_health_registry_answers_pings_and_leaves").await
    else {
        return;
    };
    let monitor = node("health").await.expect("a second node");
    // The node of the recorded Go trace: `echo` and `slow` served, the slot `evt.*`.
    let echo = "echo";
    for served in ["echo", "slow"] {
        server
            .reply_to(served, "_default", DEADLINE, |data| async move { Ok(data) })
            .await
            .expect("serves");
    }
    server
        .slot("evt.*", Some("g1"), |_, _| async {})
        .await
        .expect("listens");
    let ident = server.enable_health().await.expect("joins");
    assert!(
        ident.contains("-pid-") && ident.contains("-uuid-"),
        "{ident}"
    );

    let raw = raw_client("health").await;
    let registered: Option<String> = raw
        .hget(rylm_gilmour::protocol::HEALTH_HASH, &ident)
        .await
        .expect("HGET");
    assert_eq!(registered.as_deref(), Some("true"));

    // A monitor pings the raw health channel, as health-bulletin does.
    let pong = monitor
        .request(
            &rylm_gilmour::protocol::health_channel(&ident),
            Value::Null,
            DEADLINE,
        )
        .await
        .expect("answered");
    // As the Go engine answers: the full names of the channels it subscribed to for requests
    // and slots (those of the trace's subscriber connection, less health and responses).
    let mut subscribed: Vec<String> = GO_TRACE
        .lines()
        .filter(|line| line.contains("\"SUBSCRIBE\"") || line.contains("\"PSUBSCRIBE\""))
        .filter_map(|line| line.rsplit('"').nth(1).map(str::to_owned))
        .filter(|channel| {
            channel.starts_with("gilmour.request.") || channel.starts_with("gilmour.slot.")
        })
        .collect();
    subscribed.sort();
    assert_eq!(
        subscribed,
        [
            "gilmour.request.echo",
            "gilmour.request.slow",
            "gilmour.slot.evt.*"
        ]
    );
    assert_eq!((pong.data, pong.code), (json!(subscribed), Some(200)));
    assert_eq!(server.channels(), subscribed);
    assert_eq!(server.topics(), [echo, "slow"]);

    server.shutdown().await;
    let registered: Option<String> = raw
        .hget(rylm_gilmour::protocol::HEALTH_HASH, &ident)
        .await
        .expect("HGET");
    assert_eq!(registered, None, "left the registry on shutdown");
    let _ = raw.quit().await;
    monitor.shutdown().await;
}
