//! A Server and its Clients over loopback tcp.

use std::time::Duration;

use bytes::Bytes;
use rylm_components::rylm_transport::{Kind, Options, Socket};
use rylm_components::{Client, Error, Functions, Server};

const DEADLINE: Duration = Duration::from_secs(10);

fn functions() -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
        })
        .add("reverse", |p: Bytes| async move {
            let mut v = p.to_vec();
            v.reverse();
            Ok::<_, String>(Bytes::from(v))
        })
        .add("sleep", |p: Bytes| async move {
            let millis: u64 = String::from_utf8_lossy(&p).parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok::<_, String>(p)
        })
        .add("fail", |_p: Bytes| async move {
            Err::<Bytes, _>("failed on purpose")
        })
        .add("panic", |_p: Bytes| async move {
            if true {
                panic!("on purpose");
            }
            Ok::<Bytes, String>(Bytes::new())
        })
        .add_blocking("len", |p: Bytes| {
            Ok::<_, String>(Bytes::from(p.len().to_string()))
        })
}

async fn start() -> (Server, Client) {
    start_with("text", functions()).await
}

async fn start_with(name: &str, functions: Functions) -> (Server, Client) {
    let server = Server::builder(name)
        .functions(functions)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    (server, client)
}

#[tokio::test]
async fn eval_errors_and_panics_come_back_and_the_server_keeps_serving() {
    let (server, client) = start().await;
    assert_eq!(client.server(), "text");
    assert_eq!(
        &client.eval("upper", "grüße").await.expect("answered")[..],
        "GRüßE".as_bytes()
    );
    assert_eq!(
        &client.eval("len", "four").await.expect("answered")[..],
        b"4"
    );
    for (function, kind) in [
        ("nope", "unknown-function"),
        ("fail", "failed"),
        ("panic", "panicked"),
    ] {
        match client.eval(function, "x").await {
            Err(Error::Remote {
                kind: got, message, ..
            }) => {
                assert_eq!(got, kind, "{function}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{function}: expected a remote error, got {other:?}"),
        }
    }
    assert_eq!(
        &client.eval("reverse", "abc").await.expect("still serving")[..],
        b"cba"
    );
    server.shutdown().await.expect("clean");
}

/// With many calls in flight, calls leave for the server in bursts (see
/// `rylm_transport::Outbox`): callers that give up as soon as their request is queued leave
/// none of them behind, and the calls after them go through.
#[tokio::test]
async fn requests_of_callers_that_give_up_at_once_still_leave() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HELD: usize = rylm_components::rylm_transport::outbox::GATHER_FROM + 8;
    const GIVEN_UP: usize = 200;
    let (seen, holding) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (counted, entered, held) = (seen.clone(), holding.clone(), gate.clone());
    let (server, client) = start_with(
        "counting",
        Functions::new()
            .add("count", move |p: Bytes| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, String>(p) }
            })
            .add("hold", move |p: Bytes| {
                let held = held.clone();
                entered.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = held.acquire().await;
                    Ok::<_, String>(p)
                }
            }),
    )
    .await;
    // Enough calls in flight for requests to be gathered into bursts.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..HELD {
        let client = client.clone();
        calls.spawn(async move { client.eval("hold", "x").await });
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    while holding.load(Ordering::SeqCst) < HELD {
        assert!(std::time::Instant::now() < deadline, "calls held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..GIVEN_UP {
        let call = client.eval("count", "x");
        assert!(
            futures_lite::future::poll_once(std::pin::pin!(call))
                .await
                .is_none(),
            "a call cannot be answered before it waits"
        );
    }
    while seen.load(Ordering::SeqCst) < GIVEN_UP {
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw {} of {GIVEN_UP} requests",
            seen.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(HELD);
    while let Some(held) = calls.join_next().await {
        held.expect("task").expect("a held call is answered");
    }
    assert_eq!(
        &client.eval("count", "after").await.expect("answered")[..],
        b"after"
    );
    assert_eq!(seen.load(Ordering::SeqCst), GIVEN_UP + 1);
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_list_of_stages_runs_as_a_pipeline_of_functions() {
    let (server, client) = start().await;
    let result = client
        .eval_stages(&["upper", "reverse", "len"], "abc")
        .await
        .expect("answered");
    assert_eq!(&result[..], b"3");
    let result = client
        .eval_stages(&["upper", "reverse"], "abc")
        .await
        .expect("answered");
    assert_eq!(&result[..], b"CBA");
    match client
        .eval_stages(&["upper", "fail", "reverse"], "abc")
        .await
    {
        Err(Error::Remote { kind, .. }) => assert_eq!(kind, "failed"),
        other => panic!("{other:?}"),
    }
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_job_streams_every_result_with_a_bounded_number_in_flight() {
    let (server, client) = start().await;
    let payloads: Vec<Bytes> = (0..200).map(|i| Bytes::from(format!("item-{i}"))).collect();
    let mut results = client.job("upper", payloads, 16);
    let mut seen = [false; 200];
    while let Some((index, result)) = tokio::time::timeout(DEADLINE, results.recv())
        .await
        .expect("in time")
    {
        assert_eq!(
            result.expect("answered"),
            Bytes::from(format!("ITEM-{index}"))
        );
        seen[index] = true;
    }
    assert!(seen.iter().all(|s| *s), "every result of the job arrived");
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn many_clients_each_get_only_their_own_results() {
    let server = Server::builder("text")
        .functions(functions())
        .start()
        .await
        .expect("starts");
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..4 {
        let address = server.db_address().to_owned();
        tasks.spawn(async move {
            let client = Client::connect(&address, DEADLINE).await.expect("connects");
            for i in 0..25 {
                let payload = format!("c{c}-{i}");
                let result = client
                    .eval("reverse", payload.clone())
                    .await
                    .expect("answered");
                assert_eq!(
                    result,
                    Bytes::from(payload.chars().rev().collect::<String>())
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn the_cache_sets_gets_deletes_and_answers_missing_keys() {
    let (server, client) = start().await;
    let key = client.set(None, "value").await.expect("set");
    assert!(!key.is_empty());
    assert_eq!(
        client.get(&key).await.expect("get"),
        Some(Bytes::from("value"))
    );
    client.set(Some("fixed"), "v2").await.expect("set");
    assert_eq!(
        client.get("fixed").await.expect("get"),
        Some(Bytes::from("v2"))
    );
    assert_eq!(
        client.delete("fixed").await.expect("delete"),
        Some(Bytes::from("v2"))
    );
    assert_eq!(client.get("fixed").await.expect("get"), None);
    assert_eq!(client.delete("never-there").await.expect("delete"), None);
    assert_eq!(
        client.get("name").await.expect("preset"),
        Some(Bytes::from("text"))
    );
    assert_eq!(
        client.get("client_address").await.expect("preset"),
        Some(Bytes::from(server.client_address().to_owned()))
    );
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_and_malformed_frames_are_dropped() {
    let (server, client) = start().await;
    let outcome = client
        .eval_within("sleep", "1000", Duration::from_millis(200))
        .await;
    // The client gives up at its deadline, and the server stops the function at the same
    // deadline (carried by the call): whichever is first, the call fails then.
    let at_deadline = match &outcome {
        Err(Error::Timeout { .. }) => true,
        Err(Error::Remote { kind, .. }) => kind == "deadline",
        _ => false,
    };
    assert!(at_deadline, "{outcome:?}");

    let raw = Socket::new(Kind::Push, &Options::default()).expect("socket");
    raw.connect(server.client_address())
        .await
        .expect("connects");
    for garbage in [&b"not a frame"[..], b"RYLM\x01", b"\x00\x01\x02"] {
        raw.send(vec![Bytes::from_static(garbage)])
            .await
            .expect("sends");
    }
    assert_eq!(
        &client.eval("upper", "after").await.expect("still serving")[..],
        b"AFTER"
    );
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_client_refuses_an_address_where_no_server_answers() {
    let started = std::time::Instant::now();
    let outcome = Client::connect("tcp://127.0.0.1:1", Duration::from_millis(500)).await;
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline holds: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_publishes_the_results_of_calls_in_hand() {
    let (server, client) = start().await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep", "300").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .expect("stops")
        .expect("clean");
    assert_eq!(&call.await.expect("task").expect("answered")[..], b"300");
}

/// The wire format is a choice and ipc works like tcp: a Server and a Master with a Worker,
/// all on ipc sockets, all speaking the JSON codec.
#[tokio::test]
async fn servers_speak_another_codec_over_ipc() {
    use std::sync::Arc;

    use rylm_components::{ClientOptions, Master, Worker};
    use rylm_message::{Codec, JsonCodec};

    let dir = std::env::temp_dir().join(format!("rylm-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the sockets");
    let ipc = |name: &str| format!("ipc://{}", dir.join(name).display());
    let json: Arc<dyn Codec> = Arc::new(JsonCodec::default());
    let options = || ClientOptions {
        codec: json.clone(),
        deadline: DEADLINE,
        ..ClientOptions::default()
    };

    let server = Server::builder("ipc")
        .client_address(&ipc("pull"))
        .stream_address(&ipc("pub"))
        .db_address(&ipc("db"))
        .codec(json.clone())
        .functions(functions())
        .start()
        .await
        .expect("starts on ipc");
    let client = Client::connect_with(server.db_address(), options())
        .await
        .expect("connects over ipc");
    assert_eq!(
        &client.eval("upper", "over ipc").await.expect("answered")[..],
        b"OVER IPC"
    );
    let first = client.session();
    let second = client.new_session();
    assert_ne!(first, second);
    assert_eq!(client.session(), second);
    assert_eq!(
        &client
            .eval("reverse", "ab")
            .await
            .expect("answered in the new session")[..],
        b"ba"
    );
    server.shutdown().await.expect("clean");

    let master = Master::builder("ipc-master")
        .client_address(&ipc("m-pull"))
        .stream_address(&ipc("m-pub"))
        .worker_address(&ipc("m-workers"))
        .db_address(&ipc("m-db"))
        .codec(json.clone())
        .start()
        .await
        .expect("starts on ipc");
    let worker = Worker::builder(functions())
        .codec(json.clone())
        .connect_via_cache(master.db_address(), DEADLINE)
        .await
        .expect("connects over ipc");
    let client = Client::connect_with(master.db_address(), options())
        .await
        .expect("connects");
    assert_eq!(
        &client
            .eval("upper", "json")
            .await
            .expect("answered by the worker")[..],
        b"JSON"
    );
    worker.shutdown().await;
    master.shutdown().await.expect("clean");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn peers_cannot_change_the_discovery_keys_and_the_cache_is_bounded() {
    let limits = rylm_components::CacheLimits {
        max_entries: 3,
        max_value: 16,
        max_key: 8,
    };
    let server = Server::builder("text")
        .functions(functions())
        .cache_limits(limits)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    fn kind<T: std::fmt::Debug>(outcome: Result<T, Error>) -> String {
        match outcome {
            Err(Error::Remote { kind, .. }) => kind,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    for key in ["name", "client_address", "stream_address", "db_address"] {
        let hijack = client.set(Some(key), "tcp://203.0.113.1:1").await;
        assert_eq!(kind(hijack), "read-only", "{key}");
        assert_eq!(kind(client.delete(key).await), "read-only", "{key}");
    }
    assert_eq!(
        client.get("client_address").await.expect("get"),
        Some(Bytes::from(server.client_address().to_owned()))
    );
    assert_eq!(
        kind(client.set(Some("k"), vec![0u8; 17]).await),
        "too-large"
    );
    assert_eq!(kind(client.set(Some("a-long-key"), "v").await), "too-large");
    for key in ["a", "b", "c"] {
        client.set(Some(key), "v").await.expect("within the bound");
    }
    assert_eq!(kind(client.set(Some("d"), "v").await), "cache-full");
    client
        .set(Some("a"), "again")
        .await
        .expect("a key it holds");
    client.delete("a").await.expect("delete");
    client.set(Some("d"), "v").await.expect("room again");
    // A client that still works after all that.
    assert_eq!(&client.eval("upper", "ok").await.expect("eval")[..], b"OK");
    server.shutdown().await.expect("clean");
}
