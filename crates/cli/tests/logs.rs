//! Libraries that log through the `log` crate (fred, Redis's client) reach `rylm`'s own log:
//! the binary bridges `log` records into `tracing`.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The first line of `rylm <args> gilmour-proxy` (with fred's records enabled) on standard
/// error that comes from fred (its `log` target is `fred::...`), within 20 s.
async fn first_fred_line(redis: &str, before: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args(before)
        .args(["gilmour-proxy", "--redis", redis, "--listen", &listen])
        .env("RUST_LOG", "fred=trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("rylm starts");
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("fred") {
                return Some(line);
            }
        }
        None
    })
    .await;
    let _ = child.kill().await;
    found
        .expect("a fred record within 20 s")
        .expect("stderr stayed open")
}

/// `rylm gilmour-proxy` connecting to Redis with fred's records enabled: a line of fred's
/// shows on standard error, formatted by `tracing`.
#[tokio::test]
async fn log_records_of_libraries_reach_the_log() {
    let Some(redis) = rylm_testkit::redis_url("log_records_of_libraries_reach_the_log") else {
        return;
    };
    let line = first_fred_line(&redis, &[]).await;
    // The tracing formatter writes the level; a raw `log` line would not be there at all.
    assert!(
        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
            .iter()
            .any(|level| line.contains(level)),
        "{line}"
    );
}

/// With `--log-format json`, the same records come as one JSON object per line.
#[tokio::test]
async fn as_json_each_log_line_is_an_object() {
    let Some(redis) = rylm_testkit::redis_url("as_json_each_log_line_is_an_object") else {
        return;
    };
    let line = first_fred_line(&redis, &["--log-format", "json"]).await;
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert!(value["level"].is_string(), "{line}");
    assert!(
        value["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("fred")),
        "{line}"
    );
}
