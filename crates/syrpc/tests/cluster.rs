//! A RabbitMQ cluster with quorum queues, alone in its binary: it kills a node of the cluster
//! (which `cargo xtask test` provisions beside the single node; no other test uses it).

mod common;

use std::time::{Duration, Instant};

use common::{end_stream, rabbitmqctl_output, serve_in_background, steady_calls, wrong_answers};
use rylm_syrpc::{Client, Handlers, QueueType, Server, Settings};
use serde_json::{Value, json};

const CALL_DEADLINE: Duration = Duration::from_secs(90);

/// Runs a cluster node's `rabbitmqctl` and returns its standard output, or the reason it
/// failed.
async fn ctl(script: &str, args: &[&str]) -> Result<String, String> {
    rabbitmqctl_output(script, args, Duration::from_secs(60)).await
}

/// The node that leads quorum queue `queue`, as `rabbitmqctl list_queues` names it.
async fn leader_of(script: &str, queue: &str) -> String {
    let listed = ctl(
        script,
        &["list_queues", "name", "leader", "--formatter", "json", "-q"],
    )
    .await
    .expect("lists queues");
    let queues: Vec<Value> = serde_json::from_str(listed.trim()).expect("a JSON list");
    queues
        .iter()
        .find(|q| q["name"] == queue)
        .and_then(|q| q["leader"].as_str())
        .unwrap_or_else(|| panic!("{queue} is not listed with a leader: {listed}"))
        .to_owned()
}

/// The node's name as its own `rabbitmqctl` reports it.
async fn node_name(script: &str) -> String {
    let name = ctl(script, &["eval", "node().", "-q"])
        .await
        .expect("the node answers: if a node is down, restart the servers (cargo xtask servers)");
    name.trim().trim_matches('\'').to_owned()
}

/// A steady stream of calls on an app with quorum queues, over a three-node cluster; the node
/// that leads the request queue (and the result queues, declared through it) is killed with
/// SIGKILL. Every call is answered: no request and no result is lost. The node is not started
/// again: this is the cluster's only test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_of_quorum_queues_loses_nothing() {
    // RUST_LOG=rylm_syrpc=debug shows the failover as it happens.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(nodes) = rylm_testkit::amqp_cluster("killing_the_leader_of_quorum_queues") else {
        return;
    };
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let mut names = Vec::new();
    for (_, script) in &nodes {
        names.push(node_name(script).await);
    }
    let app = format!("cluster{}", std::process::id());
    let settings = |urls: Vec<String>| {
        Settings::new(&app, "")
            .with_urls(urls)
            .with_queue_type(QueueType::Quorum)
            .with_num_queues(4)
            .with_prefetch(8)
            .with_connect_timeouts(Duration::from_secs(5), None)
            .with_timeout(Some(CALL_DEADLINE))
    };
    // Declare the request queue through node 1, and find its leader.
    let all: Vec<String> = nodes.iter().map(|(url, _)| url.clone()).collect();
    let first = Client::connect(settings(all.clone()))
        .await
        .expect("declares");
    first.close().await;
    let queue = format!("{app}_request");
    let leader = leader_of(&nodes[0].1, &queue).await;
    let leader_index = names
        .iter()
        .position(|n| *n == leader)
        .unwrap_or_else(|| panic!("leader {leader} is none of {names:?}"));
    // The server and the client connect to the leader first: its death also moves them.
    let mut ordered = vec![all[leader_index].clone()];
    ordered.extend(
        all.iter()
            .enumerate()
            .filter(|(i, _)| *i != leader_index)
            .map(|(_, u)| u.clone()),
    );
    let server = Server::connect(settings(ordered.clone()))
        .await
        .expect("server");
    let (_stop, _serving) = serve_in_background(
        server,
        Handlers::new().on("echo", |data: Value| async move { Ok::<_, String>(data) }),
    );
    let client = Client::connect(settings(ordered)).await.expect("client");
    assert_eq!(
        client
            .call("echo", &"warm", Some(CALL_DEADLINE))
            .await
            .expect("warm-up"),
        json!("warm")
    );

    let (stop_stream, stream) =
        steady_calls(client.clone(), Duration::from_millis(20), CALL_DEADLINE);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = ctl(&nodes[leader_index].1, &["eval", "os:getpid().", "-q"])
        .await
        .expect("the leader's pid");
    let pid = pid.trim().trim_matches('"').to_owned();
    assert!(pid.parse::<u32>().is_ok(), "a pid: {pid:?}");
    let killed = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(status.success(), "killed {leader} ({pid})");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let answers = end_stream(stop_stream, stream, CALL_DEADLINE).await;
    let failed = wrong_answers(&answers);
    // Recovery: when the first call made after the kill was answered, and the longest call.
    let first_after = answers
        .iter()
        .filter(|(_, answer, started, _)| *started > killed && answer.is_ok())
        .map(|(_, _, _, finished)| finished.duration_since(killed))
        .min()
        .unwrap_or_default();
    let longest = answers
        .iter()
        .map(|(_, _, started, finished)| finished.duration_since(*started))
        .max()
        .unwrap_or_default();
    let new_leader = leader_of(&nodes[(leader_index + 1) % 3].1, &queue).await;
    eprintln!(
        "cluster failover: killed {leader}; {} calls, {} failed; first call made after the kill answered {first_after:?} after it; longest call {longest:?}; new leader {new_leader}; requests published again for want of a confirm: {}",
        answers.len(),
        failed.len(),
        client
            .stats()
            .unconfirmed_retried
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(answers.len() > 300, "the stream ran: {}", answers.len());
    assert!(failed.is_empty(), "calls lost: {failed:?}");
    assert_ne!(new_leader, leader);
}
