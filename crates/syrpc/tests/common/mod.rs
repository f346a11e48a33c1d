//! Shared by the SyRPC integration tests: settings for the provisioned broker, with an app name
//! of its own per test so that tests never see each other's queues.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rylm_syrpc::{Handlers, Server, Settings};

/// Every wait in these tests has this deadline.
pub const DEADLINE: Duration = Duration::from_secs(15);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Settings on the provisioned broker with a fresh app name, or `None` to skip.
pub fn settings(test: &str) -> Option<Settings> {
    let url = rylm_testkit::amqp_url(test)?;
    let app = format!(
        "t{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        test
    );
    Some(
        Settings::new(app, url)
            .with_connect_timeouts(Duration::from_secs(10), Some(Duration::from_secs(30))),
    )
}

/// Two result ids that land in the same result queue.
pub fn ids_in_one_bucket(settings: &Settings) -> (rylm_syrpc::ResultId, rylm_syrpc::ResultId) {
    let first = rylm_syrpc::ResultId::new();
    let bucket = settings.bucket(first.as_str());
    loop {
        let other = rylm_syrpc::ResultId::new();
        if settings.bucket(other.as_str()) == bucket {
            return (first, other);
        }
    }
}

/// Runs `server.serve(handlers)` in a task until the returned sender fires or is dropped; the
/// task's handle says how serving ended.
pub fn serve_in_background(
    server: Server,
    handlers: Handlers,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), rylm_syrpc::Error>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server
            .serve(handlers, async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, serving)
}

/// Runs a broker's `rabbitmqctl` script with `args` within `limit` and returns its standard
/// output, or the reason it failed.
pub async fn rabbitmqctl_output(
    ctl: &str,
    args: &[&str],
    limit: Duration,
) -> Result<String, String> {
    let output = tokio::process::Command::new(ctl)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(limit, output)
        .await
        .map_err(|_| format!("rabbitmqctl {args:?} did not finish"))?
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Runs the private broker's `rabbitmqctl` with `args`, within a deadline, and fails the test
/// if it fails.
pub async fn rabbitmqctl(ctl: &str, args: &[&str]) {
    if let Err(reason) = rabbitmqctl_output(ctl, args, Duration::from_secs(120)).await {
        panic!("{reason}");
    }
}

/// One call of a steady stream: its number (also its data), its answer, when it started and
/// when it ended.
pub type StreamedCall = (
    u64,
    Result<serde_json::Value, rylm_syrpc::Error>,
    std::time::Instant,
    std::time::Instant,
);

/// Calls `echo` on `client` every `every`, each within `deadline`, until the returned sender
/// says stop; the task then waits for every call and returns them all.
pub fn steady_calls(
    client: rylm_syrpc::Client,
    every: Duration,
    deadline: Duration,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Vec<StreamedCall>>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let stream = tokio::spawn(async move {
        let mut calls = tokio::task::JoinSet::new();
        let mut n = 0u64;
        while !*stopped.borrow() {
            let client = client.clone();
            calls.spawn(async move {
                let started = std::time::Instant::now();
                let answer = client.call("echo", &n, Some(deadline)).await;
                (n, answer, started, std::time::Instant::now())
            });
            n += 1;
            let _ = tokio::time::timeout(every, stopped.changed()).await;
        }
        let mut answers = Vec::new();
        while let Some(done) = calls.join_next().await {
            answers.push(done.expect("call task"));
        }
        answers
    });
    (stop, stream)
}

/// Stops a stream of `steady_calls` whose calls each have `deadline`, and returns every call
/// once all have ended (within the deadline and half a minute).
pub async fn end_stream(
    stop: tokio::sync::watch::Sender<bool>,
    stream: tokio::task::JoinHandle<Vec<StreamedCall>>,
    deadline: Duration,
) -> Vec<StreamedCall> {
    let _ = stop.send(true);
    tokio::time::timeout(deadline + Duration::from_secs(30), stream)
        .await
        .expect("every call ends")
        .expect("stream task")
}

/// The calls of a stream not answered with their own number, and why.
pub fn wrong_answers(answers: &[StreamedCall]) -> Vec<(u64, Result<serde_json::Value, String>)> {
    answers
        .iter()
        .filter(|(n, answer, _, _)| answer.as_ref().ok() != Some(&serde_json::json!(n)))
        .map(|(n, answer, _, _)| (*n, answer.as_ref().cloned().map_err(|e| e.to_string())))
        .collect()
}
