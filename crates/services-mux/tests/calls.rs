//! Services and callers over real ZeroMQ sockets on loopback tcp.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_services_mux::protocol::{self, Binding, Decoded, Frame, Secret, WireRequest};
use rylm_services_mux::{
    Call, ClientConfig, Error, Method, Service, ServiceClient, ServiceHandle, ServiceResponse,
};
use rylm_transport::{Kind, Options, Socket};
use serde_json::{Value, json};

const SECRET: &str = "my_shared_secret";
const DEADLINE: Duration = Duration::from_secs(10);

/// A quick heartbeat, so that a dead instance is found in well under a second.
fn client() -> ServiceClient {
    ServiceClient::with_config(ClientConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_misses: 3,
        default_deadline: DEADLINE,
        ..ClientConfig::default()
    })
}

/// The seed's slow echo, plus routes that show captures, methods, errors and the instance.
async fn start(name: &'static str) -> ServiceHandle {
    Service::new(name, SECRET)
        .with_queue(1_000)
        .route(r"^/service/slow$", Method::Request, |request| async move {
            let millis = request
                .argument("SLEEP_MS")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(millis)).await;
            let data = request
                .argument("RETURN_DATA")
                .cloned()
                .unwrap_or("NO DATA".into());
            ServiceResponse::new(200, "Took a while, but I am back.").with("RETURN_DATA", data)
        })
        .and_then(|s| {
            s.route(
                r"^/users/(?P<id>\d+)/(\w+)$",
                Method::Get,
                |request| async move {
                    ServiceResponse::new(200, "found")
                        .with("id", request.named.get("id").cloned().unwrap_or_default())
                        .with("second", request.capture(2).unwrap_or_default().to_owned())
                        .with(
                            "header",
                            request.headers.get("x-trace").cloned().unwrap_or_default(),
                        )
                        .with("body", String::from_utf8_lossy(&request.body).into_owned())
                },
            )
        })
        .and_then(|s| {
            s.route(
                r"^/users/(?P<id>\d+)/(\w+)$",
                Method::Delete,
                |_| async move { ServiceResponse::new(204, "deleted") },
            )
        })
        .and_then(|s| {
            s.route(r"^/whoami$", Method::Request, move |_| async move {
                ServiceResponse::new(200, "OK").with("instance", name)
            })
        })
        .and_then(|s| {
            s.route(r"^/panic$", Method::Request, |_| async move {
                if true {
                    panic!("on purpose");
                }
                ServiceResponse::default()
            })
        })
        .expect("valid routes")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("binds")
}

#[tokio::test]
async fn routes_by_path_and_method_with_captures() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], SECRET);

    let reply = client
        .call(
            "svc",
            Call::new("/service/slow").argument("RETURN_DATA", "I made a round trip ✓"),
            Some(DEADLINE),
        )
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 200);
    assert_eq!(reply.response.status_msg, "Took a while, but I am back.");
    assert_eq!(
        reply.response.payload["RETURN_DATA"],
        "I made a round trip ✓"
    );
    assert_eq!(
        reply.response.headers.get("METHOD").map(String::as_str),
        Some("response")
    );
    assert_eq!(reply.handled, None);

    let call = Call::new("/users/42/profile")
        .method(Method::Get)
        .header("x-trace", "t-1")
        .body("raw body");
    let reply = client
        .call("svc", call, Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.payload["id"], "42");
    assert_eq!(reply.response.payload["second"], "profile");
    assert_eq!(reply.response.payload["header"], "t-1");
    assert_eq!(reply.response.payload["body"], "raw body");

    let reply = client
        .call(
            "svc",
            Call::new("/users/42/profile").method(Method::Delete),
            Some(DEADLINE),
        )
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 204);

    let reply = client
        .call(
            "svc",
            Call::new("/users/42/profile").method(Method::Post),
            Some(DEADLINE),
        )
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 405);
    assert_eq!(reply.response.payload["allowed"], json!(["delete", "get"]));

    let reply = client
        .call("svc", Call::new("/nowhere"), Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 404);
    assert!(reply.response.status_msg.contains("/nowhere"));

    let reply = client
        .call("svc", Call::new("/panic"), Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 500);
    // Still serving after the panic.
    let reply = client
        .call("svc", Call::new("/whoami"), Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.status, 200);

    let routes = client
        .discover("svc", Some(DEADLINE))
        .await
        .expect("discovered");
    assert_eq!(routes.len(), 4);
    assert_eq!(routes[1].pattern, r"^/users/(?P<id>\d+)/(\w+)$");
    assert_eq!(routes[1].methods, vec!["get", "delete"]);
    service.shutdown().await;
}

#[tokio::test]
async fn many_calls_in_flight_on_one_connection() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], SECRET);
    client.register("svc", &[service.address()], SECRET); // a no-op
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100 {
        let client = client.clone();
        calls.spawn(async move {
            let call = Call::new("/service/slow")
                .argument("RETURN_DATA", i)
                .argument("SLEEP_MS", 20);
            (i, client.call("svc", call, Some(DEADLINE)).await)
        });
    }
    let started = Instant::now();
    while let Some(done) = calls.join_next().await {
        let (i, reply) = done.expect("task");
        assert_eq!(
            reply.expect("answered").response.payload["RETURN_DATA"],
            json!(i)
        );
    }
    // 100 calls of 20 ms each, concurrently: nowhere near 2 s one after the other.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(client.in_flight(), 0);
}

/// With many calls in flight, a call's request leaves in a burst with others (see
/// `rylm_transport::Outbox`): callers that give up as soon as their request is queued leave
/// none of them behind, and the calls after them go through.
#[tokio::test]
async fn requests_of_callers_that_give_up_at_once_still_leave() {
    // Fewer than the service's 64 handler slots, so that the counted calls find one.
    const HELD: usize = rylm_transport::outbox::GATHER_FROM + 8;
    const GIVEN_UP: usize = 200;
    let seen = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (counted, held) = (seen.clone(), gate.clone());
    let service = Service::new("counting", SECRET)
        .with_queue(1_000)
        .route(r"^/count$", Method::Request, move |_| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                ServiceResponse::new(200, "counted")
            }
        })
        .and_then(|s| {
            s.route(r"^/hold$", Method::Request, move |_| {
                let held = held.clone();
                async move {
                    let _ = held.acquire().await;
                    ServiceResponse::new(200, "released")
                }
            })
        })
        .expect("valid routes")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let client = client();
    client.register("svc", &[service.address()], SECRET);
    // Enough calls in flight for requests to be gathered into bursts.
    let mut holding = tokio::task::JoinSet::new();
    for _ in 0..HELD {
        let client = client.clone();
        holding.spawn(async move { client.call("svc", Call::new("/hold"), Some(DEADLINE)).await });
    }
    let deadline = Instant::now() + DEADLINE;
    while client.in_flight() < HELD {
        assert!(
            Instant::now() < deadline,
            "{} calls held",
            client.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..GIVEN_UP {
        let call = client.call("svc", Call::new("/count"), Some(DEADLINE));
        assert!(
            futures_lite::future::poll_once(std::pin::pin!(call))
                .await
                .is_none(),
            "a call cannot be answered before it waits"
        );
    }
    while seen.load(Ordering::SeqCst) < GIVEN_UP {
        assert!(
            Instant::now() < deadline,
            "the service saw {} of {GIVEN_UP} requests",
            seen.load(Ordering::SeqCst),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(HELD);
    while let Some(held) = holding.join_next().await {
        held.expect("task").expect("a held call is answered");
    }
    assert_eq!(client.in_flight(), 0, "calls given up are not in flight");
    client
        .call("svc", Call::new("/count"), Some(DEADLINE))
        .await
        .expect("a call after them is answered");
    assert_eq!(seen.load(Ordering::SeqCst), 1 + GIVEN_UP);
    service.shutdown().await;
}

#[tokio::test]
async fn async_calls_reach_the_response_handler_and_sync_calls_run_it_once() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], SECRET);
    let runs = Arc::new(AtomicUsize::new(0));
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    {
        let runs = runs.clone();
        client
            .on_response(r"^/service/slow$", move |path, response| {
                let (runs, sender) = (runs.clone(), sender.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = sender.send((path, response.clone()));
                    json!({"handled": response.status})
                }
            })
            .expect("valid pattern");
    }

    let started = Instant::now();
    let call = Call::new("/service/slow")
        .argument("RETURN_DATA", "async")
        .argument("SLEEP_MS", 300);
    client.send("svc", call).await.expect("sent");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "send returns at once"
    );
    let (path, response) = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .expect("the response comes")
        .expect("a response");
    assert_eq!(path, "/service/slow");
    assert_eq!(response.payload["RETURN_DATA"], "async");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let reply = client
        .call(
            "svc",
            Call::new("/service/slow").argument("RETURN_DATA", "sync"),
            Some(DEADLINE),
        )
        .await
        .expect("answered");
    assert_eq!(reply.handled, Some(json!({"handled": 200})));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler ran once for the sync call"
    );
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_and_the_late_answer_is_dropped() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], SECRET);
    let started = Instant::now();
    let outcome = client
        .call(
            "svc",
            Call::new("/service/slow").argument("SLEEP_MS", 1_000),
            Some(Duration::from_millis(300)),
        )
        .await;
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(
        client.in_flight(),
        0,
        "a timed-out call leaves nothing behind"
    );
    tokio::time::sleep(Duration::from_millis(900)).await; // the late answer arrives and is dropped
    let reply = client
        .call("svc", Call::new("/whoami"), Some(DEADLINE))
        .await
        .expect("still works");
    assert_eq!(reply.response.status, 200);
}

#[tokio::test]
async fn calls_spread_over_two_instances() {
    let (a, b) = (start("a").await, start("b").await);
    let client = client();
    client.register("svc", &[a.address(), b.address()], SECRET);
    // Let both become live before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut served = std::collections::HashMap::new();
    for _ in 0..20 {
        let reply = client
            .call("svc", Call::new("/whoami"), Some(DEADLINE))
            .await
            .expect("answered");
        let instance = reply.response.payload["instance"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *served.entry(instance).or_insert(0) += 1;
    }
    assert!(served.get("a").copied().unwrap_or(0) >= 5, "{served:?}");
    assert!(served.get("b").copied().unwrap_or(0) >= 5, "{served:?}");
}

#[tokio::test]
async fn a_killed_instance_fails_its_calls_at_once_and_the_other_serves_on() {
    let (doomed, survivor) = (start("doomed").await, start("survivor").await);
    let client = client();
    client.register("svc", &[doomed.address(), survivor.address()], SECRET);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Two slow calls: least-loaded selection puts one on each instance.
    let slow = || Call::new("/service/slow").argument("SLEEP_MS", 3_000);
    let first = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call("svc", slow(), Some(Duration::from_secs(20)))
                .await
        }
    });
    let second = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call("svc", slow(), Some(Duration::from_secs(20)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = Instant::now();
    doomed.abort();

    let (first, second) = (first.await.expect("task"), second.await.expect("task"));
    let dead: Vec<&Result<_, Error>> = [&first, &second]
        .into_iter()
        .filter(|r| matches!(r, Err(Error::InstanceDead { .. })))
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "exactly the call on the killed instance fails: {first:?} {second:?}"
    );
    assert!(
        [&first, &second]
            .iter()
            .any(|r| r.as_ref().is_ok_and(|reply| reply.response.status == 200)),
        "the other call is answered"
    );
    // Found by heartbeats (3 x 100 ms), not by the 20 s deadline; the survivor's 3 s call
    // finishes last, so measure against it generously.
    assert!(killed_at.elapsed() < Duration::from_secs(5));

    let reply = client
        .call("svc", Call::new("/whoami"), Some(DEADLINE))
        .await
        .expect("answered");
    assert_eq!(reply.response.payload["instance"], "survivor");
}

#[tokio::test]
async fn a_wrong_secret_gets_an_explicit_401() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], "not-the-secret");
    // The service refuses the heartbeats already, so the call fails at once with the 401,
    // long before its deadline.
    let started = Instant::now();
    let outcome = client
        .call("svc", Call::new("/whoami"), Some(DEADLINE))
        .await;
    match outcome {
        Err(Error::Refused { reason, .. }) => {
            assert!(reason.contains("wrong shared secret"), "{reason}")
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A request itself (not only a heartbeat) is refused by its id.
    let raw = Socket::new(Kind::Dealer, &Options::default()).expect("socket");
    raw.connect(service.address()).await.expect("connects");
    let bound = binding("a", &service);
    let request = request_frame("r-1", protocol::now_ms());
    send(&raw, &request, &Secret::new("not-the-secret"), &bound).await;
    match receive(&raw, &bound).await {
        Frame::Refusal(refusal) => {
            assert_eq!(refusal.id, "r-1");
            assert!(
                refusal.reason.contains("wrong shared secret"),
                "{}",
                refusal.reason
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn request_frame(id: &str, ts: u64) -> Frame {
    Frame::Request(WireRequest {
        id: id.into(),
        ts,
        path: "/whoami".into(),
        method: "request".into(),
        arguments: Default::default(),
        headers: Default::default(),
        body: Vec::new(),
    })
}

/// What requests to `service` (started by `start(name)`) are bound to.
fn binding(name: &str, service: &ServiceHandle) -> Binding {
    Binding {
        service: name.into(),
        instance: service.instance().into(),
    }
}

async fn send(socket: &Socket, frame: &Frame, secret: &Secret, binding: &Binding) {
    let frames = protocol::encode(frame, secret, binding).expect("encodes");
    socket.send(frames).await.expect("sends");
}

async fn receive(socket: &Socket, binding: &Binding) -> Frame {
    let message = tokio::time::timeout(DEADLINE, socket.recv())
        .await
        .expect("an answer within the deadline")
        .expect("receives");
    match protocol::decode(&message, &[Secret::new(SECRET)], binding).expect("well formed") {
        Decoded::Frame(frame, _) => frame,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_replayed_or_stale_frame_is_refused() {
    let service = start("a").await;
    let raw = Socket::new(Kind::Dealer, &Options::default()).expect("socket");
    raw.connect(service.address()).await.expect("connects");
    let secret = Secret::new(SECRET);
    let bound = binding("a", &service);
    let request = request_frame("once", protocol::now_ms());
    send(&raw, &request, &secret, &bound).await;
    assert!(matches!(receive(&raw, &bound).await, Frame::Response(r) if r.status == 200));

    send(&raw, &request, &secret, &bound).await; // the very same frame again
    match receive(&raw, &bound).await {
        Frame::Refusal(refusal) => assert!(
            refusal.reason.contains("already seen"),
            "{}",
            refusal.reason
        ),
        other => panic!("a replay must be refused, got {other:?}"),
    }
    send(
        &raw,
        &request_frame("old", protocol::now_ms() - 120_000),
        &secret,
        &bound,
    )
    .await;
    match receive(&raw, &bound).await {
        Frame::Refusal(refusal) => assert!(refusal.reason.contains("window"), "{}", refusal.reason),
        other => panic!("a stale request must be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_are_dropped_and_the_service_goes_on() {
    let service = start("a").await;
    let raw = Socket::new(Kind::Dealer, &Options::default()).expect("socket");
    raw.connect(service.address()).await.expect("connects");
    for garbage in [
        vec![Bytes::from_static(b"hello")],
        vec![protocol::assemble(b'Q', b"\xc1\xc1", &[])],
        vec![protocol::assemble(b'?', b"", &[0; 32])],
        vec![
            protocol::assemble(b'Q', b"", &[]),
            protocol::assemble(b'Q', b"", &[]),
        ],
        vec![Bytes::from(vec![0u8; 100_000])],
    ] {
        raw.send(garbage).await.expect("sends");
    }
    let secret = Secret::new(SECRET);
    let bound = binding("a", &service);
    send(
        &raw,
        &request_frame("after-garbage", protocol::now_ms()),
        &secret,
        &bound,
    )
    .await;
    assert!(matches!(receive(&raw, &bound).await, Frame::Response(r) if r.id == "after-garbage"));
}

#[tokio::test]
async fn unknown_services_and_absent_instances_fail_fast() {
    let client = client();
    let outcome = client.call("nobody", Call::new("/x"), Some(DEADLINE)).await;
    assert!(
        matches!(outcome, Err(Error::UnknownService(_))),
        "{outcome:?}"
    );
    // Registered, but nothing listens there.
    client.register("ghost", &["tcp://127.0.0.1:1"], SECRET);
    let started = Instant::now();
    let outcome = client
        .call("ghost", Call::new("/x"), Some(Duration::from_millis(400)))
        .await;
    assert!(
        matches!(outcome, Err(Error::NoLiveInstance { .. })),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_graceful_shutdown_answers_the_calls_in_hand() {
    let service = start("a").await;
    let client = client();
    client.register("svc", &[service.address()], SECRET);
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call(
                    "svc",
                    Call::new("/service/slow").argument("SLEEP_MS", 300),
                    Some(DEADLINE),
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    service.shutdown().await;
    let reply = call
        .await
        .expect("task")
        .expect("answered before the service stopped");
    assert_eq!(reply.response.status, 200);
}

/// A handler that computes for long before its first await sends the next thousand handlers
/// to tasks of their own (they no longer run in the receive loop's task), then the loop takes
/// them in again: one slow step does not cost the instance its fast path for good.
#[tokio::test]
async fn a_slow_first_step_sends_handlers_to_tasks_for_a_while_only() {
    let service = Service::new("inline", SECRET)
        .route(r"^/task$", Method::Request, |_request| async move {
            let task = tokio::task::try_id()
                .map(|id| id.to_string())
                .unwrap_or_default();
            ServiceResponse::new(200, "OK").with("task", task)
        })
        .and_then(|s| {
            s.route(r"^/compute$", Method::Request, |_request| async move {
                // Holds its thread past the 2 ms a first step may take in the receive loop.
                std::thread::sleep(Duration::from_millis(5));
                ServiceResponse::new(200, "OK")
            })
        })
        .expect("routes")
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");
    let caller = client();
    caller.register("inline", &[service.address()], SECRET);
    let task_of = || async {
        let reply = caller
            .call("inline", Call::new("/task"), None)
            .await
            .expect("answered");
        reply.response.payload["task"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Two answers from the same task: the receive loop's (a busy machine may preempt a step
    // and send a few handlers to tasks first).
    let mut previous = task_of().await;
    let mut receive_loop = None;
    for _ in 0..3_000 {
        let task = task_of().await;
        if task == previous {
            receive_loop = Some(task);
            break;
        }
        previous = task;
    }
    let receive_loop = receive_loop.expect("handlers run in the receive loop");
    assert!(!receive_loop.is_empty());

    caller
        .call("inline", Call::new("/compute"), None)
        .await
        .expect("answered");
    let mut elsewhere = std::collections::HashSet::new();
    let mut back = false;
    for _ in 0..10_000 {
        let task = task_of().await;
        if task == receive_loop {
            back = true;
            break;
        }
        elsewhere.insert(task);
    }
    assert!(back, "handlers never came back to the receive loop");
    assert!(
        elsewhere.len() >= 1_000,
        "{} handlers ran in tasks of their own, not a thousand",
        elsewhere.len()
    );
    service.shutdown().await;
}
