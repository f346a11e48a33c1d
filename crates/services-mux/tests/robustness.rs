//! Load, replays, hostile frames, rotation and hung handlers, on real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_services_mux::protocol::{self, Binding, Decoded, Frame, Secret, WireRequest};
use rylm_services_mux::{
    Call, ClientConfig, Error, Method, Service, ServiceClient, ServiceHandle, ServiceResponse,
};
use rylm_transport::{Kind, Options, Socket};

const SECRET: &str = "s3cret";
const DEADLINE: Duration = Duration::from_secs(20);

/// A client that takes an instance for dead after 300 ms of silence.
fn client(default_deadline: Duration) -> ServiceClient {
    ServiceClient::with_config(ClientConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_misses: 3,
        default_deadline,
        ..ClientConfig::default()
    })
}

/// A service whose `/slow` sleeps `SLEEP_MS` and counts its runs.
fn slow_service(name: &str, secret: &str, runs: Arc<AtomicUsize>) -> Service {
    Service::new(name, secret)
        .route(r"^/slow$", Method::Request, move |request| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let millis = request
                    .argument("SLEEP_MS")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(millis)).await;
                ServiceResponse::new(200, "slept")
            }
        })
        .expect("route")
}

#[tokio::test]
async fn an_instance_at_capacity_answers_busy_and_is_never_taken_for_dead() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = slow_service("s", SECRET, runs.clone())
        .with_concurrency(64)
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let client = client(DEADLINE);
    client.register("s", &[service.address()], SECRET);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = client.clone();
        calls.spawn(async move {
            client
                .call(
                    "s",
                    Call::new("/slow").argument("SLEEP_MS", 1_000),
                    Some(DEADLINE),
                )
                .await
        });
    }
    let (mut answered, mut busy) = (0, 0);
    while let Some(outcome) = calls.join_next().await {
        match outcome.expect("task") {
            Ok(reply) if reply.response.status == 200 => answered += 1,
            Err(Error::Busy { .. }) => busy += 1,
            other => panic!("neither an answer nor busy: {other:?}"),
        }
    }
    assert_eq!(answered + busy, 200);
    assert!(answered >= 64, "only {answered} answered");
    assert!(busy > 0, "nobody was told busy");
    // Nothing ran twice: every run is an answered call.
    assert_eq!(runs.load(Ordering::SeqCst), answered);
    service.shutdown().await;
}

#[tokio::test]
async fn a_busy_instance_sends_callers_to_another() {
    let runs = Arc::new(AtomicUsize::new(0));
    let a = slow_service("s", SECRET, runs.clone())
        .with_concurrency(1)
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("a");
    let b = slow_service("s", SECRET, runs.clone())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("b");
    // Another caller keeps `a`'s one slot taken.
    let holder = client(DEADLINE);
    holder.register("s", &[a.address()], SECRET);
    let held = tokio::spawn(async move {
        holder
            .call(
                "s",
                Call::new("/slow").argument("SLEEP_MS", 3_000),
                Some(DEADLINE),
            )
            .await
    });
    let started = Instant::now();
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < DEADLINE, "the holding call never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // This caller sees two idle instances; every call it sends to `a` comes back busy and
    // goes to `b`.
    let caller = client(DEADLINE);
    caller.register("s", &[a.address(), b.address()], SECRET);
    for _ in 0..10 {
        let reply = caller
            .call("s", Call::new("/slow"), Some(DEADLINE))
            .await
            .expect("served despite a busy instance");
        assert_eq!(reply.instance, b.address());
    }
    assert_eq!(
        held.await
            .expect("task")
            .expect("held call")
            .response
            .status,
        200
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        11,
        "a call ran twice or not at all"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A request frame bound to `binding`, as a captured one would be.
fn captured(binding: &Binding, id: &str) -> Vec<Bytes> {
    let request = Frame::Request(WireRequest {
        id: id.into(),
        ts: protocol::now_ms(),
        path: "/slow".into(),
        method: "request".into(),
        arguments: Default::default(),
        headers: Default::default(),
        body: Vec::new(),
    });
    protocol::encode(&request, &Secret::new(SECRET), binding).expect("encodes")
}

async fn exchange(address: &str, frames: Vec<Bytes>, binding: &Binding) -> Frame {
    let raw = Socket::new(Kind::Dealer, &Options::default()).expect("socket");
    raw.connect(address).await.expect("connects");
    raw.send(frames).await.expect("sends");
    let answer = tokio::time::timeout(DEADLINE, raw.recv())
        .await
        .expect("an answer")
        .expect("receives");
    raw.close().await;
    match protocol::decode(&answer, &[Secret::new(SECRET)], binding).expect("well formed") {
        Decoded::Frame(frame, _) => frame,
        other => panic!("{other:?}"),
    }
}

fn binding_of(service: &ServiceHandle) -> Binding {
    Binding {
        service: "s".into(),
        instance: service.instance().into(),
    }
}

#[tokio::test]
async fn a_captured_request_is_refused_by_another_instance_and_after_a_restart() {
    let runs = Arc::new(AtomicUsize::new(0));
    let first = slow_service("s", SECRET, runs.clone())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let other = slow_service("s", SECRET, runs.clone())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let binding = binding_of(&first);
    let frames = captured(&binding, "captured-1");
    let answer = exchange(first.address(), frames.clone(), &binding).await;
    assert!(
        matches!(answer, Frame::Response(ref r) if r.status == 200),
        "{answer:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The same bytes to another instance of the same service and secret.
    let answer = exchange(other.address(), frames.clone(), &binding).await;
    assert!(matches!(answer, Frame::Refusal(_)), "{answer:?}");

    // And to the first instance's address after a restart.
    let address = first.address().to_owned();
    first.shutdown().await;
    let restarted = slow_service("s", SECRET, runs.clone())
        .serve(&address)
        .await
        .expect("serves again");
    assert_ne!(restarted.instance(), binding.instance);
    let answer = exchange(&address, frames, &binding).await;
    assert!(matches!(answer, Frame::Refusal(_)), "{answer:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a captured request ran again"
    );
    other.shutdown().await;
    restarted.shutdown().await;
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_16_mib_unauthenticated_frame_costs_about_its_size() {
    let service = slow_service("s", SECRET, Arc::default())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    // A map {"id": "x", "a": [nil; N]} just under the 16 MiB message limit, with a MAC of zeros.
    let count: u32 = 16 * 1024 * 1024 - 4096;
    let mut body = vec![0x82, 0xa2, b'i', b'd', 0xa1, b'x', 0xa1, b'a', 0xdd];
    body.extend(count.to_be_bytes());
    body.resize(body.len() + count as usize, 0xc0);
    let frames = vec![protocol::assemble(b'Q', &body, &[0; 32])];
    let before = rss_kib("VmRSS:");
    let answer = exchange(service.address(), frames, &binding_of(&service)).await;
    assert!(
        matches!(answer, Frame::Refusal(ref r) if r.id == "x"),
        "{answer:?}"
    );
    let grown_mib = rss_kib("VmHWM:").saturating_sub(before) / 1024;
    eprintln!("a 16 MiB unauthenticated frame: peak RSS grew by {grown_mib} MiB");
    // The frame is held by the sender and by the receiver (about 32 MiB in this one process);
    // parsed into values it was about 512 MiB.
    assert!(grown_mib < 96, "peak RSS grew by {grown_mib} MiB");
    service.shutdown().await;
}

#[tokio::test]
async fn secrets_rotate_under_load_without_a_failed_call() {
    let service = slow_service("s", "old-secret", Arc::default())
        .with_next_secret("new-secret")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let client = client(DEADLINE);
    client.register("s", &[service.address()], "old-secret");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, stop) = (client.clone(), stop.clone());
        callers.spawn(async move {
            let mut done = 0;
            while !stop.load(Ordering::SeqCst) {
                client
                    .call(
                        "s",
                        Call::new("/slow").argument("SLEEP_MS", 5),
                        Some(DEADLINE),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                done += 1;
            }
            Ok::<usize, String>(done)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.register("s", &[], "new-secret");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    while let Some(done) = callers.join_next().await {
        total += done
            .expect("task")
            .expect("no call failed during the rotation");
    }
    assert!(total > 0);
    service.shutdown().await;
}

#[tokio::test]
async fn a_hung_handler_is_answered_504_and_an_expired_async_call_too() {
    let service = Service::new("s", SECRET)
        .route_within(
            r"^/hang$",
            Method::Request,
            Some(Duration::from_millis(200)),
            |_| async move {
                std::future::pending::<()>().await;
                ServiceResponse::new(200, "never")
            },
        )
        .expect("route")
        .route(r"^/late$", Method::Request, |_| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            ServiceResponse::new(200, "late")
        })
        .expect("route")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let client = client(Duration::from_millis(500));
    client.register("s", &[service.address()], SECRET);
    let reply = client
        .call("s", Call::new("/hang"), Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 504);

    let (seen, mut heard) = tokio::sync::mpsc::channel(1);
    client
        .on_response(r"^/late$", move |_, response| {
            let seen = seen.clone();
            async move {
                let _ = seen.send(response.status).await;
                serde_json::Value::Null
            }
        })
        .expect("handler");
    let started = Instant::now();
    client.send("s", Call::new("/late")).await.expect("sent");
    let status = tokio::time::timeout(DEADLINE, heard.recv())
        .await
        .expect("the handler heard of it")
        .expect("a status");
    assert_eq!(status, 504, "the expired call's handler got {status}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(client.in_flight() == 0, "an expired call stayed pending");
    service.shutdown_within(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn instances_can_be_removed_and_added() {
    let runs = Arc::new(AtomicUsize::new(0));
    let a = slow_service("s", SECRET, runs.clone())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("a");
    let b = slow_service("s", SECRET, runs.clone())
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("b");
    let client = client(DEADLINE);
    client.register("s", &[a.address()], SECRET);
    client.register("s", &[b.address()], SECRET);
    assert!(client.remove("s", a.address()));
    assert!(!client.remove("s", a.address()), "removed twice");
    for _ in 0..10 {
        let reply = client
            .call("s", Call::new("/slow"), Some(DEADLINE))
            .await
            .expect("served");
        assert_eq!(reply.instance, b.address());
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Handlers that answer without waiting run in the receive loop (no task, no hop between
/// threads); after one that computes for long before its first await, which would hold up the
/// loop and its heartbeats, every handler gets a task of its own. Seen through the id of the
/// task each handler runs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_sends_the_others_to_tasks_of_their_own() {
    let service = Service::new("b", SECRET)
        .route(r"^/block$", Method::Request, |_| async move {
            // Computes (blocks its thread) before any await: what a handler should not do.
            std::thread::sleep(Duration::from_millis(20));
            ServiceResponse::new(200, "blocked")
        })
        .expect("route")
        .route(r"^/task$", Method::Request, |_| async move {
            let task = tokio::task::try_id()
                .map(|id| id.to_string())
                .unwrap_or_default();
            ServiceResponse::new(200, "quick").with("task", task)
        })
        .expect("route")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let caller = client(DEADLINE);
    caller.register("b", &[service.address()], SECRET);
    let mut tasks = Vec::new();
    for path in ["/task", "/task", "/block", "/task", "/task"] {
        let reply = caller
            .call("b", Call::new(path), Some(DEADLINE))
            .await
            .expect("answered");
        assert_eq!(reply.response.status, 200);
        if let Some(task) = reply.response.payload.get("task") {
            tasks.push(task.as_str().expect("a task id").to_owned());
        }
    }
    assert!(tasks.iter().all(|t| !t.is_empty()), "{tasks:?}");
    // Before: both in the receive loop's task. After: each in one of its own.
    assert_eq!(tasks[0], tasks[1], "{tasks:?}");
    assert_ne!(tasks[2], tasks[3], "{tasks:?}");
    assert!(!tasks[2..].contains(&tasks[0]), "{tasks:?}");
    service.shutdown().await;
}
