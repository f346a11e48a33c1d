//! The Brubeck services demo in Rust: a slow echo service, and a web front on hyper whose
//! `/service/sync` route calls it synchronously and `/service/async` asynchronously.
//!
//! `cargo run -p rylm-examples --bin services_web` starts both on loopback, makes one request
//! to each route with a hyper client, prints what happened, and exits. With `--serve` it keeps
//! serving until Ctrl-C and prints the web front's address instead.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rylm_services_mux::{Call, Method, Service, ServiceClient, ServiceResponse};
use serde_json::Value;

const SECRET: &str = "my_shared_secret";
const SERVICE_PATH: &str = "/service/slow";
/// The seed's service sleeps 5 s; the demo keeps it short.
const SLOW_FOR: Duration = Duration::from_millis(500);

#[tokio::main]
async fn main() -> Result<()> {
    let serve_forever = std::env::args().any(|a| a == "--serve");

    // The service: in the seed another process (or machine); here a task, on real tcp.
    let service = Service::new("slow-echo", SECRET)
        .route(
            &format!("^{SERVICE_PATH}$"),
            Method::Request,
            |request| async move {
                tokio::time::sleep(SLOW_FOR).await;
                let data = request
                    .argument("RETURN_DATA")
                    .cloned()
                    .unwrap_or("NO DATA".into());
                ServiceResponse::new(200, "Took a while, but I am back.").with("RETURN_DATA", data)
            },
        )?
        .serve("tcp://127.0.0.1:0")
        .await?;
    println!(
        "== Brubeck-style services: a slow echo service at {}",
        service.address()
    );

    // The web application's side: register the service and a handler for its responses.
    let client = ServiceClient::new();
    client.register("slow", &[service.address()], SECRET);
    client.on_response(&format!("^{SERVICE_PATH}$"), |path, response| async move {
        println!(
            "response handler: {path} answered {} {:?} with {}",
            response.status,
            response.status_msg,
            Value::Object(response.payload.clone())
        );
        Value::from(response.status)
    })?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let web = listener.local_addr()?;
    println!("web front at http://{web}/ (routes /service/sync and /service/async)");
    let client = Arc::new(client);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let client = client.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| web_route(client.clone(), request));
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("web front: connection error: {error}");
                }
            });
        }
    });

    if serve_forever {
        tokio::signal::ctrl_c().await?;
        service.shutdown().await;
        return Ok(());
    }

    for route in ["/service/sync", "/service/async"] {
        let started = Instant::now();
        let (status, body) = get(&format!("http://{web}{route}")).await?;
        println!(
            "GET {route} -> {status} in {:.0} ms: {body}",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    // The asynchronous call's response reaches its handler after the web request is done.
    tokio::time::sleep(SLOW_FOR + Duration::from_millis(300)).await;
    service.shutdown().await;
    Ok(())
}

async fn web_route(
    client: Arc<ServiceClient>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        Ok(response)
    };
    match request.uri().path() {
        "/service/sync" => {
            let call = Call::new(SERVICE_PATH).argument(
                "RETURN_DATA",
                "I made a round trip, it took a while but I bring results.",
            );
            match client
                .call("slow", call, Some(Duration::from_secs(10)))
                .await
            {
                Ok(reply) => answer(
                    StatusCode::OK,
                    format!(
                        "sync: {} (the response handler returned {})",
                        reply.response.payload["RETURN_DATA"],
                        reply.handled.unwrap_or(Value::Null)
                    ),
                ),
                Err(error) => answer(
                    StatusCode::BAD_GATEWAY,
                    format!("the service failed: {error}"),
                ),
            }
        }
        "/service/async" => {
            let call = Call::new(SERVICE_PATH).argument(
                "RETURN_DATA",
                "I made a round trip, it took so long I will respond to no one.",
            );
            match client.send("slow", call).await {
                Ok(id) => answer(
                    StatusCode::OK,
                    format!(
                        "async: call {id} sent; async is faster, but ... nothing to report on my trip"
                    ),
                ),
                Err(error) => answer(
                    StatusCode::BAD_GATEWAY,
                    format!("the service failed: {error}"),
                ),
            }
        }
        "/" => answer(
            StatusCode::OK,
            "try /service/sync and /service/async\n".into(),
        ),
        other => answer(StatusCode::NOT_FOUND, format!("no route for {other}\n")),
    }
}

/// One GET with hyper's client.
async fn get(url: &str) -> Result<(StatusCode, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(15), client.get(url.parse()?))
        .await
        .context("the web front did not answer in time")??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
