//! Broker state that goes away under long-lived peers, requests that cannot be answered, ids
//! used twice, credentials with reserved characters, and many client processes waiting on one
//! result queue. Real RabbitMQ; nothing here stops the broker (see `outage.rs`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{DEADLINE, rabbitmqctl, serve_in_background, settings};
use lapin::options::{BasicPublishOptions, ExchangeDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rylm_syrpc::{Client, Handlers, ResultId, Server, Settings};
use serde_json::{Value, json};

fn echo() -> Handlers {
    Handlers::new()
        .on("echo", |data: Value| async move { Ok::<_, String>(data) })
        .on("slow", |data: Value| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, String>(data)
        })
}

/// The result queue is deleted under a server and a client that both keep their connections
/// (as RabbitMQ does by itself after `x-expires` without consumers): calls made afterwards,
/// and calls waiting while it happens, are all answered.
#[tokio::test]
async fn a_result_queue_deleted_under_long_lived_peers_loses_nothing() {
    let Some(settings) = settings("deleted_queue") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("a_result_queue_deleted_under_long_lived_peers")
    else {
        return;
    };
    // One bucket: every result goes through the queue that is deleted.
    let settings = settings.with_num_queues(1).with_prefetch(32);
    let queue = settings.result_queue(0);
    let server = Server::connect(settings.clone()).await.expect("server");
    let (_stop, _serving) = serve_in_background(server, echo());
    let client = Client::connect(settings.clone()).await.expect("client");
    for n in 0..5 {
        assert_eq!(
            client
                .call("echo", &n, Some(DEADLINE))
                .await
                .expect("before"),
            json!(n)
        );
    }

    rabbitmqctl(&ctl, &["delete_queue", &queue]).await;
    for n in 0..20 {
        assert_eq!(
            client
                .call("echo", &n, Some(DEADLINE))
                .await
                .expect("answered after the deletion"),
            json!(n)
        );
    }

    // Deleted again while 20 callers wait on it.
    let mut waiting = Vec::new();
    for n in 0..20 {
        let client = client.clone();
        waiting.push(tokio::spawn(async move {
            client.call("slow", &n, Some(DEADLINE)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    rabbitmqctl(&ctl, &["delete_queue", &queue]).await;
    for (n, call) in waiting.into_iter().enumerate() {
        let answer = call
            .await
            .expect("task")
            .expect("answered across the deletion");
        assert_eq!(answer, json!(n));
    }
}

/// The result exchange is deleted under a long-lived server: its next result finds it
/// missing, declares the topology again and is delivered.
#[tokio::test]
async fn a_deleted_exchange_is_declared_again() {
    let Some(settings) = settings("deleted_exchange") else {
        return;
    };
    let server = Server::connect(settings.clone()).await.expect("server");
    let (_stop, _serving) = serve_in_background(server, echo());
    let client = Client::connect(settings.clone()).await.expect("client");
    assert_eq!(
        client
            .call("echo", &1, Some(DEADLINE))
            .await
            .expect("first"),
        json!(1)
    );
    let connection = Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_delete(
            settings.result_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("deleted");
    for n in 0..5 {
        assert_eq!(
            client
                .call("echo", &n, Some(DEADLINE))
                .await
                .expect("answered after the exchange went"),
            json!(n)
        );
    }
}

/// Publishes a raw request body on the app's request queue.
async fn publish_raw_request(settings: &Settings, body: &Value) {
    let connection = Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            settings.request_exchange().as_str().into(),
            settings.request_exchange().as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    let _ = connection.close(200, "done".into()).await;
}

/// A result that cannot be published (here: data that cannot be encoded as JSON) answers the
/// caller with an exception and settles the request; two requests sharing one result id are
/// both settled. With one request held at a time, any of these left unsettled would stall
/// the server; it goes on serving.
#[tokio::test]
async fn unpublishable_results_and_shared_ids_do_not_wedge_the_server() {
    let Some(settings) = settings("wedge") else {
        return;
    };
    let settings = settings.with_prefetch(1);
    let server = Server::connect(settings.clone()).await.expect("server");
    let client = Client::connect(settings.clone()).await.expect("client");

    // Not JSON: a map whose keys are not strings.
    let id = client.put_request("echo", &"x").await.expect("put");
    let request = server.get_request(Some(DEADLINE)).await.expect("taken");
    let unencodable: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    let failed = server.put_result(&request.result_id, &unencodable).await;
    assert!(failed.is_err(), "{failed:?}");
    let answer = client.get_result(&id, Some(DEADLINE)).await;
    assert!(
        matches!(&answer, Err(rylm_syrpc::Error::Remote { exception, .. })
            if exception.as_str().is_some_and(|e| e.contains("could not publish"))),
        "{answer:?}"
    );

    // Two requests with one result id, as a buggy or hostile peer may send.
    let shared = ResultId::new();
    for n in 0..2 {
        publish_raw_request(
            &settings,
            &json!({"result_id": shared.as_str(), "type": "echo", "data": n}),
        )
        .await;
    }
    for _ in 0..2 {
        let request = server.get_request(Some(DEADLINE)).await.expect("taken");
        assert_eq!(request.result_id, shared);
        server
            .put_result(&request.result_id, &request.data)
            .await
            .expect("published");
    }

    // Still serving, one request at a time.
    let (_stop, _serving) = serve_in_background(server, echo());
    for n in 0..5 {
        assert_eq!(
            client
                .call("echo", &n, Some(DEADLINE))
                .await
                .expect("served"),
            json!(n)
        );
    }
}

/// A user whose password holds every reserved URI character logs in through the peers'
/// settings fields.
#[tokio::test]
async fn a_password_with_reserved_characters_logs_in() {
    let Some(base) = settings("password") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("a_password_with_reserved_characters_logs_in") else {
        return;
    };
    let user = format!("u{}", std::process::id());
    let password = "p%a/s?s#w@r:d &+=";
    rabbitmqctl(&ctl, &["add_user", &user, password]).await;
    rabbitmqctl(
        &ctl,
        &["set_permissions", "-p", "/", &user, ".*", ".*", ".*"],
    )
    .await;
    let host = base
        .url
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(host, _)| host.to_owned())
        .expect("host:port in the provisioned URL");
    let settings = Settings::from_parts(&base.app_name, &host, "/", &user, password);
    assert!(!format!("{settings:?}").contains("s#w"), "{settings:?}");
    let server = Server::connect(settings.clone()).await;
    let client = Client::connect(settings).await;
    let answer = match (server, client) {
        (Ok(server), Ok(client)) => {
            let (_stop, _serving) = serve_in_background(server, echo());
            client.call("echo", &"ok", Some(DEADLINE)).await
        }
        (server, client) => Err(server.err().or(client.err()).expect("one failed")),
    };
    rabbitmqctl(&ctl, &["delete_user", &user]).await;
    assert_eq!(answer.expect("logged in and answered"), json!("ok"));
}

/// The variables that make this test binary a load-generating child (see below).
const CHILD_APP: &str = "RYLM_SYRPC_CHILD_APP";
const CHILD_CALLS: usize = 50;
const CHILDREN: usize = 8;

/// Eight client processes, fifty calls in flight each, every result id in one bucket (one
/// result queue): every call is answered, and the p99 of the calls' latency is reported.
#[tokio::test]
async fn eight_processes_waiting_on_one_bucket_all_get_their_results() {
    let Some(settings) = settings("shared_bucket") else {
        return;
    };
    let settings = settings.with_num_queues(1).with_prefetch(64);
    let server = Server::connect(settings.clone()).await.expect("server");
    let (_stop, _serving) = serve_in_background(server, echo());
    let exe = std::env::current_exe().expect("this test binary");
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..CHILDREN {
        let child = tokio::process::Command::new(&exe)
            .args([
                "--exact",
                "shared_bucket_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_APP, &settings.app_name)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawns");
        children.push(child);
    }
    let mut latencies = Vec::new();
    for child in children {
        let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("the child finishes")
            .expect("the child runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|line| line.split_once("LATENCIES_MS ").map(|(_, list)| list))
            .unwrap_or_else(|| panic!("a child's report: {stdout}"));
        let child: Vec<f64> = serde_json::from_str(line).expect("a list of latencies");
        assert_eq!(child.len(), CHILD_CALLS, "a child lost calls: {stdout}");
        latencies.extend(child);
    }
    latencies.sort_by(f64::total_cmp);
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "shared bucket: {} calls from {CHILDREN} processes in {:?}; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        started.elapsed(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

/// Not a test of its own: the child process of
/// `eight_processes_waiting_on_one_bucket_all_get_their_results`, which sets `CHILD_APP`.
/// Run directly, without that variable, it returns at once.
#[tokio::test]
async fn shared_bucket_child() {
    let Ok(app) = std::env::var(CHILD_APP) else {
        return;
    };
    let Some(settings) = settings("shared_bucket_child") else {
        return;
    };
    let settings = Settings {
        app_name: app,
        ..settings.with_num_queues(1)
    };
    let client = Client::connect(settings).await.expect("client");
    let mut calls = Vec::new();
    for n in 0..CHILD_CALLS {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = client
                .call("echo", &n, Some(Duration::from_secs(60)))
                .await
                .expect("answered");
            assert_eq!(answer, json!(n));
            started.elapsed().as_secs_f64() * 1000.0
        }));
    }
    let mut latencies = Vec::new();
    for call in calls {
        latencies.push(call.await.expect("call task"));
    }
    println!(
        "LATENCIES_MS {}",
        serde_json::to_string(&latencies).expect("json")
    );
}

/// A handler that runs past the server's `handler_timeout` is stopped: its caller gets an
/// exception saying so at once, and the server goes on serving.
#[tokio::test]
async fn a_hung_handler_is_answered_at_its_limit() {
    let Some(settings) = settings("hung") else {
        return;
    };
    let limit = Duration::from_millis(500);
    let server = Server::connect(settings.clone().with_limits(limit, Duration::from_secs(30)))
        .await
        .expect("server");
    let handlers = echo().on("hang", |_: Value| async move {
        std::future::pending::<()>().await;
        Ok::<_, String>(Value::Null)
    });
    let (_stop, _serving) = serve_in_background(server, handlers);
    let client = Client::connect(settings).await.expect("client");
    let started = Instant::now();
    let answer = client.call("hang", &1, Some(DEADLINE)).await;
    assert!(
        matches!(&answer, Err(rylm_syrpc::Error::Remote { exception, .. })
            if exception.as_str().is_some_and(|e| e.contains("ran past its limit"))),
        "{answer:?}"
    );
    assert!(
        started.elapsed() < DEADLINE,
        "answered at the limit, not the deadline"
    );
    assert_eq!(
        client
            .call("echo", &2, Some(DEADLINE))
            .await
            .expect("still serving"),
        json!(2)
    );
}
