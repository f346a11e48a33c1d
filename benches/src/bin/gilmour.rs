//! `cargo xtask bench gilmour`: Gilmour requests on a real Redis, one at a time and 32 in
//! flight, three ways, beside a raw Redis round trip in the same run (a PUBLISH to a subscriber
//! that PUBLISHes back on another channel: the baseline of what Redis pub/sub allows):
//!
//! - through the Rust API: a rylm node requests, another answers;
//! - through the proxy to a node: a rylm node requests a service that a `rylm gilmour-proxy`
//!   process calls on an HTTP node (hyper, in this process);
//! - through the proxy from a node: an HTTP client POSTs `/request/:id` to the proxy, whose
//!   request a rylm node answers.
//!
//! Each subject runs three times, interleaved with the raw round trip; the table gives the
//! ratio's min / median / max. Then 1,000 more nodes (a service and a slot each) register with
//! the proxy: its RSS per node, and the calls through it again.
//!
//! xtask provisions Redis, passes `RYLM_REDIS_URL`, and reports Redis's peak memory after the
//! run; this bench reports its own and the proxy's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fred::prelude::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rylm_benches::{Paired, Summary, measure, paired_table, peak_rss_kib, rss_kib, spawn};
use rylm_gilmour::node::Node;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ONE_AT_A_TIME: usize = 2_000;
const CONCURRENT_TOTAL: usize = 5_000;
const CONCURRENT: usize = 32;
const DEADLINE: Duration = Duration::from_secs(30);
const REPETITIONS: usize = 3;
/// Nodes registered with the proxy besides the measured one, for its cost per node.
const EXTRA_NODES: usize = 1000;

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("RYLM_REDIS_URL")
        .context("RYLM_REDIS_URL is not set: run `cargo xtask bench gilmour`")?;
    let raw = Arc::new(RawRoundTrip::start(&url).await?);
    let requester = Arc::new(Node::connect(&url).await?);
    let responder = Node::connect(&url).await?;
    responder
        .reply_to(
            "bench.echo",
            "bench",
            DEADLINE,
            |v: Value| async move { Ok(v) },
        )
        .await?;

    // The proxy, its own process, with an HTTP node behind it.
    let rylm = std::env::current_exe()?
        .parent()
        .context("the benches' folder")?
        .join("rylm");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let proxy_base = format!("http://127.0.0.1:{port}");
    let proxy = spawn(
        "rylm gilmour-proxy",
        &rylm,
        &[
            "gilmour-proxy".into(),
            "--redis".into(),
            url.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
    )?;
    let node_port = serve_http_node().await?;
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let ready = Instant::now() + Duration::from_secs(10);
    let registered = loop {
        let body = json!({"port": node_port, "services": [{"topic": "bench.http", "group": "bench", "path": "/echo", "timeout": 10}]});
        match post(&http, &format!("{proxy_base}/nodes"), &body).await {
            Ok((200, answer)) => break answer,
            _ if Instant::now() < ready => tokio::time::sleep(Duration::from_millis(50)).await,
            other => bail!("the proxy did not take the node: {other:?}"),
        }
    };
    eprintln!("the HTTP node is registered with the proxy");
    let id = registered["id"].as_str().context("a node id")?.to_owned();
    let publish_url = format!("{proxy_base}/request/{id}");

    let data = json!({"text": "x".repeat(64)});
    // A rylm node's requests to `topic`: the Rust API (`bench.echo`, a rylm responder) or
    // through the proxy to the HTTP node (`bench.http`).
    let via_node = |topic: &'static str, name: &str, total, at_once| {
        let (requester, data) = (requester.clone(), data.clone());
        let name = name.to_owned();
        async move {
            measure(&name, total, at_once, move |_| {
                let (requester, data) = (requester.clone(), data.clone());
                async move {
                    let reply = requester.request(topic, data, DEADLINE).await?;
                    if reply.code() != 200 {
                        bail!("code {}: {}", reply.code(), reply.data);
                    }
                    Ok(())
                }
            })
            .await
        }
    };
    let api = |name: &str, total, at_once| via_node("bench.echo", name, total, at_once);
    let to_node = |name: &str, total, at_once| via_node("bench.http", name, total, at_once);
    let from_node = |name: &str, total, at_once| {
        let (http, data, publish_url) = (http.clone(), data.clone(), publish_url.clone());
        let name = name.to_owned();
        async move {
            measure(&name, total, at_once, move |_| {
                let (http, publish_url) = (http.clone(), publish_url.clone());
                let body = json!({"topic": "bench.echo", "message": data.clone(), "timeout": 30});
                async move {
                    let (status, answer) = post(&http, &publish_url, &body).await?;
                    if status != 200 {
                        bail!("status {status}: {answer}");
                    }
                    Ok(())
                }
            })
            .await
        }
    };
    let baseline = |name: &str, total, at_once| {
        let raw = raw.clone();
        let name = name.to_owned();
        async move {
            measure(&name, total, at_once, move |_| {
                let raw = raw.clone();
                async move { raw.call().await }
            })
            .await
        }
    };

    // Warm-up, then the measured runs: each subject's repetitions interleaved with the raw
    // round trip's, so that the machine's drift hits both alike.
    eprintln!("warming up");
    api("warm-up", 300, 8).await?;
    to_node("warm-up", 300, 8).await?;
    from_node("warm-up", 300, 8).await?;
    baseline("warm-up", 300, 8).await?;
    let modes = [
        (ONE_AT_A_TIME, 1, "one at a time".to_owned()),
        (
            CONCURRENT_TOTAL,
            CONCURRENT,
            format!("{CONCURRENT} in flight"),
        ),
    ];
    // (label, subject runs, baseline runs)
    let mut rows: Vec<(String, Vec<Summary>, Vec<Summary>)> = Vec::new();
    for (total, at_once, label) in &modes {
        let (total, at_once) = (*total, *at_once);
        for which in [
            "rylm API",
            "rylm API -> proxy -> HTTP node",
            "HTTP node -> proxy /request -> rylm node",
        ] {
            let (mut subject, mut base) = (Vec::new(), Vec::new());
            for _ in 0..REPETITIONS {
                let name = format!("{which}, {label}");
                subject.push(match which {
                    "rylm API" => api(&name, total, at_once).await?,
                    "rylm API -> proxy -> HTTP node" => to_node(&name, total, at_once).await?,
                    _ => from_node(&name, total, at_once).await?,
                });
                base.push(
                    baseline(&format!("raw Redis round trip, {label}"), total, at_once).await?,
                );
            }
            rows.push((format!("{which}, {label}"), subject, base));
        }
    }

    // The proxy holding 1,000 more nodes: its memory per node, and the same calls through it.
    let before = rss_kib(proxy.child.id()).unwrap_or(0);
    let mut extra = Vec::with_capacity(EXTRA_NODES);
    for n in 0..EXTRA_NODES {
        let port = serve_http_node().await?;
        let body = json!({
            "port": port,
            "services": [{"topic": format!("bench.extra.{n}"), "group": "bench", "path": "/echo"}],
            "slots": [{"topic": format!("bench.extra.evt.{n}"), "path": "/echo"}],
        });
        let (status, answer) = post(&http, &format!("{proxy_base}/nodes"), &body).await?;
        if status != 200 {
            bail!("the proxy did not take node {n}: {answer}");
        }
        extra.push(port);
    }
    let after = rss_kib(proxy.child.id()).unwrap_or(0);
    let per_node = after.saturating_sub(before) as f64 / EXTRA_NODES as f64;
    eprintln!("{EXTRA_NODES} more nodes registered: {per_node:.1} KiB of proxy RSS each");
    for (total, at_once, label) in &modes {
        let (total, at_once) = (*total, *at_once);
        for which in [
            "rylm API -> proxy -> HTTP node",
            "HTTP node -> proxy /request -> rylm node",
        ] {
            let (mut subject, mut base) = (Vec::new(), Vec::new());
            for _ in 0..REPETITIONS {
                let name = format!("{which}, {label}, {EXTRA_NODES} nodes registered");
                subject.push(if which.starts_with("rylm API") {
                    to_node(&name, total, at_once).await?
                } else {
                    from_node(&name, total, at_once).await?
                });
                base.push(
                    baseline(&format!("raw Redis round trip, {label}"), total, at_once).await?,
                );
            }
            rows.push((
                format!("{which}, {label}, {EXTRA_NODES} nodes registered"),
                subject,
                base,
            ));
        }
    }
    let paired: Vec<Paired<'_>> = rows
        .iter()
        .map(|(label, subject, base)| Paired {
            label: label.clone(),
            subject,
            baseline: base,
        })
        .collect();
    println!(
        "{REPETITIONS} repetitions, each interleaved with the raw Redis round trip\n\n{}",
        paired_table(&paired)
    );
    println!(
        "proxy RSS: {before} KiB with one node, {after} KiB with {} ({per_node:.1} KiB per node)",
        EXTRA_NODES + 1
    );
    println!(
        "peak RSS: bench process (requesters, responder, HTTP nodes, raw round trip) {} KiB, {} {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0),
        proxy.name,
        peak_rss_kib(proxy.child.id()).unwrap_or(0),
    );
    drop(proxy);
    Ok(())
}

async fn post(
    http: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    body: &Value,
) -> Result<(u16, Value)> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = tokio::time::timeout(DEADLINE, http.request(request))
        .await
        .context("the proxy is silent")??;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// An HTTP node: answers its health check, and echoes a call's data as its body.
async fn serve_http_node() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let call: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let data = call.get("data").cloned().unwrap_or(Value::Null).to_string();
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(data))))
                },
            );
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(port)
}

/// The baseline: a requester PUBLISHes `<id>` on a channel, a responder PUBLISHes it back on
/// another; the requester's one subscription matches answers by id.
struct RawRoundTrip {
    commands: Client,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl RawRoundTrip {
    async fn start(url: &str) -> Result<RawRoundTrip> {
        let config = Config::from_url(url)?;
        let build = || Builder::from_config(config.clone());
        let commands = build().build()?;
        commands.init().await?;
        let responder_commands = build().build()?;
        responder_commands.init().await?;
        let responder = build().build_subscriber_client()?;
        responder.init().await?;
        let requester = build().build_subscriber_client()?;
        requester.init().await?;
        let mut requests = responder.message_rx();
        responder.subscribe("bench.raw.request").await?;
        tokio::spawn(async move {
            let _keep = responder;
            while let Ok(message) = requests.recv().await {
                let id = message
                    .value
                    .as_bytes()
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                let _: Result<i64, _> = responder_commands.publish("bench.raw.response", id).await;
            }
        });
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
        let mut responses = requester.message_rx();
        requester.subscribe("bench.raw.response").await?;
        let answered = waiting.clone();
        tokio::spawn(async move {
            let _keep = requester;
            while let Ok(message) = responses.recv().await {
                let id = message
                    .value
                    .as_bytes()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .and_then(|s| s.parse::<u64>().ok());
                let done = id.and_then(|id| {
                    answered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id)
                });
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        });
        Ok(RawRoundTrip {
            commands,
            waiting,
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn call(&self) -> Result<()> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, answered) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, done);
        let _: i64 = self
            .commands
            .publish("bench.raw.request", id.to_string())
            .await?;
        match tokio::time::timeout(DEADLINE, answered).await {
            Ok(Ok(())) => Ok(()),
            _ => bail!("no raw answer within {DEADLINE:?}"),
        }
    }
}
