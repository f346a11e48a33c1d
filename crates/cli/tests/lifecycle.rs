//! Every long-running `rylm` command stops on SIGTERM (as systemd, Kubernetes and Docker stop
//! it): it drains what it holds, answers it, and exits with status 0 within its bound.

mod common;

use std::time::Duration;

use common::{DEADLINE, Ports, Rylm, free_address, until_ok};
use rylm_components::Client;

/// The longest a stop may take: the default drain (10 s) and the closing after it.
const STOP: Duration = Duration::from_secs(16);

async fn ready_client(db: &str) -> Client {
    let client = Client::connect(db, DEADLINE).await.expect("connects");
    until_ok(DEADLINE, || client.eval("echo", "up")).await;
    client
}

#[tokio::test]
async fn sigterm_drains_a_server_and_answers_the_call_in_hand() {
    let ports = Ports::new();
    let server = Rylm::start(&ports.server("s")).await;
    let client = ready_client(&ports.db).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep:1500", "drained").await })
    };
    // The call reaches the server well within this; nothing outside it tells when it has.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = server.terminate(STOP).await;
    assert!(status.success(), "{status}");
    let answer = call.await.expect("task").expect("answered before the stop");
    assert_eq!(&answer[..], b"drained");
    eprintln!("server: SIGTERM to exit {took:?}");
}

#[tokio::test]
async fn sigterm_drains_a_worker_then_its_master() {
    let ports = Ports::new();
    let master = Rylm::start(&ports.master("m")).await;
    let worker = Rylm::start(&["worker", "--db", &ports.db, "--credits", "2"]).await;
    let client = ready_client(&ports.db).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep:1500", "held").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = worker.terminate(STOP).await;
    assert!(status.success(), "worker: {status}");
    assert_eq!(&call.await.expect("task").expect("answered")[..], b"held");
    eprintln!("worker: SIGTERM to exit {took:?}");
    let (status, took) = master.terminate(STOP).await;
    assert!(status.success(), "master: {status}");
    eprintln!("master: SIGTERM to exit {took:?}");
}

#[tokio::test]
async fn sigterm_stops_a_gateway_and_a_service() {
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let workers = free_address();
    let gateway = Rylm::start(&["gateway", "--listen", &listen, "--workers", &workers]).await;
    let (status, _) = gateway.terminate(STOP).await;
    assert!(status.success(), "gateway: {status}");
    let bind = free_address();
    let service = Rylm::start(&[
        "service", "--name", "s", "--bind", &bind, "--secret", "s3cret",
    ])
    .await;
    let (status, _) = service.terminate(STOP).await;
    assert!(status.success(), "service: {status}");
}

/// The threads of process `pid`, from `/proc`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_master_and_a_worker_on_one_thread_each_answer_many_calls_and_drain() {
    let ports = Ports::new();
    let mut master_args = ports.master("m1");
    master_args.extend(["--threads".to_owned(), "1".to_owned()]);
    let master = Rylm::start(&master_args).await;
    let worker = Rylm::start(&[
        "worker",
        "--db",
        &ports.db,
        "--credits",
        "16",
        "--threads",
        "1",
    ])
    .await;
    let client = ready_client(&ports.db).await;
    // One thread each: the runtime's, which is the main thread (the default has a thread per
    // core besides it).
    for process in [&master, &worker] {
        let pid = process.child.id().expect("running");
        assert_eq!(threads(pid), 1, "{:?}", process.args);
    }
    let calls: Vec<_> = (0..200)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.eval("upper", format!("call {n}")).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("task").expect("answered");
        assert_eq!(answer, format!("CALL {n}").as_bytes());
    }
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.eval("sleep:1000", "held").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = worker.terminate(STOP).await;
    assert!(status.success(), "worker: {status}");
    assert_eq!(&held.await.expect("task").expect("answered")[..], b"held");
    let (status, _) = master.terminate(STOP).await;
    assert!(status.success(), "master: {status}");
}
