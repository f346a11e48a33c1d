//! What a node holds stays bounded and owned: a cancelled request frees its entry and its
//! subscription, a burst far past the node's places keeps its tasks and memory bounded and
//! still answers every request exactly once, several handlers of one group take turns, and a
//! dropped node stops. On the Redis that `cargo xtask test` provisions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use rylm_gilmour::node::{Node, NodeOptions};
use rylm_gilmour::protocol::{self, Envelope};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

fn topic(name: &str) -> String {
    format!("{name}.{}", uuid::Uuid::new_v4())
}

async fn raw(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("a URL"))
        .build()
        .expect("a client");
    client.init().await.expect("connects");
    client
}

#[tokio::test]
async fn a_cancelled_request_leaves_no_pending_entry_and_no_subscription() {
    let Some(url) =
        rylm_testkit::redis_url("a_cancelled_request_leaves_no_pending_entry_and_no_subscription")
    else {
        return;
    };
    let server = Node::connect(&url).await.expect("connects");
    let slow = topic("slow");
    server
        .reply_to(&slow, "g", DEADLINE, |v| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(v)
        })
        .await
        .expect("serves");
    let redis = raw(&url).await;
    // Each way of waiting for replies: a subscription per request, or the node's pattern.
    for shared_responses in [false, true] {
        let options = NodeOptions {
            shared_responses,
            ..NodeOptions::default()
        };
        let client = Node::connect_with(&url, options).await.expect("connects");
        let responses = || async {
            let channels: Vec<String> = redis
                .pubsub_channels("gilmour.response.*")
                .await
                .expect("PUBSUB CHANNELS");
            channels
        };
        let request = client.request(&slow, json!(1), DEADLINE);
        // The caller stops waiting while the request is in flight.
        let cancelled = tokio::time::timeout(Duration::from_millis(300), request).await;
        assert!(cancelled.is_err(), "still waiting when cancelled");
        assert_eq!(client.pending(), 0, "no pending entry is left");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = responses().await;
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no response subscription is left (shared: {shared_responses}): {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And the node still works.
        let fast = topic("fast");
        server
            .reply_to(&fast, "g", DEADLINE, |v| async move { Ok(v) })
            .await
            .expect("serves");
        let reply = client
            .request(&fast, json!(2), DEADLINE)
            .await
            .expect("asks");
        assert_eq!((reply.code(), reply.data), (200, json!(2)));
        client.shutdown().await;
    }
    let _ = redis.quit().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_queue_is_answered_busy_with_tasks_and_memory_bounded() {
    let test = "a_burst_past_the_queue_is_answered_busy_with_tasks_and_memory_bounded";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    const BURST: usize = 10_000;
    const MAX_QUEUED: usize = 100;
    let options = NodeOptions {
        concurrency: 2,
        max_queued: MAX_QUEUED,
        ..NodeOptions::default()
    };
    let server = Node::connect_with(&url, options).await.expect("connects");
    let work = topic("work");
    server
        .reply_to(&work, "g", DEADLINE, |v| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(v)
        })
        .await
        .expect("serves");
    // The requests come from a plain client: the burst costs this process nothing but the
    // node under test.
    let publisher = raw(&url).await;
    let subscriber = Builder::from_config(Config::from_url(&url).expect("a URL"))
        .with_performance_config(|p| p.broadcast_channel_capacity = BURST * 2)
        .build_subscriber_client()
        .expect("a subscriber");
    subscriber.init().await.expect("connects");
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    subscriber
        .psubscribe(format!("gilmour.response.{prefix}-*"))
        .await
        .expect("PSUBSCRIBE");
    let _: fred::types::Value = subscriber.ping(None).await.expect("confirmed");
    let mut replies = subscriber.message_rx();

    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss_before = rylm_testkit::rss_kib(std::process::id());
    let most_tasks = Arc::new(AtomicUsize::new(0));
    let sampling = {
        let most = most_tasks.clone();
        tokio::spawn(async move {
            loop {
                let now = tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks();
                most.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let channel = protocol::request_channel(&work);
    for n in 0..BURST {
        let request = Envelope::request(json!(n), format!("{prefix}-{n}"));
        let _: i64 = publisher
            .publish(&channel, request.encode())
            .await
            .expect("PUBLISH");
    }
    let mut codes: HashMap<usize, Vec<i64>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = 0;
    while answered < BURST {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, replies.recv())
            .await
            .unwrap_or_else(|_| panic!("{answered} of {BURST} answered within 120 s"))
            .expect("the subscriber is open");
        let channel = message.channel.to_string();
        let Some(n) = channel
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let reply = Envelope::decode(message.value.as_bytes().unwrap_or_default());
        codes.entry(n).or_default().push(reply.code());
        answered += 1;
    }
    sampling.abort();
    let rss_growth = rylm_testkit::rss_kib(std::process::id()).saturating_sub(rss_before);
    let most = most_tasks.load(Ordering::Relaxed);
    // A task per waiting handler at most (and the refusals in hand), never one per message.
    assert!(
        most <= tasks_before + 2 + MAX_QUEUED + 64 + 16,
        "at most {most} tasks alive, {tasks_before} before the burst"
    );
    assert!(rss_growth < 64 << 10, "RSS grew by {rss_growth} KiB");
    assert_eq!(codes.len(), BURST, "every request is answered");
    let once = codes.values().all(|c| c.len() == 1);
    assert!(once, "each exactly once");
    let ok = codes.values().filter(|c| c[0] == 200).count();
    let busy = codes.values().filter(|c| c[0] == protocol::BUSY).count();
    assert_eq!(ok + busy, BURST, "answered 200 or 503, nothing else");
    assert!(ok >= 2 && busy > 0, "{ok} served, {busy} busy");
    assert_eq!(server.counters().busy.load(Ordering::Relaxed), busy as u64);
    assert_eq!(server.counters().lagged.load(Ordering::Relaxed), 0);
    eprintln!(
        "burst of {BURST}: {ok} served, {busy} busy; at most {most} tasks ({tasks_before} \
         before); RSS grew {rss_growth} KiB"
    );
    let _ = publisher.quit().await;
    let _ = subscriber.quit().await;
    server.shutdown().await;
}

#[tokio::test]
async fn handlers_of_one_group_in_one_node_take_turns_behind_one_lock() {
    let Some(url) =
        rylm_testkit::redis_url("handlers_of_one_group_in_one_node_take_turns_behind_one_lock")
    else {
        return;
    };
    let server = Node::connect(&url).await.expect("connects");
    let client = Node::connect(&url).await.expect("connects");
    let echo = topic("echo");
    let calls = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    for count in &calls {
        let count = count.clone();
        server
            .reply_to(&echo, "g", DEADLINE, move |v| {
                count.fetch_add(1, Ordering::SeqCst);
                async move { Ok(v) }
            })
            .await
            .expect("a second handler in the same group");
    }
    for n in 0..10 {
        let reply = client
            .request(&echo, json!(n), DEADLINE)
            .await
            .expect("asks");
        assert_eq!((reply.code(), reply.data), (200, json!(n)));
    }
    let counts = calls.each_ref().map(|c| c.load(Ordering::SeqCst));
    assert_eq!(counts, [5, 5], "one answer per request, in turns");
    server.shutdown().await;
    client.shutdown().await;
}

#[tokio::test]
async fn a_dropped_node_stops_serving_and_leaves_the_health_registry() {
    let Some(url) =
        rylm_testkit::redis_url("a_dropped_node_stops_serving_and_leaves_the_health_registry")
    else {
        return;
    };
    let client = Node::connect(&url).await.expect("connects");
    let redis = raw(&url).await;
    let echo = topic("echo");
    let ident = {
        let server = Node::connect(&url).await.expect("connects");
        server
            .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
            .await
            .expect("serves");
        let ident = server.enable_health().await.expect("joins");
        assert_eq!(
            client
                .request(&echo, json!(1), DEADLINE)
                .await
                .expect("asks")
                .code(),
            200
        );
        ident
        // Dropped here, without shutdown.
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = client
            .request(&echo, json!(2), Duration::from_millis(200))
            .await
            .expect("asks");
        let registered: Option<String> = redis
            .hget(protocol::HEALTH_HASH, &ident)
            .await
            .expect("HGET");
        if reply.code() == protocol::NOT_FOUND && registered.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped node stops: {} {registered:?}",
            reply.code()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = redis.quit().await;
    client.shutdown().await;
}
