//! Real pylm peers (pylm 0.14.4 from PyPI, in the environment `cargo xtask test` creates) against
//! rylm servers in pylm wire mode.

use std::time::Duration;

use bytes::Bytes;
use rylm_components::{Functions, Server};
use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_client.py");

fn functions() -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(String::from_utf8_lossy(&p).to_uppercase()))
        })
        .add("reverse", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(
                String::from_utf8_lossy(&p)
                    .chars()
                    .rev()
                    .collect::<String>(),
            ))
        })
        .add("fail", |_p: Bytes| async move {
            Err::<Bytes, _>("failed on purpose")
        })
}

/// A pylm Client calls a rylm Server: eval, a job of many messages, a failing function (pylm's
/// answer `b"0"`), and the cache's set, get and delete, with its raw-bytes replies.
#[tokio::test]
async fn a_pylm_client_calls_a_rylm_server() {
    let Some(python) = rylm_testkit::pylm_python("a_pylm_client_calls_a_rylm_server") else {
        return;
    };
    let server = Server::builder("rylmserver")
        .pylm_wire()
        .functions(functions())
        .start()
        .await
        .expect("starts");
    let run = tokio::process::Command::new(&python)
        .arg(SCRIPT)
        .arg("rylmserver")
        .arg(server.db_address())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("pylm finishes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let got: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "pylm printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(got["eval"], "HELLO FROM PYLM");
    let expected: Vec<String> = (0..10).map(|i| format!("{i}{i}")).collect();
    assert_eq!(got["job"], serde_json::json!(expected));
    assert_eq!(
        got["fail"], "0",
        "pylm peers get b\"0\" for a failed function"
    );
    assert_eq!(got["set"], "a-key");
    assert_eq!(got["get"], "a value");
    assert_eq!(got["delete"], "a value");
    assert_eq!(got["missing"], "");
    assert_eq!(got["new_key"], 36, "a set without a key answers a new uuid");
    server.shutdown().await.expect("clean");
}
