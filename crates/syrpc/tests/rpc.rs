//! SyRPC clients and servers against a real RabbitMQ: calls, errors, the stateless pattern, and
//! each defect of the published implementations shown to be gone.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, ids_in_one_bucket, serve_in_background, settings};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rylm_syrpc::{AckMode, Client, Error, Handlers, Server, Settings};
use serde_json::{Value, json};

fn demo_handlers() -> Handlers {
    Handlers::new()
        .on("echo", |data| async move { Ok::<_, String>(data) })
        .on("fail", |data| async move {
            Err::<Value, _>(format!("refused {data}"))
        })
        .on("panic", |_| async move {
            if true {
                panic!("deliberately");
            }
            Ok::<Value, String>(Value::Null)
        })
}

/// How many consumers a queue has, by a passive declare.
async fn consumer_count(settings: &Settings, queue: &str) -> u32 {
    let connection = Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let count = declared.consumer_count();
    let _ = connection.close(200, "done".into()).await;
    count
}

#[tokio::test]
async fn calls_errors_and_panics_come_back_and_the_server_keeps_serving() {
    let Some(settings) = settings("calls") else {
        return;
    };
    let server = Server::connect(settings.clone().with_prefetch(4))
        .await
        .expect("server");
    let (_stop, _serving) = serve_in_background(server, demo_handlers());
    let client = Client::connect(settings).await.expect("client");

    let data = json!({"text": "grüße, 世界 ✓", "n": [1, 2.5, null]});
    assert_eq!(
        client
            .call("echo", &data, Some(DEADLINE))
            .await
            .expect("echo"),
        data
    );
    assert_eq!(
        client
            .call("  echo  ", &"trimmed type", Some(DEADLINE))
            .await
            .expect("echo"),
        json!("trimmed type")
    );

    match client.call("fail", &json!(7), Some(DEADLINE)).await {
        Err(Error::Remote { exception, .. }) => assert_eq!(exception, json!("refused 7")),
        other => panic!("expected a remote error, got {other:?}"),
    }
    match client.call("panic", &json!(null), Some(DEADLINE)).await {
        Err(Error::Remote { exception, .. }) => {
            assert!(
                exception.to_string().contains("panicked: deliberately"),
                "{exception}"
            )
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match client.call("nope", &json!(null), Some(DEADLINE)).await {
        Err(Error::Remote { exception, .. }) => {
            let text = exception.to_string();
            assert!(
                text.contains("unknown request type \\\"nope\\\"") && text.contains("echo"),
                "{text}"
            )
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    // Still serving after the panic.
    assert_eq!(
        client.call("echo", &1, Some(DEADLINE)).await.expect("echo"),
        json!(1)
    );
}

#[tokio::test]
async fn many_calls_in_flight_all_come_back() {
    let Some(settings) = settings("in_flight") else {
        return;
    };
    let server = Server::connect(settings.clone().with_prefetch(16))
        .await
        .expect("server");
    let (_stop, _serving) = serve_in_background(server, demo_handlers());
    let client = Client::connect(settings).await.expect("client");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call("echo", &i, Some(DEADLINE)).await) });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.expect("task");
        assert_eq!(result.expect("answered"), json!(i));
        answered += 1;
    }
    assert_eq!(answered, 200);
}

/// The seed's pattern: one backend puts the request, another one fetches the result.
#[tokio::test]
async fn a_result_is_fetched_by_id_from_another_client() {
    let Some(settings) = settings("stateless") else {
        return;
    };
    let server = Server::connect(settings.clone()).await.expect("server");
    let (_stop, _serving) = serve_in_background(server, demo_handlers());
    let backend0 = Client::connect(settings.clone()).await.expect("backend 0");
    let id = backend0
        .put_request("echo", &json!({"value": "hello"}))
        .await
        .expect("put");
    backend0.close().await;
    // Let the result land in its queue before anyone waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backend1 = Client::connect(settings).await.expect("backend 1");
    let result = backend1
        .get_result(&id, Some(DEADLINE))
        .await
        .expect("fetched by id");
    assert_eq!(result, json!({"value": "hello"}));
}

/// The timeout is a deadline: results for other ids arriving all the time do not extend it.
#[tokio::test]
async fn the_timeout_is_a_deadline_not_an_idle_timer() {
    let Some(settings) = settings("deadline") else {
        return;
    };
    let (missing, other) = ids_in_one_bucket(&settings);
    let server = Server::connect(settings.clone()).await.expect("server");
    let client = Client::connect(settings).await.expect("client");
    let noise = tokio::spawn(async move {
        for i in 0..40 {
            let _ = server
                .put_result(&format!("{other}-{i}").as_str().into(), &i)
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    let outcome = client
        .get_result(&missing, Some(Duration::from_millis(800)))
        .await;
    let waited = started.elapsed();
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    // Generous: the point is that it ends near its deadline, not seconds later.
    assert!(
        waited < Duration::from_secs(3),
        "a 0.8 s deadline took {waited:?}"
    );
    noise.abort();
}

/// A result for another id on the same queue is neither lost nor bounced in a requeue loop,
/// and a client leaves no consumer behind.
#[tokio::test]
async fn results_for_others_are_kept_handed_back_once_and_no_consumer_is_left() {
    let Some(settings) = settings("foreign") else {
        return;
    };
    let settings = settings.with_hold_foreign_for(Duration::from_millis(500));
    let (waited_for, foreign) = ids_in_one_bucket(&settings);
    let bucket = settings.bucket(waited_for.as_str());
    let server = Server::connect(settings.clone()).await.expect("server");
    server
        .put_result(&foreign, &json!("for someone else"))
        .await
        .expect("published");

    let client = Client::connect(settings.clone()).await.expect("client");
    let outcome = client
        .get_result(&waited_for, Some(Duration::from_secs(2)))
        .await;
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    // No consumer is left behind: the reader closes its channel shortly after the last waiter
    // gives up (polled with a deadline, not slept for).
    let queue = settings.result_queue(bucket);
    let gone_by = Instant::now() + Duration::from_secs(5);
    while consumer_count(&settings, &queue).await > 0 {
        assert!(
            Instant::now() < gone_by,
            "a consumer was left behind on {queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nobody waits for it in any rylm client, so forwarding it found no binding.
    assert_eq!(
        client
            .stats()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Published clients requeue such a result thousands of times a second; this one hands it
    // back once per hold period (0.5 s) and once more when it stops waiting.
    let handed_back = client
        .stats()
        .handed_back
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=6).contains(&handed_back),
        "handed back {handed_back} times in 2 s"
    );

    // The result it saw is still there for its owner, in another client.
    let owner = Client::connect(settings).await.expect("owner");
    let got = owner
        .get_result(&foreign, Some(DEADLINE))
        .await
        .expect("not lost");
    assert_eq!(got, json!("for someone else"));
}

/// A result that arrives for one caller while another caller of the same client waits on the
/// same queue reaches both, in whichever order they come.
#[tokio::test]
async fn two_waiters_on_one_queue_each_get_their_result() {
    let Some(settings) = settings("two_waiters") else {
        return;
    };
    let (first, second) = ids_in_one_bucket(&settings);
    let server = Server::connect(settings.clone()).await.expect("server");
    let client = Client::connect(settings).await.expect("client");
    let waiting = {
        let client = client.clone();
        let first = first.clone();
        tokio::spawn(async move { client.get_result(&first, Some(DEADLINE)).await })
    };
    server
        .put_result(&second, &"second")
        .await
        .expect("published");
    server
        .put_result(&first, &"first")
        .await
        .expect("published");
    assert_eq!(waiting.await.expect("task").expect("first"), json!("first"));
    // `second` arrived before anyone asked: it was held, and is handed over at once.
    assert_eq!(
        client
            .get_result(&second, Some(DEADLINE))
            .await
            .expect("second"),
        json!("second")
    );
}

/// The ack comes after the result: a server that dies holding a request leaves it to another.
#[tokio::test]
async fn a_request_taken_by_a_dead_server_is_answered_by_another() {
    let Some(settings) = settings("ack_after") else {
        return;
    };
    let client = Client::connect(settings.clone()).await.expect("client");
    let id = client.put_request("echo", &"survives").await.expect("put");

    let doomed = Server::connect(settings.clone()).await.expect("server 1");
    let taken = doomed
        .get_request(Some(DEADLINE))
        .await
        .expect("server 1 takes it");
    assert_eq!(taken.result_id, id);
    doomed.close().await; // dies before answering

    let rescuer = Server::connect(settings).await.expect("server 2");
    let again = rescuer
        .get_request(Some(DEADLINE))
        .await
        .expect("redelivered");
    assert_eq!(again.result_id, id);
    rescuer
        .put_result(&again.result_id, &again.data)
        .await
        .expect("answered");
    assert_eq!(
        client
            .get_result(&id, Some(DEADLINE))
            .await
            .expect("result"),
        json!("survives")
    );
}

/// The published implementations' way, as an option: acked on receipt, lost with the server.
#[tokio::test]
async fn ack_on_receipt_loses_the_request_with_its_server() {
    let Some(settings) = settings("ack_on_receipt") else {
        return;
    };
    let settings = settings.with_ack_mode(AckMode::OnReceipt);
    let client = Client::connect(settings.clone()).await.expect("client");
    client.put_request("echo", &"lost").await.expect("put");
    let doomed = Server::connect(settings.clone()).await.expect("server 1");
    doomed.get_request(Some(DEADLINE)).await.expect("taken");
    doomed.close().await;
    let other = Server::connect(settings).await.expect("server 2");
    let outcome = other.get_request(Some(Duration::from_secs(1))).await;
    assert!(matches!(outcome, Err(Error::NoRequest(_))), "{outcome:?}");
}

/// Bounded prefetch: a busy server does not hoard the queue; an idle one takes the rest.
#[tokio::test]
async fn a_busy_server_does_not_hoard_requests() {
    let Some(settings) = settings("prefetch") else {
        return;
    };
    let client = Client::connect(settings.clone()).await.expect("client");
    let busy = Server::connect(settings.clone())
        .await
        .expect("busy server");
    let first = client.put_request("echo", &0).await.expect("put");
    let held = busy
        .get_request(Some(DEADLINE))
        .await
        .expect("busy takes one");
    assert_eq!(held.result_id, first);
    let mut rest = Vec::new();
    for i in 1..=5 {
        rest.push(client.put_request("echo", &i).await.expect("put"));
    }
    let idle = Server::connect(settings).await.expect("idle server");
    for _ in 1..=5 {
        let request = idle
            .get_request(Some(DEADLINE))
            .await
            .expect("the idle server gets the rest");
        assert!(rest.contains(&request.result_id));
        idle.put_result(&request.result_id, &request.data)
            .await
            .expect("answered");
    }
    for id in &rest {
        client
            .get_result(id, Some(DEADLINE))
            .await
            .expect("answered by the idle server");
    }
}

/// Garbage on the request queue is rejected to the log; the server goes on.
#[tokio::test]
async fn a_malformed_request_is_rejected_and_the_server_goes_on() {
    let Some(settings) = settings("malformed") else {
        return;
    };
    let server = Server::connect(settings.clone()).await.expect("server");
    let connection = Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    for garbage in [&b"not json"[..], br#"{"type": "echo"}"#, b"\xff\xfe"] {
        channel
            .basic_publish(
                settings.request_exchange().as_str().into(),
                settings.request_exchange().as_str().into(),
                BasicPublishOptions::default(),
                garbage,
                BasicProperties::default(),
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
    }
    let client = Client::connect(settings).await.expect("client");
    let id = client
        .put_request("echo", &"after the garbage")
        .await
        .expect("put");
    let request = server
        .get_request(Some(DEADLINE))
        .await
        .expect("a good request");
    assert_eq!(request.result_id, id);
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn connection_failures_are_typed_and_fast() {
    let Some(good) = settings("connect_errors") else {
        return;
    };
    let unreachable = Settings::new("app", "amqp://guest:guest@127.0.0.1:1/%2F")
        .with_connect_timeouts(Duration::from_secs(1), Some(Duration::from_secs(1)));
    let started = Instant::now();
    match Client::connect(unreachable).await {
        Err(Error::Unreachable { url, .. }) => {
            assert!(url.contains(":***@"), "the password is redacted: {url}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    let wrong = Settings {
        url: good.url.replacen("guest:guest@", "guest:wrong@", 1),
        ..good.clone()
    };
    match Server::connect(wrong).await {
        Err(Error::AccessRefused { .. }) => {}
        other => panic!("expected AccessRefused, got {other:?}"),
    }
    let invalid = Settings {
        num_queues: 0,
        ..good
    };
    assert!(matches!(
        Client::connect(invalid).await,
        Err(Error::InvalidSettings(_))
    ));
}
