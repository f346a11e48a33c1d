//! `cargo xtask bench services`: services-mux calls over loopback tcp, one at a time and many
//! in flight, beside raw DEALER/ROUTER echoes in the same run (the baseline of what the
//! transport allows, with the same correlation by id): one on rylm-transport in this process,
//! one on `zeromq` 0.7 (`benches/zeromq-echo`, server and load client processes of their own).
//!
//! With `--cpu ROUNDS` it runs only the rows with 100 in flight, the services path and the
//! rylm-transport echo alternated, and reports the CPU time each call cost the process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::Bytes;
use rylm_benches::{
    Compared, OldEchoLoad, RawEcho, compared_table, cpu_cost, cpu_rounds, cpu_table, free_address,
    interleaved, measure, peak_rss_kib, serve_echo, start_zeromq_echo,
};
use rylm_services_mux::{Call, Method, Service, ServiceClient, ServiceResponse};

const ONE_AT_A_TIME: usize = 10_000;
const IN_FLIGHT_TOTAL: usize = 100_000;
const IN_FLIGHT: usize = 100;
const DEADLINE: Duration = Duration::from_secs(30);
const SECRET: &str = "bench-secret";
const REPETITIONS: usize = 5;

#[tokio::main]
async fn main() -> Result<()> {
    let data = "x".repeat(64);

    let service = Service::new("bench", SECRET)
        .route(r"^/echo$", Method::Request, |request| async move {
            let data = request.argument("data").cloned().unwrap_or_default();
            ServiceResponse::new(200, "OK").with("data", data)
        })?
        // 100 in flight on 64 handler slots: the surplus waits in the queue, not `busy`.
        .with_queue(1_000)
        .serve("tcp://127.0.0.1:0")
        .await?;
    let client = ServiceClient::new();
    client.register("bench", &[service.address()], SECRET);
    let raw = Arc::new(RawEcho::connect(&serve_echo("tcp://127.0.0.1:0").await?).await?);
    // `--cpu ROUNDS`: only the rows with 100 in flight, the services path and the echo
    // alternated, with the CPU time each call cost this process.
    let cpu_rounds = cpu_rounds(&std::env::args().collect::<Vec<_>>());

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
    if let Some(rounds) = cpu_rounds {
        let mut costs = Vec::new();
        for _ in 0..rounds {
            let subject =
                cpu_cost(rylm("services-mux call".into(), IN_FLIGHT_TOTAL, IN_FLIGHT)).await?;
            let echo = cpu_cost(baseline("raw echo".into(), IN_FLIGHT_TOTAL, IN_FLIGHT)).await?;
            costs.push((subject, echo));
        }
        print!(
            "{IN_FLIGHT} in flight, {IN_FLIGHT_TOTAL} calls a row, {rounds} alternated rounds; CPU of this process (service, client, echo server and client)\n\n{}",
            cpu_table("services-mux call", "raw echo", &costs)
        );
        service.shutdown().await;
        return Ok(());
    }
    let old_echo = free_address()?;
    let old_server = start_zeromq_echo(&old_echo)?;
    let mut old_client_rss = 0;
    // Subject, echo on rylm-transport and echo on zeromq 0.7, interleaved, five times.
    let mut rows = Vec::new();
    for (mode, total, in_flight) in [
        ("one at a time".to_owned(), ONE_AT_A_TIME, 1),
        (format!("{IN_FLIGHT} in flight"), IN_FLIGHT_TOTAL, IN_FLIGHT),
    ] {
        let runs = interleaved(
            REPETITIONS,
            || rylm(format!("services-mux call, {mode}"), total, in_flight),
            || {
                baseline(
                    format!("raw echo, rylm-transport, {mode}"),
                    total,
                    in_flight,
                )
            },
            OldEchoLoad {
                name: &format!("raw echo, zeromq 0.7, {mode}"),
                address: &old_echo,
                total,
                in_flight,
                size: data.len(),
            },
        )
        .await?;
        old_client_rss = old_client_rss.max(runs.old_client_rss);
        rows.push((mode, runs.subject, runs.echo, runs.old));
    }
    let compared: Vec<Compared<'_>> = rows
        .iter()
        .map(|(mode, subject, echo, old)| Compared {
            label: mode.clone(),
            subject,
            echo,
            old,
        })
        .collect();
    print!(
        "{}",
        compared_table(
            &format!("{REPETITIONS} interleaved repetitions, 64-character argument"),
            "services-mux call",
            &compared
        )
    );
    println!(
        "\npeak RSS: bench process (service, client, rylm-transport echo server and client) {} KiB; zeromq 0.7 echo server {} KiB; its load client {old_client_rss} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0),
        peak_rss_kib(old_server.child.id()).unwrap_or(0),
    );
    service.shutdown().await;
    Ok(())
}
