//! `cargo xtask bench router`, end to end: client -> Master -> 2 Workers -> client over loopback
//! tcp, the master and the workers each a `rylm` process as a user would run them, many messages
//! in flight, 64-byte and 1 KiB payloads; beside a raw zeromq DEALER/ROUTER pipelined echo whose
//! server is a process too (this binary with `--echo-server`), in the same run.
//!
//! A message on the master's path crosses four sockets where the echo crosses two, so 0.5 of the
//! echo is the ceiling.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use rylm_benches::{
    RawEcho, Summary, free_address, measure, peak_rss_kib, serve_echo, spawn, table,
};
use rylm_components::Client;

const TOTAL: usize = 20_000;
const IN_FLIGHT: usize = 200;

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(address) = args
        .iter()
        .position(|a| a == "--echo-server")
        .and_then(|i| args.get(i + 1))
    {
        return runtime.block_on(async {
            serve_echo(address).await?;
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    runtime.block_on(run())
}

async fn run() -> Result<()> {
    let rylm = sibling("rylm")?;
    let (pull, publish, workers, db, echo) = (
        free_address()?,
        free_address()?,
        free_address()?,
        free_address()?,
        free_address()?,
    );

    let mut processes = vec![spawn(
        "rylm master",
        &rylm,
        &[
            "master",
            "--name",
            "bench",
            "--pull",
            &pull,
            "--pub",
            &publish,
            "--workers",
            &workers,
            "--db",
            &db,
        ]
        .map(str::to_owned),
    )?];
    for _ in 0..2 {
        processes.push(spawn(
            "rylm worker",
            &rylm,
            &["worker", "--db", &db, "--credits", "64"].map(str::to_owned),
        )?);
    }
    processes.push(spawn(
        "echo server",
        &std::env::current_exe()?,
        &["--echo-server".to_owned(), echo.clone()],
    )?);

    let client = Client::connect(&db, Duration::from_secs(30))
        .await
        .context("connecting to the master")?;
    let raw = Arc::new(RawEcho::connect(&echo).await?);

    let mut rows = Vec::new();
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
        let master = through_master(
            format!("client -> master -> 2 workers, {size} B, {IN_FLIGHT} in flight"),
            TOTAL,
        )
        .await?;
        let echo = echoed(
            format!("raw DEALER/ROUTER echo, {size} B, {IN_FLIGHT} in flight"),
            TOTAL,
        )
        .await?;
        rows.push((master, echo));
    }
    let pairs: Vec<(&Summary, &Summary)> = rows.iter().map(|(a, b)| (a, b)).collect();
    println!("{}", table(&pairs));
    println!("| baseline run | ops | ops/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    for (_, echo) in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms |",
            echo.name,
            echo.count,
            echo.rate(),
            echo.p50.as_secs_f64() * 1e3,
            echo.p99.as_secs_f64() * 1e3
        );
    }
    println!("\npeak RSS of each process:");
    println!(
        "- bench client (this process): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
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
