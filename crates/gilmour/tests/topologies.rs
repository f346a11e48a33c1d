//! Gilmour beyond one Redis server, on the Sentinel set and the cluster that `cargo xtask
//! test` provisions: a node keeps answering across a Sentinel failover (every request in
//! flight gets an answer or a clear error, never a hang; the gap is measured), and on a
//! cluster the subscriber count behind the 404 covers every primary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fred::prelude::*;
use rylm_gilmour::node::Node;
use rylm_gilmour::protocol;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

fn topic(name: &str) -> String {
    format!("{name}.{}", uuid::Uuid::new_v4())
}

/// One inline command to `address` and its reply, as text.
fn ask(address: &str, command: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .expect("writes");
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).expect("an answer");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// The primary's port, as the sentinel at `address` says.
fn primary(address: &str, service: &str) -> String {
    let reply = ask(
        address,
        &format!("SENTINEL get-master-addr-by-name {service}"),
    );
    // `*2 $9 127.0.0.1 $5 <port>`: the last line is the port.
    reply
        .lines()
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_owned()
}

/// How one request of the stream ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Answered(i64),
    Failed(String),
    Hung,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_answering_across_a_sentinel_failover() {
    let test = "a_node_keeps_answering_across_a_sentinel_failover";
    let Some((sentinels, service)) = rylm_testkit::redis_sentinels(test) else {
        return;
    };
    let url = format!(
        "redis-sentinel://{}/0?sentinelServiceName={service}{}",
        sentinels[0],
        sentinels[1..]
            .iter()
            .map(|s| format!("&node={s}"))
            .collect::<String>()
    );
    let server = Node::connect(&url)
        .await
        .expect("connects through the sentinels");
    let client = Node::connect(&url)
        .await
        .expect("connects through the sentinels");
    let echo = topic("echo");
    server
        .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("serves");
    let reply = client
        .request(&echo, json!(0), DEADLINE)
        .await
        .expect("asks");
    assert_eq!(reply.code(), 200);

    let before = primary(&sentinels[0], &service);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let requests = {
        let echo = echo.clone();
        tokio::spawn(async move {
            // When each request was sent, and how it ended.
            let mut outcomes: Vec<(Instant, Outcome)> = Vec::new();
            let mut n = 0u64;
            while !*stopped.borrow() && outcomes.len() < 200_000 {
                n += 1;
                let sent = Instant::now();
                // The request's own deadline is 2 s; past 5 s it would be a hang.
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(&echo, json!(n), Duration::from_secs(2)),
                )
                .await;
                let outcome = match attempt {
                    Ok(Ok(reply)) if reply.code() == 200 && reply.data == json!(n) => {
                        Outcome::Answered(200)
                    }
                    Ok(Ok(reply)) => Outcome::Answered(reply.code()),
                    Ok(Err(error)) => Outcome::Failed(error.to_string()),
                    Err(_) => Outcome::Hung,
                };
                outcomes.push((sent, outcome));
            }
            client.shutdown().await;
            outcomes
        })
    };
    // Failover, as an operator (or a sentinel that found the primary down) would do it.
    let started = Instant::now();
    let answer = ask(&sentinels[0], &format!("SENTINEL FAILOVER {service}"));
    assert!(answer.starts_with("+OK"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while primary(&sentinels[0], &service) == before {
        assert!(
            Instant::now() < deadline,
            "the sentinels promote the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let switched = started.elapsed();
    // Then requests go on for 4 s after the switch; those sent in the last 2 s must all be
    // answered (one sent before may end in a clear error: its reply lost with the old primary).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            Instant::now() < deadline,
            "the node answers again within 30 s"
        );
        if requests.is_finished() || started.elapsed() > switched + Duration::from_secs(4) {
            break;
        }
    }
    let _ = stop.send(true);
    let outcomes = tokio::time::timeout(Duration::from_secs(20), requests)
        .await
        .expect("the requests end")
        .expect("the task ran");
    let hung = outcomes.iter().filter(|(_, o)| *o == Outcome::Hung).count();
    assert_eq!(hung, 0, "no request hangs");
    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(at, _)| *at > started + switched + Duration::from_secs(2))
        .map(|(_, o)| o)
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|o| **o == Outcome::Answered(200)),
        "answered again after the failover: {:?}",
        after
            .iter()
            .filter(|o| ***o != Outcome::Answered(200))
            .take(5)
            .collect::<Vec<_>>()
    );
    // The gap: the longest time between two answered requests.
    let answered: Vec<Instant> = outcomes
        .iter()
        .filter(|(_, o)| *o == Outcome::Answered(200))
        .map(|(at, _)| *at)
        .collect();
    let gap = answered
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .map(|(_, o)| o)
        .filter(|o| **o != Outcome::Answered(200))
        .collect();
    eprintln!(
        "sentinel failover: switched in {switched:?}; {} requests, {} not answered 200 \
         ({:?}); longest gap between answers {gap:?}",
        outcomes.len(),
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn on_a_cluster_the_404_counts_the_subscribers_of_every_primary() {
    let test = "on_a_cluster_the_404_counts_the_subscribers_of_every_primary";
    let Some(nodes) = rylm_testkit::redis_cluster(test) else {
        return;
    };
    let url = format!(
        "redis-cluster://{}{}",
        nodes[0],
        nodes[1..]
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{}node={n}", if i == 0 { "?" } else { "&" }))
            .collect::<String>()
    );
    let server = Node::connect(&url).await.expect("connects to the cluster");
    let client = Node::connect(&url).await.expect("connects to the cluster");
    let echo = topic("echo");
    server
        .reply_to(&echo, "g", DEADLINE, |v| async move { Ok(v) })
        .await
        .expect("serves");
    // Each primary counts only the subscribers connected to it: some say 0.
    let channel = protocol::request_channel(&echo);
    let mut counts = Vec::new();
    for node in &nodes {
        let raw =
            Builder::from_config(Config::from_url(&format!("redis://{node}")).expect("a URL"))
                .build()
                .expect("a client");
        raw.init().await.expect("connects");
        let count: Vec<(String, i64)> = raw.pubsub_numsub(&channel).await.expect("NUMSUB");
        counts.push(count.iter().map(|(_, n)| *n).sum::<i64>());
        let _ = raw.quit().await;
    }
    assert_eq!(counts.iter().sum::<i64>(), 1, "{counts:?}");
    assert!(counts.contains(&0), "{counts:?}");
    // The node adds them up: the request is answered wherever the subscriber is.
    for n in 0..20 {
        let reply = client
            .request(&echo, json!(n), DEADLINE)
            .await
            .expect("asks");
        assert_eq!((reply.code(), reply.data), (200, json!(n)));
    }
    let nobody = client
        .request(&topic("nobody"), json!(1), DEADLINE)
        .await
        .expect("asks");
    assert_eq!(nobody.code(), protocol::NOT_FOUND);
    // Locks and signals work across the cluster too.
    let evt = topic("evt");
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
    server
        .slot(&evt, Some("g"), move |_, data| {
            let heard = heard.clone();
            async move {
                let _ = heard.send(data);
            }
        })
        .await
        .expect("a slot");
    // (PUBLISH counts the receivers of the node that took it only: no count is asserted.)
    client.signal(&evt, json!("x")).await.expect("signals");
    let data = tokio::time::timeout(DEADLINE, hearing.recv())
        .await
        .expect("heard")
        .expect("data");
    assert_eq!(data, json!("x"));
    server.shutdown().await;
    client.shutdown().await;
}
