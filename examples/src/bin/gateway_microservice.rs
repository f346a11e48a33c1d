//! pylm's "turning a master into a microservice", in Rust: an HTTP gateway in front of
//! workers, and a client that speaks plain HTTP.
//!
//! The microservice (the gateway), two workers that connect to it, and the HTTP client run in
//! one process here, each on its own sockets; from a shell the same is `rylm gateway`,
//! `rylm worker --connect ...` and `curl`. `cargo run -p rylm-examples --bin gateway_microservice`

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use rylm_components::{Functions, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};

#[tokio::main]
async fn main() -> Result<()> {
    // The microservice.
    let gateway = HttpGateway::start(GatewayConfig::default()).await?;
    let base = format!("http://{}", gateway.local_addr());
    println!(
        "== an HTTP microservice at {base}; workers connect to {}",
        gateway.worker_address()
    );

    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let call = |method: Method, path: &str, body: &'static str| {
        let request = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())));
        let http = http.clone();
        async move {
            let response = tokio::time::timeout(Duration::from_secs(10), http.request(request?))
                .await
                .context("no HTTP answer in time")??;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(format!("{status} {}", String::from_utf8_lossy(&body)))
        }
    };
    println!(
        "POST /function before any worker -> {}",
        call(Method::POST, "/function", "hello").await?
    );

    // The workers: `function` is what the HTTP path names.
    let functions = || {
        Functions::new().add("function", |body: Bytes| async move {
            Ok::<_, String>(Bytes::from(format!(
                "you sent me {} bytes: {}",
                body.len(),
                String::from_utf8_lossy(&body)
            )))
        })
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::builder(functions())
                .connect(gateway.worker_address())
                .await?,
        );
    }
    // Wait (with a deadline) until a worker has announced itself.
    let started = std::time::Instant::now();
    while !call(Method::GET, "/", "").await?.contains("\"function\"") {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "no worker joined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The client: plain HTTP.
    println!(
        "POST /function -> {}",
        call(Method::POST, "/function", "a message down the pipeline").await?
    );
    println!(
        "GET /gateway.function -> {}",
        call(Method::GET, "/gateway.function", "").await?
    );
    println!(
        "GET /missing -> {}",
        call(Method::GET, "/missing", "").await?
    );
    println!("GET / -> {}", call(Method::GET, "/", "").await?);

    for worker in workers {
        worker.shutdown().await;
    }
    gateway.shutdown().await?;
    Ok(())
}
