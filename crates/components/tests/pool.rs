//! The worker pool's guarantees, against peers that misbehave: a raw DEALER plays the worker,
//! so the test decides what it announces, when it answers and when it falls silent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_components::rylm_transport::{Kind, Options, Socket};
use rylm_components::{
    Admission, BATCH, CREDITS, Client, Error, Functions, HEARTBEAT_FUNCTION, Heartbeat, Master,
    READY_FUNCTION, Worker,
};
use rylm_message::{Codec, Message, NativeCodec};

const DEADLINE: Duration = Duration::from_secs(10);
const QUICK: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    misses: 3,
};

/// A worker played by hand.
struct Fake {
    socket: Socket,
    codec: NativeCodec,
}

impl Fake {
    async fn connect(master: &Master) -> Fake {
        let socket = Socket::new(Kind::Dealer, &Options::default()).expect("a socket");
        socket
            .connect(master.worker_address())
            .await
            .expect("connects");
        Fake {
            socket,
            codec: NativeCodec::default(),
        }
    }

    async fn send(&self, message: &Message) {
        let frames = self.codec.encode_frames(message).expect("encodes");
        self.socket.send(frames).await.expect("sends");
    }

    /// A fake worker that announced one credit.
    async fn ready(master: &Master) -> Fake {
        let fake = Fake::connect(master).await;
        fake.announce("1").await;
        fake
    }

    async fn announce(&self, credits: &str) {
        let ready = Message::call(READY_FUNCTION, Bytes::new()).with_header(CREDITS, credits);
        self.send(&ready).await;
    }

    async fn beat(&self) {
        self.send(&Message::call(HEARTBEAT_FUNCTION, Bytes::new()))
            .await;
    }

    /// The next message that is work (not a heartbeat or a request to announce), if one comes
    /// within `within`; heartbeats are sent meanwhile.
    async fn next_job(&self, within: Duration) -> Option<Message> {
        let until = Instant::now() + within;
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let wait = left.min(QUICK.interval);
            match tokio::time::timeout(wait, self.socket.recv()).await {
                Ok(Ok(frames)) => {
                    let message = self.codec.decode_frames(&frames).expect("decodes");
                    match message.function_name() {
                        Some(HEARTBEAT_FUNCTION) => {}
                        Some(READY_FUNCTION) => self.announce("1").await,
                        _ => return Some(message),
                    }
                }
                Ok(Err(error)) => panic!("the fake worker's socket failed: {error}"),
                Err(_) => self.beat().await,
            }
        }
    }
}

/// `client.eval_within(function, payload, within)` in a task of its own.
fn spawn_eval(
    client: &Client,
    function: &'static str,
    payload: &'static str,
    within: Duration,
) -> tokio::task::JoinHandle<Result<Bytes, Error>> {
    let client = client.clone();
    tokio::spawn(async move { client.eval_within(function, payload, within).await })
}

/// A worker of `functions` that runs one message at a time, beating every `interval`.
async fn one_credit_worker(master: &Master, functions: Functions, interval: Duration) -> Worker {
    Worker::builder(functions)
        .credits(1)
        .heartbeat(interval)
        .connect(master.worker_address())
        .await
        .expect("connects")
}

async fn master(admission: Admission) -> Master {
    Master::builder("m")
        .heartbeat(QUICK)
        .admission(admission)
        .start()
        .await
        .expect("starts")
}

async fn client(master: &Master) -> Client {
    Client::connect(master.db_address(), DEADLINE)
        .await
        .expect("connects")
}

fn remote_kind(outcome: Result<Bytes, Error>) -> String {
    match outcome {
        Err(Error::Remote { kind, .. }) => kind,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_announcing_huge_credits_gets_the_cap() {
    let master = master(Admission {
        max_credits: 4,
        ..Admission::default()
    })
    .await;
    let greedy = Fake::connect(&master).await;
    greedy.announce(&u64::MAX.to_string()).await;
    let client = client(&master).await;
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .eval_within("echo", i.to_string(), Duration::from_secs(3))
                    .await
            })
        })
        .collect();
    let mut received = 0;
    while greedy.next_job(Duration::from_millis(600)).await.is_some() {
        received += 1;
    }
    assert_eq!(
        received, 4,
        "the worker got as many messages as the cap allows"
    );
    assert_eq!(master.status().waiting(), 6);
    for call in calls {
        let _ = call.await;
    }
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn an_answer_counts_only_from_the_worker_it_was_sent_to() {
    let master = master(Admission::default()).await;
    let holder = Fake::ready(&master).await;
    let forger = Fake::ready(&master).await;
    let client = client(&master).await;
    let call = spawn_eval(&client, "echo", "x", DEADLINE);
    // Whichever got it, the other forges its answer with the dispatch id it saw.
    let (job, holder_has_it) = tokio::select! {
        job = holder.next_job(DEADLINE) => (job.expect("a job"), true),
        job = forger.next_job(DEADLINE) => (job.expect("a job"), false),
    };
    let (real, other) = if holder_has_it {
        (&holder, &forger)
    } else {
        (&forger, &holder)
    };
    other.send(&job.reply("forged")).await;
    let status = master.status();
    let dropped = &status.counters().dropped_answers;
    wait_until(|| dropped.load(Ordering::Relaxed) == 1).await;
    assert!(!call.is_finished(), "the forged answer was not taken");
    real.send(&job.reply("real")).await;
    let answer = call.await.expect("task").expect("answered");
    assert_eq!(&answer[..], b"real");
    // The real worker answering twice: the second is dropped as well.
    real.send(&job.reply("again")).await;
    wait_until(|| dropped.load(Ordering::Relaxed) == 2).await;
    master.shutdown().await.expect("clean");
}

async fn wait_until(condition: impl Fn() -> bool) {
    let until = Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < until,
            "the condition did not come true in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_stalled_worker_is_readmitted_and_its_late_answer_dropped() {
    let master = master(Admission::default()).await;
    let stalled = Fake::ready(&master).await;
    let client = client(&master).await;
    let call = spawn_eval(&client, "upper", "work", DEADLINE);
    let job = stalled.next_job(DEADLINE).await.expect("a job");
    // Silent well past the grace: the master buries it and waits for another worker.
    tokio::time::sleep(QUICK.grace() * 3).await;
    let status = master.status();
    assert_eq!(status.counters().buried.load(Ordering::Relaxed), 1);
    let upper = Functions::new().add("upper", |p: Bytes| async move {
        Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
    });
    let rescuer = one_credit_worker(&master, upper, QUICK.interval).await;
    assert_eq!(&call.await.expect("task").expect("answered")[..], b"WORK");
    // It speaks again: asked to announce itself, it is readmitted; its late answer is dropped.
    stalled.beat().await;
    let admitted = &status.counters().admitted;
    for _ in 0..100 {
        if admitted.load(Ordering::Relaxed) == 3 {
            break;
        }
        let _ = stalled.next_job(QUICK.interval).await;
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 3, "readmitted");
    stalled.send(&job.reply("late")).await;
    let dropped = &status.counters().dropped_answers;
    wait_until(|| dropped.load(Ordering::Relaxed) == 1).await;
    assert_eq!(status.counters().answered.load(Ordering::Relaxed), 1);
    assert_eq!(status.live_workers(), 2);
    rescuer.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn beyond_the_waiting_line_callers_get_busy_at_once() {
    let master = master(Admission {
        max_waiting: 5,
        ..Admission::default()
    })
    .await;
    let client = client(&master).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = client
                    .eval_within("echo", "x", Duration::from_secs(2))
                    .await;
                (outcome, started.elapsed())
            })
        })
        .collect();
    let mut busy = 0;
    let mut other = 0;
    for call in calls {
        match call.await.expect("task") {
            (Err(Error::Remote { kind, .. }), took) if kind == "busy" => {
                assert!(took < Duration::from_secs(1), "busy came after {took:?}");
                busy += 1;
            }
            _ => other += 1,
        }
    }
    assert_eq!((busy, other), (15, 5));
    let counters = master.status();
    assert_eq!(counters.counters().busy.load(Ordering::Relaxed), 15);
    master.shutdown().await.expect("clean");
}

fn counting(runs: Arc<AtomicUsize>) -> Functions {
    Functions::new()
        .add("count", move |p: Bytes| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(p)
            }
        })
        .add("huge", |_p: Bytes| async move {
            Ok::<_, String>(Bytes::from(vec![7u8; 17 << 20]))
        })
        .add("slow", |p: Bytes| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, String>(p)
        })
        .must_not_run_twice("count")
}

#[tokio::test]
async fn a_message_past_its_deadline_is_never_dispatched() {
    let master = master(Admission::default()).await;
    let client = client(&master).await;
    let outcome = client
        .eval_within("count", "late", Duration::from_millis(200))
        .await;
    // The master answers it `deadline` at its first tick past the deadline, and drops it; the
    // client's own timer, at the same deadline, may fire first (a race of a millisecond).
    let on_time = match &outcome {
        Err(Error::Timeout { .. }) => true,
        Err(Error::Remote { kind, .. }) => kind == "deadline",
        _ => false,
    };
    assert!(on_time, "{outcome:?}");
    let status = master.status();
    let expired = &status.counters().expired;
    wait_until(|| expired.load(Ordering::Relaxed) == 1).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(counting(runs.clone()))
        .heartbeat(QUICK.interval)
        .connect(master.worker_address())
        .await
        .expect("connects");
    assert_eq!(
        &client.eval("count", "fresh").await.expect("runs")[..],
        b"fresh"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the fresh call ran");
    worker.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn credits_come_back_from_unencodable_results_and_overdue_functions() {
    let master = master(Admission::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = one_credit_worker(&master, counting(runs.clone()), QUICK.interval).await;
    let client = client(&master).await;
    for _ in 0..3 {
        assert_eq!(remote_kind(client.eval("huge", "").await), "unencodable");
    }
    // The worker cancels a function at its caller's deadline and answers, so its only credit
    // comes back.
    let outcome = client
        .eval_within("slow", "x", Duration::from_millis(300))
        .await;
    assert!(
        matches!(
            &outcome,
            Err(Error::Timeout { .. }) | Err(Error::Remote { .. })
        ),
        "{outcome:?}"
    );
    // The worker's own `deadline` answer comes (taken, or dropped as late when the master
    // expired the dispatch first): four answers in all.
    let status = master.status();
    let counters = status.counters();
    wait_until(|| {
        counters.answered.load(Ordering::Relaxed) + counters.dropped_answers.load(Ordering::Relaxed)
            == 4
    })
    .await;
    assert_eq!(
        &client.eval("count", "after").await.expect("runs")[..],
        b"after"
    );
    worker.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn an_overdue_dispatch_gives_its_credit_back() {
    let master = master(Admission::default()).await;
    let mute = Fake::ready(&master).await;
    let client = client(&master).await;
    let first = spawn_eval(&client, "echo", "1", Duration::from_millis(300));
    let job = mute.next_job(DEADLINE).await.expect("a job");
    assert_eq!(&job.payload[..], b"1");
    // It never answers but keeps beating: past the deadline and the grace its credit returns.
    assert!(mute.next_job(Duration::from_millis(800)).await.is_none());
    let _ = first.await;
    let second = spawn_eval(&client, "echo", "2", DEADLINE);
    let job = mute.next_job(DEADLINE).await.expect("the credit came back");
    assert_eq!(&job.payload[..], b"2");
    mute.send(&job.reply("two")).await;
    assert_eq!(&second.await.expect("task").expect("answered")[..], b"two");
    assert_eq!(
        master.status().counters().expired.load(Ordering::Relaxed),
        1
    );
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_function_that_must_not_run_twice_is_failed_back_when_its_worker_dies() {
    let master = master(Admission::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let held = {
        let (runs, gate) = (runs.clone(), gate.clone());
        Functions::new()
            .add("count", move |p: Bytes| {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.notify_one();
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok::<_, String>(p)
                }
            })
            .must_not_run_twice("count")
    };
    let doomed = one_credit_worker(&master, held, QUICK.interval).await;
    let client = client(&master).await;
    let call = spawn_eval(&client, "count", "once", DEADLINE);
    tokio::time::timeout(DEADLINE, gate.notified())
        .await
        .expect("it started");
    doomed.abort();
    // A spare worker is there when the master buries the first: still, it is not run again.
    let spare = one_credit_worker(&master, counting(runs.clone()), QUICK.interval).await;
    assert_eq!(remote_kind(call.await.expect("task")), "worker-died");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "it ran once");
    spare.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_worker_whose_connection_closes_is_buried_at_once_not_after_the_grace() {
    let slow_grace = Heartbeat {
        interval: Duration::from_secs(1),
        misses: 5,
    };
    let master = Master::builder("m")
        .heartbeat(slow_grace.clone())
        .start()
        .await
        .expect("starts");
    let gate = Arc::new(tokio::sync::Notify::new());
    let held = {
        let gate = gate.clone();
        Functions::new().add("hold", move |p: Bytes| {
            let gate = gate.clone();
            async move {
                gate.notify_one();
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, String>(p)
            }
        })
    };
    let doomed = one_credit_worker(&master, held, slow_grace.interval).await;
    let client = client(&master).await;
    let call = spawn_eval(&client, "hold", "x", DEADLINE);
    tokio::time::timeout(DEADLINE, gate.notified())
        .await
        .expect("it started");
    let rescuer = one_credit_worker(
        &master,
        Functions::new().add("hold", |p: Bytes| async move { Ok::<_, String>(p) }),
        slow_grace.interval,
    )
    .await;
    let killed = Instant::now();
    doomed.abort();
    let answer = call.await.expect("task").expect("re-dispatched");
    assert_eq!(&answer[..], b"x");
    assert!(
        killed.elapsed() < slow_grace.grace() / 2,
        "re-dispatched after {:?}, the grace is {:?}",
        killed.elapsed(),
        slow_grace.grace()
    );
    rescuer.shutdown().await;
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn an_answer_goes_to_the_caller_its_dispatch_came_from_whatever_it_names() {
    let master = master(Admission::default()).await;
    let worker = Fake::ready(&master).await;
    let (caller, other) = (client(&master).await, client(&master).await);
    let call = spawn_eval(&caller, "echo", "mine", DEADLINE);
    let job = worker.next_job(DEADLINE).await.expect("a job");
    assert_eq!(job.client, caller.id());
    // The worker names the other client in its answer: the answer still goes to the caller.
    worker
        .send(&job.reply("answered").with_client(other.id()))
        .await;
    assert_eq!(
        &call.await.expect("task").expect("answered")[..],
        b"answered"
    );
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn an_answer_comes_back_as_the_worker_sent_it_without_the_trace_header() {
    let master = master(Admission::default()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = one_credit_worker(&master, counting(runs), QUICK.interval).await;
    let caller = caller_socket(&master, "caller-1").await;
    let codec = NativeCodec::default();
    let request = Message::call("m.count", "x").with_cache("7").with_header(
        rylm_message::trace::TRACEPARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    caller
        .send(codec.encode_frames(&request).expect("encodes"))
        .await
        .expect("sends");
    let frames = tokio::time::timeout(DEADLINE, caller.recv())
        .await
        .expect("an answer in time")
        .expect("received");
    let answer = codec.decode_frames(&frames).expect("decodes");
    assert_eq!(
        (&answer.payload[..], answer.cache.as_str()),
        (&b"x"[..], "7")
    );
    // The worker's short answer comes as it sent it: its dispatch id, neither the request's
    // deadline nor the caller's own fields; the trace ends at the caller.
    assert!(answer.header("rylm-dispatch").is_some(), "{answer:?}");
    assert_eq!(answer.header(rylm_components::DEADLINE), None, "{answer:?}");
    assert_eq!(answer.header(rylm_message::trace::TRACEPARENT), None);
    assert_eq!((answer.client.as_str(), answer.pipeline.as_str()), ("", ""));
    worker.shutdown().await;
    master.shutdown().await.expect("clean");
}

/// `n` calls of `echo` in tasks of their own, call `i` with payload `i`.
fn spawn_echoes(client: &Client, n: usize) -> Vec<tokio::task::JoinHandle<Result<Bytes, Error>>> {
    (0..n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.eval_within("echo", i.to_string(), DEADLINE).await })
        })
        .collect()
}

/// Announces `fake` with `credits` and the headers in `more`, once `waiting` calls wait.
async fn announce_when_waiting(
    master: &Master,
    fake: &Fake,
    waiting: usize,
    credits: usize,
    more: &[(&str, &str)],
) {
    let status = master.status();
    wait_until(|| status.waiting() == waiting).await;
    let mut ready =
        Message::call(READY_FUNCTION, Bytes::new()).with_header(CREDITS, credits.to_string());
    for (name, value) in more {
        ready = ready.with_header(*name, value.to_string());
    }
    fake.send(&ready).await;
}

/// The messages of work that reach `fake` until it holds `jobs` of them, each as the bodies it
/// came with (one for a message alone, several for a batch).
async fn receive_jobs(fake: &Fake, jobs: usize) -> Vec<Vec<Bytes>> {
    let until = Instant::now() + DEADLINE;
    let (mut messages, mut held) = (Vec::new(), 0);
    while held < jobs {
        let left = until
            .checked_duration_since(Instant::now())
            .expect("the jobs came in time");
        let frames = tokio::time::timeout(left, fake.socket.recv())
            .await
            .expect("the jobs came in time")
            .expect("receives");
        assert_eq!(
            &frames[0][..],
            &rylm_message::MARKER[..],
            "a native message"
        );
        let bodies = frames[1..].to_vec();
        let first = fake
            .codec
            .decode_frames(&[frames[0].clone(), bodies[0].clone()])
            .expect("decodes");
        if matches!(
            first.function_name(),
            Some(HEARTBEAT_FUNCTION | READY_FUNCTION)
        ) {
            continue;
        }
        held += bodies.len();
        messages.push(bodies);
    }
    messages
}

#[tokio::test]
async fn a_worker_that_takes_batches_gets_them_and_may_answer_in_one() {
    let master = master(Admission::default()).await;
    let fake = Fake::connect(&master).await;
    let client = client(&master).await;
    let calls = spawn_echoes(&client, 40);
    // Announced once all 40 wait, so that one pass of dispatching sends them all.
    announce_when_waiting(&master, &fake, 40, 64, &[(BATCH, "16")]).await;
    let messages = receive_jobs(&fake, 40).await;
    let sizes: Vec<usize> = messages.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [16, 16, 8],
        "batches within the size the worker announced"
    );
    // Every answer in one batch back.
    let mut answers = vec![Bytes::from_static(&rylm_message::MARKER)];
    for body in messages.into_iter().flatten() {
        let job = fake
            .codec
            .decode_frames(&[Bytes::from_static(&rylm_message::MARKER), body])
            .expect("decodes");
        let reply = job.reply(job.payload.clone());
        let frames = fake.codec.encode_frames(&reply).expect("encodes");
        answers.push(frames[1].clone());
    }
    fake.socket.send(answers).await.expect("sends");
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("task").expect("answered");
        assert_eq!(answer, i.to_string().as_bytes(), "each call its own answer");
    }
    let counters = master.status();
    assert_eq!(
        counters.counters().dropped_answers.load(Ordering::Relaxed),
        0
    );
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_worker_that_does_not_say_it_takes_batches_gets_one_message_at_a_time() {
    let master = master(Admission::default()).await;
    ten_calls_one_message_each(master, &[]).await;
}

/// A caller by hand: a DEALER connected to `master` whose identity is its id `id`, as a
/// Client's is.
async fn caller_socket(master: &Master, id: &str) -> Socket {
    let options = Options {
        identity: Bytes::from(id.to_owned()),
        ..Options::default()
    };
    let socket = Socket::new(Kind::Dealer, &options).expect("a socket");
    socket
        .connect(master.client_address())
        .await
        .expect("connects");
    socket
}

/// A caller played by hand: a DEALER with `id` as its identity, sending `n` echo requests
/// (call `i` with cache `i`), with the batch header or without.
async fn raw_caller(master: &Master, id: &str, n: usize, batches: bool) -> Socket {
    let socket = caller_socket(master, id).await;
    let codec = NativeCodec::default();
    for i in 0..n {
        let mut request = Message::call("m.echo", i.to_string());
        request.client = id.to_owned();
        request.cache = i.to_string();
        if batches {
            request = request.with_header(BATCH, "64");
        }
        let frames = codec.encode_frames(&request).expect("encodes");
        socket.send(frames).await.expect("sends");
    }
    socket
}

/// Answers every job `fake` holds (`jobs` of them) in one batch.
async fn answer_all_in_one(fake: &Fake, jobs: usize) {
    let mut answers = vec![Bytes::from_static(&rylm_message::MARKER)];
    for body in receive_jobs(fake, jobs).await.into_iter().flatten() {
        let job = fake
            .codec
            .decode_frames(&[Bytes::from_static(&rylm_message::MARKER), body])
            .expect("decodes");
        let frames = fake
            .codec
            .encode_frames(&job.reply(job.payload.clone()))
            .expect("encodes");
        answers.push(frames[1].clone());
    }
    fake.socket.send(answers).await.expect("sends");
}

/// The messages `socket` receives until they carry `answers` answers: each message's count.
async fn answers_per_message(socket: &Socket, answers: usize) -> Vec<usize> {
    let codec = NativeCodec::default();
    let (mut sizes, mut seen) = (Vec::new(), vec![false; answers]);
    while sizes.iter().sum::<usize>() < answers {
        let frames = tokio::time::timeout(DEADLINE, socket.recv())
            .await
            .expect("the answers came in time")
            .expect("receives");
        for body in &frames[1..] {
            let answer = codec
                .decode_frames(&[frames[0].clone(), body.clone()])
                .expect("decodes");
            let call: usize = answer.cache.parse().expect("a call number");
            assert_eq!(
                answer.payload,
                call.to_string().as_bytes(),
                "its own answer"
            );
            assert!(!std::mem::replace(&mut seen[call], true), "answered once");
        }
        sizes.push(frames.len() - 1);
    }
    sizes
}

#[tokio::test]
async fn a_caller_that_reads_batches_gets_its_answers_of_a_burst_in_one() {
    let master = master(Admission::default()).await;
    let fake = Fake::connect(&master).await;
    let batched = raw_caller(&master, "reads-batches", 30, true).await;
    announce_when_waiting(&master, &fake, 30, 64, &[(BATCH, "64")]).await;
    answer_all_in_one(&fake, 30).await;
    assert_eq!(answers_per_message(&batched, 30).await, [30]);
    // A caller that does not say so gets one answer per message, though the worker's answers
    // came in one batch.
    let single = raw_caller(&master, "one-at-a-time", 10, false).await;
    let status = master.status();
    wait_until(|| status.waiting() == 0 && status.in_flight() == 10).await;
    answer_all_in_one(&fake, 10).await;
    assert_eq!(answers_per_message(&single, 10).await, [1; 10]);
    master.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_master_whose_transport_takes_small_messages_sends_no_batches() {
    let mut transport = rylm_components::Transport::default();
    transport.bound.max_message_size = 64 * 1024;
    let master = Master::builder("m")
        .heartbeat(QUICK)
        .transport(transport)
        .start()
        .await
        .expect("starts");
    ten_calls_one_message_each(master, &[(BATCH, "64")]).await;
}

/// Ten calls through `master` to a worker announced with `headers`, once they all wait: the
/// worker gets each in a message of its own, and answers each so.
async fn ten_calls_one_message_each(master: Master, headers: &[(&str, &str)]) {
    let fake = Fake::connect(&master).await;
    let client = client(&master).await;
    let calls = spawn_echoes(&client, 10);
    announce_when_waiting(&master, &fake, 10, 10, headers).await;
    let messages = receive_jobs(&fake, 10).await;
    assert!(messages.iter().all(|bodies| bodies.len() == 1), "no batch");
    answer_one_by_one(&fake, messages).await;
    for call in calls {
        call.await.expect("task").expect("answered");
    }
    master.shutdown().await.expect("clean");
}

/// Answers each job in `messages` (one body each) in a message of its own.
async fn answer_one_by_one(fake: &Fake, messages: Vec<Vec<Bytes>>) {
    for bodies in messages {
        let job = fake
            .codec
            .decode_frames(&[Bytes::from_static(&rylm_message::MARKER), bodies[0].clone()])
            .expect("decodes");
        fake.send(&job.reply(job.payload.clone())).await;
    }
}
