//! `cargo xtask bench gateway`: HTTP requests through the gateway to two workers, beside a bare
//! hyper hello-world server in the same run (the baseline of what HTTP allows here).
//!
//! The load generator is our own, on hyper's client: N keep-alive connections, each sending
//! requests one after the other for a fixed duration; every latency recorded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rylm_benches::{Summary, peak_rss_kib, table};
use rylm_components::{Functions, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};

const DURATION: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<()> {
    let gateway = HttpGateway::start(GatewayConfig::default()).await?;
    let functions = || {
        Functions::new().add("hello", |_p: Bytes| async move {
            Ok::<_, String>(Bytes::from_static(b"hello, world"))
        })
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::builder(functions())
                .credits(64)
                .connect(gateway.worker_address())
                .await?,
        );
    }
    let bare = bare_hyper().await?;
    // Let the workers join before measuring.
    load(
        gateway.local_addr(),
        "/hello",
        1,
        Duration::from_millis(500),
        "warm-up",
    )
    .await
    .ok();

    let mut rows = Vec::new();
    for connections in [8usize, 32] {
        let through = load(
            gateway.local_addr(),
            "/hello",
            connections,
            DURATION,
            &format!("gateway + 2 workers, {connections} connections"),
        )
        .await?;
        let baseline = load(
            bare,
            "/",
            connections,
            DURATION,
            &format!("bare hyper hello-world, {connections} connections"),
        )
        .await?;
        rows.push((through, baseline));
    }
    let pairs: Vec<(&Summary, &Summary)> = rows.iter().map(|(a, b)| (a, b)).collect();
    println!("{}", table(&pairs));
    println!("| baseline run | requests | req/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    for (_, b) in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms |",
            b.name,
            b.count,
            b.rate(),
            b.p50.as_secs_f64() * 1e3,
            b.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "\npeak RSS of the bench process (gateway, two workers, bare hyper and the load generator): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    for worker in workers {
        worker.shutdown().await;
    }
    gateway.shutdown().await?;
    Ok(())
}

/// A bare hyper server answering "hello, world".
async fn bare_hyper() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"hello, world",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

/// `connections` keep-alive connections sending requests back to back for `duration`.
async fn load(
    address: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
    name: &str,
) -> Result<Summary> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let path = path.to_owned();
        tasks.spawn(async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                sender.ready().await?;
                let request = Request::post(path.as_str())
                    .header("host", "bench")
                    .body(Full::new(Bytes::from_static(b"x")))?;
                let sent = Instant::now();
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                if status == StatusCode::OK {
                    latencies.push(sent.elapsed());
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.context("a load task")??);
    }
    Ok(Summary::new(name, latencies, started.elapsed()))
}
