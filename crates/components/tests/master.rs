//! A Master and its Workers over loopback tcp.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rylm_components::{Client, Error, Functions, Heartbeat, Master, Worker};

const DEADLINE: Duration = Duration::from_secs(10);
const QUICK: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    misses: 3,
};

fn functions(tag: &'static str) -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
        })
        .add("who", move |_p: Bytes| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, String>(Bytes::from(tag))
        })
        .add("sleep", |p: Bytes| async move {
            let millis: u64 = String::from_utf8_lossy(&p).parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok::<_, String>(p)
        })
}

async fn worker(master: &Master, tag: &'static str, credits: usize) -> Worker {
    Worker::builder(functions(tag))
        .credits(credits)
        .heartbeat(QUICK.interval)
        .connect_via_cache(master.db_address(), DEADLINE)
        .await
        .expect("a worker connects")
}

#[tokio::test]
async fn work_spreads_over_the_workers_and_every_result_comes_back() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let (a, b) = (worker(&master, "a", 4).await, worker(&master, "b", 4).await);
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let mut results = client.job("who", (0..80).map(|_| Bytes::new()), 16);
    let mut tags = HashSet::new();
    let mut count = 0;
    while let Some((_, result)) = tokio::time::timeout(DEADLINE, results.recv())
        .await
        .expect("in time")
    {
        tags.insert(result.expect("answered"));
        count += 1;
    }
    assert_eq!(count, 80);
    assert_eq!(
        tags,
        HashSet::from([Bytes::from("a"), Bytes::from("b")]),
        "both workers had work"
    );
    match client.eval("nope", "x").await {
        Err(Error::Remote { kind, .. }) => assert_eq!(kind, "unknown-function"),
        other => panic!("{other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_worker_that_joins_late_gets_the_waiting_work() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("upper", "waited").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = worker(&master, "late", 1).await;
    assert_eq!(&call.await.expect("task").expect("answered")[..], b"WAITED");
    late.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_killed_workers_message_is_sent_to_another_once() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let doomed = worker(&master, "doomed", 1).await;
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep", "400").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    doomed.abort();
    let rescuer = worker(&master, "rescuer", 1).await;
    assert_eq!(
        &call
            .await
            .expect("task")
            .expect("re-dispatched and answered")[..],
        b"400"
    );
    rescuer.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_message_whose_second_worker_dies_too_fails_back_to_its_client() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let first = worker(&master, "first", 1).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep", "5000").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.abort();
    let second = worker(&master, "second", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // the master re-dispatches to it
    second.abort();
    match tokio::time::timeout(DEADLINE, call)
        .await
        .expect("in time")
        .expect("task")
    {
        Err(Error::Remote { kind, .. }) => assert_eq!(kind, "worker-died"),
        other => panic!("expected a worker-died error, got {other:?}"),
    }
    master.shutdown().await.expect("clean");
}

/// A master started from `builder`, one worker of two credits, and a client.
async fn served_with_a_worker(builder: rylm_components::MasterBuilder) -> (Master, Worker, Client) {
    let master = builder.start().await.expect("starts");
    let w = worker(&master, "w", 2).await;
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    (master, w, client)
}

#[tokio::test]
async fn scatter_and_gather_hooks_shape_the_stream() {
    // What the gather hook saw of each result's envelope: the worker's short answer leaves the
    // caller's session and id out, and the master gives them back.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let saw = seen.clone();
    let (master, w, client) = served_with_a_worker(
        Master::builder("m")
            .heartbeat(QUICK)
            .scatter(|message| {
                if &message.payload[..] == b"drop" {
                    Vec::new()
                } else {
                    vec![message]
                }
            })
            .gather(move |mut result| {
                saw.lock()
                    .expect("not poisoned")
                    .push((result.pipeline.clone(), result.client.is_empty()));
                let mut payload = result.payload.to_vec();
                payload.extend_from_slice(b"!");
                result.payload = Bytes::from(payload);
                vec![result]
            }),
    )
    .await;
    assert_eq!(
        &client.eval("upper", "hey").await.expect("answered")[..],
        b"HEY!"
    );
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        [(client.session(), false)]
    );
    let dropped = client
        .eval_within("upper", "drop", Duration::from_millis(300))
        .await;
    assert!(
        matches!(dropped, Err(Error::Timeout { .. })),
        "scatter dropped it: {dropped:?}"
    );
    w.shutdown().await;
    master.shutdown().await.expect("clean");
}

/// A hook that panics fails its call at once with a `panicked` error (instead of leaving the
/// caller to its deadline or taking the master down), and the master goes on serving.
#[tokio::test]
async fn a_hook_that_panics_fails_its_call_and_the_master_goes_on() {
    let (master, w, client) = served_with_a_worker(
        Master::builder("m")
            .heartbeat(QUICK)
            .scatter(|message| {
                assert!(
                    &message.payload[..] != b"scatter-boom",
                    "a scatter hook that panics"
                );
                vec![message]
            })
            .gather(|result| {
                assert!(
                    &result.payload[..] != b"GATHER-BOOM",
                    "a gather hook that panics"
                );
                vec![result]
            }),
    )
    .await;
    // A lost message would end in a timeout instead.
    for payload in ["scatter-boom", "gather-boom"] {
        match client.eval("upper", payload).await {
            Err(Error::Remote { kind, message, .. }) => {
                assert_eq!(kind, "panicked", "{payload}: {message}");
                assert!(message.contains("hook panicked"), "{payload}: {message}");
            }
            other => panic!("{payload}: expected a panicked error, got {other:?}"),
        }
    }
    assert_eq!(
        &client.eval("upper", "fine").await.expect("answered")[..],
        b"FINE"
    );
    w.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn shutdown_waits_for_the_workers_to_answer() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let w = worker(&master, "w", 2).await;
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep", "300").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(DEADLINE, master.shutdown())
        .await
        .expect("stops")
        .expect("clean");
    assert_eq!(&call.await.expect("task").expect("answered")[..], b"300");
    w.shutdown().await;
}

#[tokio::test]
async fn a_worker_pointed_at_a_plain_server_refuses_clearly() {
    let server = rylm_components::Server::builder("plain")
        .start()
        .await
        .expect("starts");
    let outcome = Worker::builder(Functions::new())
        .connect_via_cache(server.db_address(), DEADLINE)
        .await;
    assert!(matches!(outcome, Err(Error::Server { .. })), "{outcome:?}");
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_mux_worker_yields_many_results_for_one_message() {
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .start()
        .await
        .expect("starts");
    let words = Functions::new().add_mux("words", |p: Bytes| async move {
        let text = String::from_utf8_lossy(&p).into_owned();
        Ok::<_, String>(
            text.split_whitespace()
                .map(|w| Bytes::from(w.to_owned()))
                .collect::<Vec<_>>(),
        )
    });
    let mux: rylm_components::MuxWorker = Worker::builder(words)
        .heartbeat(QUICK.interval)
        .connect_via_cache(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let client = Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects");
    let parts = client
        .eval_all("words", "one two three")
        .await
        .expect("answered");
    assert_eq!(
        parts,
        vec![Bytes::from("one"), Bytes::from("two"), Bytes::from("three")]
    );
    assert!(
        client
            .eval_all("words", "   ")
            .await
            .expect("answered")
            .is_empty()
    );
    // On a plain Server a mux function is refused clearly.
    let server = rylm_components::Server::builder("s")
        .functions(Functions::new().add_mux("words", |_p: Bytes| async move {
            Ok::<Vec<Bytes>, String>(Vec::new())
        }))
        .start()
        .await
        .expect("starts");
    let on_server = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    match on_server.eval("words", "a b").await {
        Err(Error::Remote { kind, .. }) => assert_eq!(kind, "unsupported"),
        other => panic!("{other:?}"),
    }
    mux.shutdown().await;
    master.shutdown().await.expect("clean");
    server.shutdown().await.expect("clean");
}
