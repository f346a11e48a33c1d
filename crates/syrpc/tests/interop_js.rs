//! rylm's SyRPC against the published JavaScript package (npm `syrpc@1.0.6`, run with Node):
//! the JavaScript client calls a rylm server, and a rylm client calls the JavaScript server,
//! with non-ASCII data and a remote exception.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, serve_in_background, settings};
use rylm_syrpc::{Client, Error, Handlers, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/peer.js");

fn node(node: &str, modules: &str, url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(node);
    command
        .arg(PEER)
        .args(args)
        .env("NODE_PATH", modules)
        .env("RYLM_AMQP_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// Runs the JavaScript client once and returns what it printed.
async fn js_call(
    peers: &(String, String),
    url: &str,
    app: &str,
    type_: &str,
    data: &Value,
) -> Value {
    let data = data.to_string();
    let output = node(&peers.0, &peers.1, url, &["client", app, type_, &data]).output();
    let output = tokio::time::timeout(Duration::from_secs(40), output)
        .await
        .expect("the JavaScript client finishes")
        .expect("node runs");
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("the JavaScript client printed {line:?}: {e}"))
}

#[tokio::test]
async fn the_javascript_client_calls_a_rylm_server() {
    let Some(settings) = settings("js_client") else {
        return;
    };
    let Some(peers) = rylm_testkit::node_peers("the_javascript_client_calls_a_rylm_server") else {
        return;
    };
    assert!(
        Path::new(&peers.1).join("syrpc").is_dir(),
        "syrpc is installed in {}",
        peers.1
    );
    let server = Server::connect(settings.clone().with_prefetch(2))
        .await
        .expect("server");
    let handlers = Handlers::new()
        .on("echo", |data| async move { Ok::<_, String>(data) })
        .on("fail", |data| async move {
            Err::<Value, _>(format!("rylm refused {data}"))
        });
    let (stop, serving) = serve_in_background(server, handlers);

    let data = json!({"text": "Grüße aus Zürich, 東京 ✓", "list": [1, "ü", {"nested": true}]});
    let answer = js_call(&peers, &settings.url, &settings.app_name, "echo", &data).await;
    assert_eq!(answer, json!({ "result": data }));

    let answer = js_call(
        &peers,
        &settings.url,
        &settings.app_name,
        "fail",
        &json!("ä"),
    )
    .await;
    assert_eq!(answer, json!({ "exception": "rylm refused \"ä\"" }));

    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, serving)
        .await
        .expect("the server stops")
        .expect("task")
        .expect("served cleanly");
}

#[tokio::test]
async fn a_rylm_client_calls_the_javascript_server() {
    let Some(settings) = settings("js_server") else {
        return;
    };
    let Some(peers) = rylm_testkit::node_peers("a_rylm_client_calls_the_javascript_server") else {
        return;
    };
    let mut child = node(
        &peers.0,
        &peers.1,
        &settings.url,
        &["server", &settings.app_name, "2"],
    )
    .spawn()
    .expect("node starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the JavaScript server gets ready")
        .expect("reads its output");
    assert_eq!(ready.as_deref(), Some("ready"));

    let client = Client::connect(settings).await.expect("client");
    let data = json!(["naïve café", "Ελληνικά", 42]);
    assert_eq!(
        client
            .call("echo", &data, Some(DEADLINE))
            .await
            .expect("echo"),
        data
    );
    match client
        .call("fail", &json!({"why": "ß"}), Some(DEADLINE))
        .await
    {
        Err(Error::Remote { exception, .. }) => {
            assert_eq!(exception, json!("failed on purpose: {\"why\":\"ß\"}"))
        }
        other => panic!("expected the JavaScript server's exception, got {other:?}"),
    }
    let last = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the JavaScript server finishes")
        .expect("reads its output");
    assert_eq!(last.as_deref(), Some(r#"{"served":2}"#));
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success());
}
