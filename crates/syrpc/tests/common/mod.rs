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

/// Runs the private broker's `rabbitmqctl` with `args`, within a deadline, and fails the test
/// if it fails.
pub async fn rabbitmqctl(ctl: &str, args: &[&str]) {
    let output = tokio::process::Command::new(ctl)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("rabbitmqctl finishes")
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
