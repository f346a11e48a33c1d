//! `cargo xtask bench gateway`: HTTP requests through the gateway to two workers, beside a bare
//! hyper hello-world server in the same run (the baseline of what HTTP allows here).
//!
//! The load generator is our own, on hyper's client: N keep-alive connections, each sending
//! requests one after the other for a fixed duration; every latency recorded. The storm of
//! abandoned requests comes from a process of its own (this binary with `--storm ADDRESS`), so
//! that it presses on the gateway as remote clients would, not on the bench's own runtime.
//!
//! With `--cpu ROUNDS` it runs only the rows of 8 and 32 connections, the gateway and the bare
//! server alternated, and reports the CPU time each request cost the process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use rylm_benches::{
    Paired, Scraper, Summary, cpu_cost, cpu_rounds, cpu_table, paired_table, peak_rss_kib, spread,
};
use rylm_components::{Functions, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};

const DURATION: Duration = Duration::from_secs(3);
const REPETITIONS: usize = 3;
/// Repetitions of the on/off comparison, whose differences are small.
const AB_REPETITIONS: usize = 9;
/// Abandoned requests in the storm.
const STORM: usize = 20_000;

/// How long the storm's process may take before it is stopped.
const STORM_LIMIT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(address) = args
        .iter()
        .position(|a| a == "--storm")
        .and_then(|i| args.get(i + 1))
    {
        let sent = abandon(address.parse()?, STORM).await?;
        println!("{sent} {}", peak_rss_kib(std::process::id()).unwrap_or(0));
        return Ok(());
    }
    let gateway = HttpGateway::start(GatewayConfig::default()).await?;
    let functions = || {
        Functions::new()
            .add("hello", |_p: Bytes| async move {
                Ok::<_, String>(Bytes::from_static(b"hello, world"))
            })
            .add("slow", |p: Bytes| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, String>(p)
            })
    };
    let workers = with_workers(&gateway, &functions).await?;
    let bare = bare_hyper().await?;
    // `--cpu ROUNDS`: only the rows of 8 and 32 connections, the gateway and the bare server
    // alternated, with the CPU time each request cost this process.
    if let Some(rounds) = cpu_rounds(&args) {
        for connections in [8usize, 32] {
            let mut costs = Vec::new();
            for _ in 0..rounds {
                let through = cpu_cost(load(
                    gateway.local_addr(),
                    "/hello",
                    connections,
                    DURATION,
                    "gateway",
                ))
                .await?;
                let plain = cpu_cost(load(bare, "/", connections, DURATION, "bare")).await?;
                costs.push((through, plain));
            }
            println!(
                "{connections} connections, {} s a row, {rounds} alternated rounds; CPU of this process (gateway, workers, bare server, load generator)\n\n{}",
                DURATION.as_secs(),
                cpu_table("gateway", "bare hyper", &costs)
            );
        }
        for worker in workers {
            worker.shutdown().await;
        }
        return Ok(());
    }

    // Subject and baseline interleaved, three times, so that the machine's noise falls on both.
    println!(
        "| connections | gateway req/s (median, min-max) | bare hyper req/s | ratio (min / median / max) | gateway p50 / p99 (median run) | bare p50 / p99 |\n|---:|---:|---:|---:|---:|---:|"
    );
    for connections in [8usize, 32] {
        let (mut through, mut bare_runs) = (Vec::new(), Vec::new());
        for _ in 0..REPETITIONS {
            through.push(
                load(
                    gateway.local_addr(),
                    "/hello",
                    connections,
                    DURATION,
                    "gateway",
                )
                .await?,
            );
            bare_runs.push(load(bare, "/", connections, DURATION, "bare").await?);
        }
        let ratios: Vec<f64> = through
            .iter()
            .zip(&bare_runs)
            .map(|(t, b)| t.rate() / b.rate().max(f64::EPSILON))
            .collect();
        let (low, mid, high) = spread(&ratios);
        let median = |runs: &mut Vec<Summary>| {
            runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            runs[runs.len() / 2].clone()
        };
        let rates = |runs: &[Summary]| spread(&runs.iter().map(Summary::rate).collect::<Vec<_>>());
        let (t_low, t_mid, t_high) = rates(&through);
        let (_, b_mid, _) = rates(&bare_runs);
        let (t, b) = (median(&mut through), median(&mut bare_runs));
        println!(
            "| {connections} | {t_mid:.0} ({t_low:.0}-{t_high:.0}) | {b_mid:.0} | {low:.2} / {mid:.2} / {high:.2} | {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
            t.p50.as_secs_f64() * 1e3,
            t.p99.as_secs_f64() * 1e3,
            b.p50.as_secs_f64() * 1e3,
            b.p99.as_secs_f64() * 1e3,
        );
    }

    // Fresh requests during a storm of abandoned ones: their latency, against the same fresh
    // load with no storm.
    let calm = fresh_requests(gateway.local_addr(), "fresh requests, no storm").await?;
    let counted = |status: &Option<std::sync::Arc<rylm_components::PoolStatus>>| {
        status.as_ref().map(|status| {
            let counters = status.counters();
            [
                &counters.dispatched,
                &counters.withdrawn,
                &counters.cancelled,
            ]
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        })
    };
    let before_storm = counted(&gateway.pool_status());
    let storm = rylm_benches::Process {
        name: "storm".to_owned(),
        child: std::process::Command::new(std::env::current_exe()?)
            .args(["--storm", &gateway.local_addr().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the storm's process")?,
    };
    // What the workers' credits do meanwhile: a fresh request waits for one while the storm's
    // running work holds them all.
    let sampler = gateway.pool_status().map(|status| {
        tokio::spawn(async move {
            let mut samples = CreditSamples::default();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while samples.taken < (DURATION.as_millis() / 5) as usize {
                tick.tick().await;
                samples.take(status.free_credits(), status.waiting());
            }
            samples
        })
    });
    let stormy = fresh_requests(
        gateway.local_addr(),
        "fresh requests during a storm of abandoned ones",
    )
    .await?;
    let (abandoned, storm_rss) = storm_ended(storm).await?;
    let credits = match sampler {
        Some(sampler) => Some(sampler.await.context("the credit sampler")?),
        None => None,
    };
    let after_storm = counted(&gateway.pool_status());
    println!("\n| fresh requests, 8 connections | req/s | p50 | p99 |\n|---|---:|---:|---:|");
    for run in [&calm, &stormy] {
        println!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms |",
            run.name,
            run.rate(),
            run.p50.as_secs_f64() * 1e3,
            run.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "\nstorm: {abandoned} requests to `slow` (200 ms) whose clients hung up after 20 ms, 200 at once, from a process of its own (peak RSS {storm_rss} KiB)"
    );
    if let Some(credits) = credits {
        println!(
            "during the storm, sampled every 5 ms ({} samples): no free credit in {:.0} % of them, up to {} messages waiting for one",
            credits.taken,
            100.0 * credits.none_free as f64 / credits.taken.max(1) as f64,
            credits.most_waiting
        );
    }
    if let (Some(before), Some(after)) = (before_storm, after_storm) {
        println!(
            "the pool meanwhile: {} dispatched, {} withdrawn, {} stopped at their workers",
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        );
    }
    observability(&functions).await?;
    println!(
        "\npeak RSS of the bench process (the gateways, their workers, bare hyper and the load generator): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    for worker in workers {
        worker.shutdown().await;
    }
    gateway.shutdown().await?;
    Ok(())
}

/// Waits (within [`STORM_LIMIT`]) for the storm's process to end; what it sent and its peak RSS.
async fn storm_ended(mut storm: rylm_benches::Process) -> Result<(usize, u64)> {
    let began = Instant::now();
    // std's child has no async wait: look every 50 ms (the storm lasts seconds).
    while storm.child.try_wait()?.is_none() {
        if began.elapsed() > STORM_LIMIT {
            anyhow::bail!("the storm's process ran over {STORM_LIMIT:?}; stopped");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut said = String::new();
    if let Some(mut out) = storm.child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut said)?;
    }
    let mut words = said.split_whitespace().map(str::parse::<u64>);
    match (words.next(), words.next()) {
        (Some(Ok(sent)), Some(Ok(rss))) => Ok((usize::try_from(sent)?, rss)),
        _ => anyhow::bail!("the storm's process said {said:?}"),
    }
}

/// How often the gateway's workers had no free credit, and how many messages waited for one.
#[derive(Debug, Default)]
struct CreditSamples {
    taken: usize,
    none_free: usize,
    most_waiting: usize,
}

impl CreditSamples {
    fn take(&mut self, free: usize, waiting: usize) {
        self.taken += 1;
        self.none_free += usize::from(free == 0);
        self.most_waiting = self.most_waiting.max(waiting);
    }
}

/// The traced gateway's metrics as `rylm gateway --admin` shows them: its routes and its pool.
#[derive(Debug)]
struct GatewayMetrics {
    routes: std::sync::Arc<rylm_message::stats::CallTable>,
    pool: Option<std::sync::Arc<rylm_components::PoolStatus>>,
}

impl Collector for GatewayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        rylm_admin::calls(
            &mut encoder,
            "rylm_gateway_route",
            "route",
            &self.routes.all(),
        )?;
        if let Some(pool) = &self.pool {
            for (name, help, value) in pool.counters().fields() {
                rylm_admin::counter(&mut encoder, &format!("rylm_pool_{name}"), help, value)?;
            }
        }
        Ok(())
    }
}

/// Metrics and trace propagation on against off, on one fresh gateway with two workers,
/// switched between runs: on, trace context continued with a span per request and the metrics
/// served on an admin listener scraped every 250 ms; off, tracing off and nobody scraping. The
/// counters count in both.
async fn observability(functions: &impl Fn() -> Functions) -> Result<()> {
    let traced = HttpGateway::start(GatewayConfig::default()).await?;
    let workers = with_workers(&traced, functions).await?;
    let gateway = &traced;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(GatewayMetrics {
        routes: gateway.routes(),
        pool: gateway.pool_status(),
    }));
    let admin = rylm_admin::Admin::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        registry,
        std::sync::Arc::new(|| Ok(())),
    )
    .await?;
    let mut rows = Vec::new();
    let mut scrapes = 0;
    for connections in [8usize, 32] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        // Which goes first alternates, so that a drift of the machine falls on both alike.
        for repetition in 0..AB_REPETITIONS {
            for on_now in [repetition % 2 == 1, repetition % 2 == 0] {
                gateway.set_trace(on_now);
                if on_now {
                    let scraper = Scraper::start(
                        vec![admin.local_addr().to_string()],
                        Duration::from_millis(250),
                    );
                    on.push(
                        load(gateway.local_addr(), "/hello", connections, DURATION, "on").await?,
                    );
                    scrapes += scraper.scrapes();
                } else {
                    off.push(
                        load(gateway.local_addr(), "/hello", connections, DURATION, "off").await?,
                    );
                }
            }
        }
        rows.push((connections, on, off));
    }
    let paired: Vec<Paired<'_>> = rows
        .iter()
        .map(|(connections, on, off)| Paired {
            label: format!("{connections} connections, metrics and trace on (baseline: off)"),
            subject: on,
            baseline: off,
        })
        .collect();
    println!(
        "\nmetrics and trace propagation, on against off: {AB_REPETITIONS} interleaved repetitions of {} s ({scrapes} scrapes answered)\n",
        DURATION.as_secs()
    );
    print!("{}", paired_table(&paired));
    admin.shutdown().await;
    for worker in workers {
        worker.shutdown().await;
    }
    traced.shutdown().await?;
    Ok(())
}

/// Two workers of `functions` for `gateway`, joined (a warm-up request went through).
async fn with_workers(
    gateway: &HttpGateway,
    functions: &impl Fn() -> Functions,
) -> Result<Vec<Worker>> {
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::builder(functions())
                .credits(64)
                .connect(gateway.worker_address())
                .await?,
        );
    }
    load(
        gateway.local_addr(),
        "/hello",
        1,
        Duration::from_millis(500),
        "warm-up",
    )
    .await
    .ok();
    Ok(workers)
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

/// 8 connections of fresh `hello` requests, back to back, for the bench's duration.
async fn fresh_requests(address: SocketAddr, name: &str) -> Result<Summary> {
    load(address, "/hello", 8, DURATION, name).await
}

/// `total` requests to `slow` whose clients hang up after 20 ms, 200 at a time, each on a
/// connection of its own; how many were sent.
async fn abandon(address: SocketAddr, total: usize) -> Result<usize> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let permit = slots.clone().acquire_owned().await?;
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let attempt = async {
                let stream = tokio::net::TcpStream::connect(address).await?;
                let (mut sender, connection) =
                    http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                let request = Request::post("/slow")
                    .header("host", "bench")
                    .body(Full::new(Bytes::from_static(b"x")))?;
                sender.send_request(request).await?;
                anyhow::Ok(())
            };
            let _ = tokio::time::timeout(Duration::from_millis(20), attempt).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(total)
}
