//! `rylm master`, `rylm worker` and `rylm server` processes under faults: a worker killed or
//! stopped under a steady stream (every answer exactly once; the stopped one readmitted), a
//! master killed while calls are in flight (they fail at once, and everything recovers by
//! itself), a thousand short-lived clients (the master's memory comes back), and a client that
//! sends ten times what a server admits (`busy` answers, bounded memory).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{DEADLINE, Job, Ports, Rylm, exactly_once, until_ok};
use rylm_components::{Client, Error};

fn payloads(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("p{i}")).collect()
}

async fn master_and_workers(ports: &Ports) -> (Rylm, Rylm, Rylm) {
    let master = Rylm::start(&ports.master("m")).await;
    let worker = ["worker", "--db", &ports.db, "--credits", "4"];
    let (a, b) = (Rylm::start(&worker).await, Rylm::start(&worker).await);
    (master, a, b)
}

/// Runs `pid` calls until both workers have answered one (bounded).
async fn both_serve(db: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pids = HashSet::new();
    while pids.len() < 2 {
        assert!(Instant::now() < deadline, "a worker was not (re)admitted");
        let job = Job::start(None, db, "pid", &payloads(40));
        pids.extend(
            job.finish(Duration::from_secs(60))
                .await
                .into_values()
                .flatten(),
        );
    }
}

#[tokio::test]
async fn a_worker_killed_under_a_steady_stream_loses_and_duplicates_nothing() {
    let ports = Ports::new();
    let (_master, doomed, _other) = master_and_workers(&ports).await;
    both_serve(&ports.db).await;
    let payloads = payloads(2000);
    let mut job = Job::start(None, &ports.db, "sleep:10", &payloads);
    assert!(job.until(300, DEADLINE).await, "the stream runs");
    doomed.kill().await;
    let results = job.finish(Duration::from_secs(120)).await;
    exactly_once(&payloads, &results);
}

#[tokio::test]
async fn a_worker_stopped_for_five_seconds_is_replaced_then_readmitted() {
    let ports = Ports::new();
    let (_master, stopped, _other) = master_and_workers(&ports).await;
    both_serve(&ports.db).await;
    let payloads = payloads(3000);
    let mut job = Job::start(None, &ports.db, "sleep:10", &payloads);
    assert!(job.until(300, DEADLINE).await, "the stream runs");
    stopped.signal("STOP").await;
    let at = Instant::now();
    let more = job.received() + 300;
    assert!(
        job.until(more, DEADLINE).await,
        "the other worker carries on"
    );
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(at.elapsed())).await;
    stopped.signal("CONT").await;
    let results = job.finish(Duration::from_secs(120)).await;
    // Its late answers, to messages the master had sent elsewhere, were dropped.
    exactly_once(&payloads, &results);
    both_serve(&ports.db).await;
}

#[tokio::test]
async fn calls_in_flight_when_the_master_is_killed_fail_at_once_and_all_recovers() {
    let ports = Ports::new();
    let args = ports.master("m");
    let (master, _a, _b) = master_and_workers(&ports).await;
    let client = Client::connect(&ports.db, DEADLINE)
        .await
        .expect("connects");
    until_ok(DEADLINE, || client.eval("echo", "up")).await;
    // Four of the workers' eight credits: the others serve at once after the restart (a new
    // master counts what a worker still runs for an old one as held).
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (client.eval("sleep:5000", "x").await, started.elapsed())
            })
        })
        .collect();
    // The calls reach the workers well within this; nothing outside tells when they have.
    tokio::time::sleep(Duration::from_millis(300)).await;
    master.kill().await;
    for call in in_flight {
        let (outcome, took) = call.await.expect("task");
        assert!(
            matches!(outcome, Err(Error::ServerGone { .. })),
            "{outcome:?}"
        );
        assert!(took < Duration::from_secs(3), "failed after {took:?}");
    }
    let _master = Rylm::start(&args).await;
    let (answer, took) = until_ok(Duration::from_secs(15), || client.eval("upper", "back")).await;
    assert_eq!(&answer[..], b"BACK");
    eprintln!("master restart: calls succeed again after {took:?}");
    both_serve(&ports.db).await;
}

#[tokio::test]
async fn a_thousand_short_lived_clients_leave_the_masters_memory_as_it_was() {
    let ports = Ports::new();
    let (master, _a, _b) = master_and_workers(&ports).await;
    let one_client = || async {
        let client = Client::connect(&ports.db, DEADLINE)
            .await
            .expect("connects");
        client.eval("echo", "hi").await.expect("answered");
    };
    // Warm up: the allocator's pools and the sockets' buffers reach their working size.
    for _ in 0..300 {
        one_client().await;
    }
    let before = master.rss_kib();
    for _ in 0..1000 {
        one_client().await;
    }
    let after = master.rss_kib();
    eprintln!("master RSS: {before} KiB after 300 clients, {after} KiB after 1,000 more");
    assert!(
        after <= before + 400,
        "the master kept {} KiB for 1,000 clients that left",
        after.saturating_sub(before)
    );
}

#[tokio::test]
async fn a_client_sending_ten_times_what_the_server_admits_gets_busy_and_memory_stays_bounded() {
    let ports = Ports::new();
    let mut args = ports.server("s");
    args.extend(["--max-in-flight".to_owned(), "50".into()]);
    let server = Rylm::start(&args).await;
    let client = Client::connect(&ports.db, DEADLINE)
        .await
        .expect("connects");
    until_ok(DEADLINE, || client.eval("echo", "up")).await;
    let mut busy = 0;
    for _round in 0..10 {
        let calls: Vec<_> = (0..500)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.eval("sleep:200", vec![0u8; 4096]).await })
            })
            .collect();
        for call in calls {
            match call.await.expect("task") {
                Ok(_) => {}
                Err(Error::Remote { kind, .. }) if kind == "busy" => busy += 1,
                Err(other) => panic!("{other}"),
            }
        }
    }
    assert!(busy >= 4000, "only {busy} of 5,000 calls were refused");
    let peak = server.peak_rss_kib();
    eprintln!("server: {busy} of 5,000 calls answered busy; peak RSS {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}
