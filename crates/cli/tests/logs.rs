//! Libraries that log through the `log` crate (fred, Redis's client) reach `rylm`'s own log:
//! the binary bridges `log` records into `tracing`. A flood of frames that do not decode makes
//! a bounded number of lines.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Starts `rylm ARGS` with `RUST_LOG=filter` and its standard error piped: the child, and
/// the lines of its standard error.
fn with_log(
    args: &[String],
    filter: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut child = common::Rylm::command(None, args)
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("rylm starts");
    let stderr = child.stderr.take().expect("piped");
    (child, BufReader::new(stderr).lines())
}

/// The first line of `rylm <args> gilmour-proxy` (with fred's records enabled) on standard
/// error that comes from fred (its `log` target is `fred::...`), within 20 s.
async fn first_fred_line(redis: &str, before: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut args: Vec<String> = before.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["gilmour-proxy", "--redis", redis, "--listen", &listen].map(str::to_owned));
    let (mut child, mut lines) = with_log(&args, "fred=trace");
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

/// 10,000 frames that do not decode, sent to a `rylm server`'s callers' port: every one is
/// counted, and the log (warnings by default) says so in a bounded number of lines.
#[tokio::test]
async fn ten_thousand_malformed_frames_make_a_bounded_number_of_log_lines() {
    use rylm_components::rylm_transport::{Kind, Options, Socket};
    let ports = common::Ports::new();
    let pull = ports.pull.clone();
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut args = ports.server("s");
    args.extend(["--admin".to_owned(), admin.clone()]);
    let (mut child, mut stderr) = with_log(&args, "warn");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let kept = lines.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            kept.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    let started = std::time::Instant::now();
    while !lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|l| l.contains("Ctrl-C stops"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server starts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let raw = Socket::new(Kind::Dealer, &Options::default()).expect("a socket");
    raw.connect(&pull).await.expect("connects");
    const FRAMES: usize = 10_000;
    for _ in 0..FRAMES {
        raw.send(vec![bytes::Bytes::from_static(b"not a rylm message")])
            .await
            .expect("sends");
    }
    let counted = async {
        loop {
            if let Ok((200, body)) = rylm_testkit::http_get(&admin, "/metrics").await {
                let malformed =
                    rylm_testkit::metric_sample(&body, "rylm_results_malformed_total", None);
                if malformed >= FRAMES as f64 {
                    return malformed;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let malformed = tokio::time::timeout(Duration::from_secs(60), counted)
        .await
        .expect("every frame counted within 60 s");
    assert_eq!(malformed, FRAMES as f64);
    let _ = child.kill().await;
    let _ = reader.await;
    let about: Vec<String> = lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|l| l.contains("does not decode") || l.contains("held back"))
        .cloned()
        .collect();
    // 10 per 10 s window, and a line counting what was held back before the next one.
    assert!(
        !about.is_empty() && about.len() <= 40,
        "{} lines: {about:#?}",
        about.len()
    );
}
