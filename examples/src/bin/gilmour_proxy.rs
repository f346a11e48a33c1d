//! Gilmour through the HTTP proxy: a node in Python (standard library only) registers with a
//! rylm proxy, serves a request from a Rust node, hears a signal, and calls a Rust service
//! through the proxy; then a composition mixes both.
//!
//! Needs Redis (`RYLM_REDIS_URL`, which `cargo xtask demo` gives) and a Python 3 (`RYLM_PYTHON`,
//! else `python3`). `cargo run -p rylm-examples --bin gilmour_proxy`

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rylm_gilmour::compose::{Composition, Executable, Kind};
use rylm_gilmour::node::Node;
use rylm_gilmour_proxy::{Proxy, ProxyConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<()> {
    let redis = std::env::var("RYLM_REDIS_URL").context("RYLM_REDIS_URL names the Redis to use")?;
    let python = std::env::var("RYLM_PYTHON").unwrap_or_else(|_| "python3".to_owned());

    let mut config = ProxyConfig::new(&redis);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let proxy = Proxy::start(config).await?;
    println!(
        "== the Gilmour proxy listens on http://{}",
        proxy.local_addr()
    );

    let rust = Node::connect(&redis).await?;
    rust.reply_to("demo.double", "rust", DEADLINE, |v: Value| async move {
        Ok(json!(v.as_i64().unwrap_or(0) * 2))
    })
    .await?;
    println!("a Rust node serves demo.double");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/gilmour_node.py");
    let Ok(mut node) = tokio::process::Command::new(&python)
        .arg(script)
        .args(["--proxy", &format!("http://{}", proxy.local_addr())])
        .args([
            "--prefix",
            "demo.py",
            "--call",
            "demo.double",
            "--message",
            "21",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    else {
        println!("(no {python} here; skipping the Python node)");
        return Ok(());
    };
    let stdout = node.stdout.take().context("the node's output")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next = async || -> Result<String> {
        tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .context("the Python node is silent")??
            .context("the Python node stopped")
    };
    println!("python: {}", next().await?);
    println!("python: {}", next().await?);

    let reply = rust
        .request(
            "demo.py.upper",
            json!("served by python, through the proxy"),
            DEADLINE,
        )
        .await?;
    println!(
        "a Rust request to demo.py.upper: {} {}",
        reply.code(),
        reply.data
    );
    if reply.code() != 200 {
        bail!("the Python node did not answer");
    }
    rust.signal("demo.py.events.joined", json!({"who": "rust"}))
        .await?;
    println!("python: {}", next().await?);

    let pipe = Composition::new(
        Kind::Pipe,
        vec![
            Executable::request("demo.double"),
            Executable::request("demo.py.upper"),
        ],
    );
    let composed = rust.compose(&pipe, json!(4), DEADLINE).await;
    println!(
        "pipe(demo.double, demo.py.upper) on 4: code {} data {} (the Python node refuses a number)",
        composed.code,
        composed
            .messages
            .first()
            .map(|m| m.data.clone())
            .unwrap_or_default()
    );

    if let Some(mut stdin) = node.stdin.take() {
        stdin.shutdown().await?;
    }
    println!("python: {}", next().await?);
    let _ = tokio::time::timeout(DEADLINE, node.wait()).await;
    rust.shutdown().await;
    proxy.shutdown().await;
    Ok(())
}
