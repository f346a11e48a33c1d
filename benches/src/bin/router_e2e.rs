//! `cargo xtask bench router`, end to end: client -> Master -> 2 Workers -> client over loopback
//! tcp, the master and the workers each a `rylm` process as a user would run them, many messages
//! in flight, 64-byte and 1 KiB payloads; beside two raw DEALER/ROUTER pipelined echoes whose
//! servers are processes too, in the same run, interleaved, five times: one on rylm-transport
//! (this binary with `--echo-server`), one on `zeromq` 0.7 (`benches/zeromq-echo`, the
//! transport rylm used before).
//!
//! Every server process runs on one thread (`rylm --threads 1`, and the same for the echo
//! server): the server processes and the load generator share two cores here, and a process
//! that hands work between its own threads pays for it in wake-ups. The last table measures
//! that: the same master's path through a second master and workers with a thread per core.
//!
//! A message on the master's path crosses four sockets where the echo crosses two, so 0.5 of the
//! echo is the ceiling.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use rylm_benches::{
    Compared, OldEchoLoad, Paired, Process, RawEcho, Scraper, Summary, compared_table,
    free_address, interleaved, measure, measure_at_rate, paired_table, peak_rss_kib, serve_echo,
    spawn, start_zeromq_echo,
};
use rylm_components::Client;

const TOTAL: usize = 100_000;
const IN_FLIGHT: usize = 200;
const REPETITIONS: usize = 5;
/// Repetitions of the on/off comparison, whose differences are small.
const AB_REPETITIONS: usize = 9;
/// Repetitions of the one-thread against thread-per-core comparison.
const THREADS_REPETITIONS: usize = 5;

/// A payload size, and the runs of the master's path, the rylm-transport echo and the zeromq echo.
type SizeRuns = (usize, Vec<Summary>, Vec<Summary>, Vec<Summary>);

fn sibling(binary: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(binary);
    if !path.is_file() {
        bail!(
            "{} is missing: build it first (cargo xtask bench router does)",
            path.display()
        );
    }
    Ok(path)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(address) = args
        .iter()
        .position(|a| a == "--echo-server")
        .and_then(|i| args.get(i + 1))
    {
        // One thread, like the master and the workers (`--threads 1`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(async {
            serve_echo(address).await?;
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// `host:port` of a free loopback port, for an `--admin` listener.
fn admin_address() -> Result<String> {
    Ok(free_address()?.trim_start_matches("tcp://").to_owned())
}

/// A master and two workers as `rylm` processes with `--threads THREADS`, their admin
/// endpoints at `admins`; returns the processes and the address of the master's cache (`--db`),
/// where clients connect.
fn topology(
    rylm: &std::path::Path,
    threads: &str,
    admins: &[String],
) -> Result<(Vec<Process>, String)> {
    let (pull, publish, workers, db) = (
        free_address()?,
        free_address()?,
        free_address()?,
        free_address()?,
    );
    let label = |role: &str| format!("rylm {role}, --threads {threads}");
    let mut processes = vec![spawn(
        &label("master"),
        rylm,
        &[
            "master",
            "--name",
            "bench",
            "--clients",
            &pull,
            "--stream",
            &publish,
            "--workers",
            &workers,
            "--db",
            &db,
            "--admin",
            &admins[0],
            "--threads",
            threads,
        ]
        .map(str::to_owned),
    )?];
    for admin in &admins[1..] {
        processes.push(spawn(
            &label("worker"),
            rylm,
            &[
                "worker",
                "--db",
                &db,
                "--credits",
                "64",
                "--admin",
                admin,
                "--threads",
                threads,
            ]
            .map(str::to_owned),
        )?);
    }
    Ok((processes, db))
}

async fn run() -> Result<()> {
    let rylm = sibling("rylm")?;
    let admins = [admin_address()?, admin_address()?, admin_address()?];
    let many_admins = [admin_address()?, admin_address()?, admin_address()?];
    let (echo, old_echo) = (free_address()?, free_address()?);
    let (mut processes, db) = topology(&rylm, "1", &admins)?;
    // The same with a thread per core (the default), for the comparison at the end.
    let (many, many_db) = topology(&rylm, "0", &many_admins)?;
    processes.extend(many);
    processes.push(spawn(
        "echo server (rylm-transport)",
        &std::env::current_exe()?,
        &["--echo-server".to_owned(), echo.clone()],
    )?);
    processes.push(start_zeromq_echo(&old_echo)?);

    let client = Client::connect(&db, Duration::from_secs(30))
        .await
        .context("connecting to the master")?;
    let many_client = Client::connect(&many_db, Duration::from_secs(30))
        .await
        .context("connecting to the master with a thread per core")?;
    let raw = Arc::new(RawEcho::connect(&echo).await?);

    // Per size: the master's path, the echo on rylm-transport, the echo on zeromq 0.7; five
    // repetitions, interleaved, so that the machine's noise falls on all three alike.
    let mut runs: Vec<SizeRuns> = Vec::new();
    let mut old_client_rss = 0;
    let mut steady_runs: Vec<Summary> = Vec::new();
    for size in [64usize, 1024] {
        let payload = Bytes::from(vec![b'x'; size]);
        let through_master = |name: String, total: usize| {
            let (client, payload) = (client.clone(), payload.clone());
            async move {
                measure(&name, total, IN_FLIGHT, move |_| {
                    let (client, payload) = (client.clone(), payload.clone());
                    async move {
                        client.eval("echo", payload).await?;
                        Ok(())
                    }
                })
                .await
            }
        };
        let echoed = |name: String, total: usize| {
            let (raw, payload) = (raw.clone(), payload.clone());
            async move {
                measure(&name, total, IN_FLIGHT, move |n| {
                    let (raw, payload) = (raw.clone(), payload.clone());
                    async move { raw.call(n as u64, payload).await }
                })
                .await
            }
        };
        through_master("warm-up".into(), 2_000).await?;
        echoed("warm-up".into(), 2_000).await?;
        let runs_of_size = interleaved(
            REPETITIONS,
            || {
                through_master(
                    format!("client -> master -> 2 workers, {size} B, {IN_FLIGHT} in flight"),
                    TOTAL,
                )
            },
            || {
                echoed(
                    format!("raw DEALER/ROUTER echo, rylm-transport, {size} B"),
                    TOTAL,
                )
            },
            OldEchoLoad {
                name: &format!("raw DEALER/ROUTER echo, zeromq 0.7, {size} B"),
                address: &old_echo,
                total: TOTAL,
                in_flight: IN_FLIGHT,
                size,
            },
        )
        .await?;
        old_client_rss = old_client_rss.max(runs_of_size.old_client_rss);
        // The latency of a steady load at half the peak this run measured.
        let mut peaks: Vec<f64> = runs_of_size.subject.iter().map(Summary::rate).collect();
        peaks.sort_by(f64::total_cmp);
        let half = peaks.get(peaks.len() / 2).copied().unwrap_or(1000.0) / 2.0;
        let steady = {
            let (client, payload) = (client.clone(), payload.clone());
            measure_at_rate(
                &format!(
                    "client -> master -> 2 workers, {size} B, {half:.0} calls/s (half the peak)"
                ),
                (half as usize * 3).max(1000),
                half,
                move |_| {
                    let (client, payload) = (client.clone(), payload.clone());
                    async move {
                        client.eval("echo", payload).await?;
                        Ok(())
                    }
                },
            )
            .await?
        };
        steady_runs.push(steady);
        runs.push((
            size,
            runs_of_size.subject,
            runs_of_size.echo,
            runs_of_size.old,
        ));
    }
    let rows: Vec<Compared<'_>> = runs
        .iter()
        .map(|(size, master, echo, old)| Compared {
            label: format!("{size} B"),
            subject: master,
            echo,
            old,
        })
        .collect();
    print!(
        "{}",
        compared_table(
            &format!(
                "{REPETITIONS} interleaved repetitions of {TOTAL} calls, {IN_FLIGHT} in flight"
            ),
            "master path",
            &rows
        )
    );
    println!("\n| steady load | calls/s achieved | p50 | p99 |\n|---|---:|---:|---:|");
    for steady in &steady_runs {
        println!(
            "| {} | {:.0} | {:.3} ms | {:.3} ms |",
            steady.name,
            steady.rate(),
            steady.p50.as_secs_f64() * 1e3,
            steady.p99.as_secs_f64() * 1e3
        );
    }
    observability(&client, &admins).await?;
    threads(&client, &many_client).await?;
    println!("\npeak RSS of each process:");
    println!(
        "- bench client (this process): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    println!("- zeromq 0.7 echo load client: {old_client_rss} KiB");
    for process in &processes {
        println!(
            "- {} (pid {}): {} KiB",
            process.name,
            process.child.id(),
            peak_rss_kib(process.child.id()).unwrap_or(0)
        );
    }
    Ok(())
}

/// The master's path with every process on one thread against the same with a thread per
/// core (two topologies running side by side; the one not measured is idle).
async fn threads(one: &Client, per_core: &Client) -> Result<()> {
    let through = |client: &Client, name: String, payload: Bytes| {
        let client = client.clone();
        async move {
            measure(&name, TOTAL, IN_FLIGHT, move |_| {
                let (client, payload) = (client.clone(), payload.clone());
                async move {
                    client.eval("echo", payload).await?;
                    Ok(())
                }
            })
            .await
        }
    };
    let mut runs = Vec::new();
    for size in [64usize, 1024] {
        let payload = Bytes::from(vec![b'x'; size]);
        through(per_core, "warm-up".into(), payload.clone()).await?;
        let (mut subject, mut baseline) = (Vec::new(), Vec::new());
        for repetition in 0..THREADS_REPETITIONS {
            for one_now in [repetition % 2 == 1, repetition % 2 == 0] {
                if one_now {
                    subject.push(
                        through(one, format!("one thread, {size} B"), payload.clone()).await?,
                    );
                } else {
                    baseline.push(
                        through(
                            per_core,
                            format!("thread per core, {size} B"),
                            payload.clone(),
                        )
                        .await?,
                    );
                }
            }
        }
        runs.push((size, subject, baseline));
    }
    let rows: Vec<Paired<'_>> = runs
        .iter()
        .map(|(size, subject, baseline)| Paired {
            label: format!("{size} B, --threads 1 (baseline: a thread per core)"),
            subject,
            baseline,
        })
        .collect();
    println!(
        "\nmaster and workers on one thread each against a thread per core: {THREADS_REPETITIONS} interleaved repetitions of {TOTAL} calls, {IN_FLIGHT} in flight\n"
    );
    print!("{}", paired_table(&rows));
    Ok(())
}

/// Metrics and trace propagation on against off, through the same master, workers and client
/// connection: off, calls that carry no trace context and nobody scraping; on, calls that do
/// (the default: trace context on every message, a span of it in the master and in each worker
/// where spans are recorded) while the
/// `/metrics` of the master and both workers are scraped every 250 ms. The functions' counters
/// count in both: they cannot be turned off.
async fn observability(traced: &Client, admins: &[String]) -> Result<()> {
    // One connection for both: only the trace context differs.
    let quiet = traced.with_trace(false);
    let traced = &traced.with_trace(true);
    let through = |client: &Client, name: String, payload: Bytes| {
        let client = client.clone();
        async move {
            measure(&name, TOTAL, IN_FLIGHT, move |_| {
                let (client, payload) = (client.clone(), payload.clone());
                async move {
                    client.eval("echo", payload).await?;
                    Ok(())
                }
            })
            .await
        }
    };
    let mut runs = Vec::new();
    let mut scrapes = 0;
    for size in [64usize, 1024] {
        let payload = Bytes::from(vec![b'x'; size]);
        let (mut on, mut off) = (Vec::new(), Vec::new());
        // Which goes first alternates, so that a drift of the machine falls on both alike.
        for repetition in 0..AB_REPETITIONS {
            for on_now in [repetition % 2 == 1, repetition % 2 == 0] {
                if on_now {
                    let scraper = Scraper::start(admins.to_vec(), Duration::from_millis(250));
                    on.push(through(traced, format!("on, {size} B"), payload.clone()).await?);
                    scrapes += scraper.scrapes();
                } else {
                    off.push(through(&quiet, format!("off, {size} B"), payload.clone()).await?);
                }
            }
        }
        runs.push((size, on, off));
    }
    let rows: Vec<Paired<'_>> = runs
        .iter()
        .map(|(size, on, off)| Paired {
            label: format!("{size} B, metrics and trace on (baseline: off)"),
            subject: on,
            baseline: off,
        })
        .collect();
    println!(
        "\nmetrics and trace propagation, on against off: {AB_REPETITIONS} interleaved repetitions of {TOTAL} calls, {IN_FLIGHT} in flight ({scrapes} scrapes answered)\n"
    );
    print!("{}", paired_table(&rows));
    Ok(())
}
