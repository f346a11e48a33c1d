//! `cargo xtask bench services`: services-mux calls over loopback tcp, one at a time and many
//! in flight, beside a raw zeromq DEALER/ROUTER echo in the same run (the baseline of what the
//! transport allows, with the same correlation by id and the same tasks).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::Bytes;
use rylm_benches::{RawEcho, Summary, measure, peak_rss_kib, serve_echo, table};
use rylm_services_mux::{Call, Method, Service, ServiceClient, ServiceResponse};

const ONE_AT_A_TIME: usize = 3_000;
const IN_FLIGHT_TOTAL: usize = 20_000;
const IN_FLIGHT: usize = 100;
const DEADLINE: Duration = Duration::from_secs(30);
const SECRET: &str = "bench-secret";

#[tokio::main]
async fn main() -> Result<()> {
    let data = "x".repeat(64);

    let service = Service::new("bench", SECRET)
        .route(r"^/echo$", Method::Request, |request| async move {
            let data = request.argument("data").cloned().unwrap_or_default();
            ServiceResponse::new(200, "OK").with("data", data)
        })?
        .serve("tcp://127.0.0.1:0")
        .await?;
    let client = ServiceClient::new();
    client.register("bench", &[service.address()], SECRET);
    let raw = Arc::new(RawEcho::connect(&serve_echo("tcp://127.0.0.1:0").await?).await?);

    let rylm = |name: String, total: usize, in_flight: usize| {
        let (client, data) = (client.clone(), data.clone());
        async move {
            measure(&name, total, in_flight, move |_| {
                let (client, data) = (client.clone(), data.clone());
                async move {
                    let reply = client
                        .call(
                            "bench",
                            Call::new("/echo").argument("data", data),
                            Some(DEADLINE),
                        )
                        .await?;
                    if reply.response.status != 200 {
                        bail!("status {}", reply.response.status);
                    }
                    Ok(())
                }
            })
            .await
        }
    };
    let baseline = |name: String, total: usize, in_flight: usize| {
        let (raw, payload) = (raw.clone(), Bytes::from(data.clone()));
        async move {
            measure(&name, total, in_flight, move |n| {
                let (raw, payload) = (raw.clone(), payload.clone());
                async move { raw.call(n as u64, payload).await }
            })
            .await
        }
    };

    rylm("warm-up".into(), 500, 10).await?;
    baseline("warm-up".into(), 500, 10).await?;
    let rylm_serial = rylm("services-mux call, one at a time".into(), ONE_AT_A_TIME, 1).await?;
    let raw_serial = baseline(
        "raw DEALER/ROUTER echo, one at a time".into(),
        ONE_AT_A_TIME,
        1,
    )
    .await?;
    let rylm_parallel = rylm(
        format!("services-mux call, {IN_FLIGHT} in flight"),
        IN_FLIGHT_TOTAL,
        IN_FLIGHT,
    )
    .await?;
    let raw_parallel = baseline(
        format!("raw echo, {IN_FLIGHT} in flight"),
        IN_FLIGHT_TOTAL,
        IN_FLIGHT,
    )
    .await?;

    println!(
        "{}",
        table(&[(&rylm_serial, &raw_serial), (&rylm_parallel, &raw_parallel)])
    );
    print_baseline(&[&raw_serial, &raw_parallel]);
    println!(
        "\npeak RSS of the bench process (service, client, raw echo server and client): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    service.shutdown().await;
    Ok(())
}

fn print_baseline(runs: &[&Summary]) {
    println!("| baseline run | ops | ops/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    for s in runs {
        println!(
            "| {} | {} | {:.0} | {:.3} ms | {:.3} ms |",
            s.name,
            s.count,
            s.rate(),
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3
        );
    }
}
