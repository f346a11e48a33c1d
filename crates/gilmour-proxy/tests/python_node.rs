//! The example node in Python (`examples/py/gilmour_node.py`, standard library only) joins
//! through the proxy: it registers, a Rust node calls its service and signals its wildcard
//! slot, it calls a Rust service through the proxy, and it deregisters.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use rylm_gilmour::node::Node;
use rylm_gilmour_proxy::{Proxy, ProxyConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(20);
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/py/gilmour_node.py"
);

#[tokio::test]
async fn a_python_node_registers_serves_and_calls_through_the_proxy() {
    let test = "a_python_node_registers_serves_and_calls_through_the_proxy";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let Some(python) = rylm_testkit::pylm_python(test) else {
        return;
    };
    let mut config = ProxyConfig::new(&url);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.token = Some("py-secret".to_owned());
    let proxy = Proxy::start(config).await.unwrap();
    let rust = Node::connect(&url).await.unwrap();
    let prefix = format!("py{}", uuid::Uuid::new_v4().simple());
    let double = format!("{prefix}.double");
    rust.reply_to(&double, "rust", DEADLINE, |v: Value| async move {
        Ok(json!(v.as_i64().unwrap_or(0) * 2))
    })
    .await
    .unwrap();

    let mut child = tokio::process::Command::new(&python)
        .arg(SCRIPT)
        .args(["--proxy", &format!("http://{}", proxy.local_addr())])
        .args(["--token", "py-secret", "--prefix", &prefix])
        .args(["--call", &double, "--message", "21"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs the Python node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the Python node says something in time")
            .unwrap()
            .expect("a line")
    };
    let registered = next().await;
    assert!(registered.starts_with("registered "), "{registered}");
    let called = next().await;
    assert_eq!(
        called,
        format!(
            "called {double}: {}",
            json!({"code": 200, "length": 1, "messages": [{"code": 200, "data": 42}]})
        )
    );

    let reply = rust
        .request(
            &format!("{prefix}.upper"),
            json!("hello from rust"),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!((reply.code(), reply.data), (200, json!("HELLO FROM RUST")));
    let refused = rust
        .request(&format!("{prefix}.upper"), json!(7), DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        refused.code(),
        422,
        "the node's own error status is the code"
    );
    assert_eq!(
        rust.signal(&format!("{prefix}.events.created"), json!({"id": 7}))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        next().await,
        format!("signal {prefix}.events.created: {{\"id\":7}}")
    );

    child.stdin.take().unwrap().shutdown().await.unwrap();
    let deregistered = next().await;
    assert!(deregistered.starts_with("deregistered "), "{deregistered}");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let gone = rust
        .request(&format!("{prefix}.upper"), json!("x"), DEADLINE)
        .await
        .unwrap();
    assert_eq!(gone.code(), 404, "deregistered: nobody serves the topic");
    rust.shutdown().await;
    proxy.shutdown().await;
}
