//! `cargo xtask bench pylm`: the same job (client -> master -> 2 workers -> client, 100-byte
//! payloads, 50 in flight) through pylm's Master with pylm Workers, rylm's Master (pylm mode)
//! with pylm Workers, and rylm's Master with rylm Workers; and pylm's Server against rylm's
//! Server (pylm mode). Every server and worker is a process of its own; the client is rylm's, in
//! the wire format of the server it calls. Needs `RYLM_PYTHON` (a Python with pylm), which
//! `cargo xtask bench pylm` provides.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rylm_benches::{Process, Summary, free_address, measure, peak_rss_kib, spawn};
use rylm_components::{Client, ClientOptions};

const MESSAGES: usize = 2_000;
const IN_FLIGHT: usize = 50;

fn script(name: &str) -> String {
    format!(
        "{}/../crates/components/tests/py/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn run(name: &str, db: &str, options: ClientOptions) -> Result<Summary> {
    let client = Client::connect_with(db, options)
        .await
        .with_context(|| format!("connecting for {name}"))?;
    let payload = Bytes::from(vec![b'x'; 100]);
    // Warm up (and let the workers join), then measure.
    measure("warm-up", 200, IN_FLIGHT, {
        let (client, payload) = (client.clone(), payload.clone());
        move |_| {
            let (client, payload) = (client.clone(), payload.clone());
            async move {
                client
                    .eval("upper", payload)
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            }
        }
    })
    .await?;
    measure(name, MESSAGES, IN_FLIGHT, move |_| {
        let (client, payload) = (client.clone(), payload.clone());
        async move {
            client
                .eval("upper", payload)
                .await
                .map(|_| ())
                .map_err(Into::into)
        }
    })
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let python = PathBuf::from(
        std::env::var("RYLM_PYTHON")
            .context("RYLM_PYTHON is not set: run `cargo xtask bench pylm`")?,
    );
    let rylm = std::env::current_exe()?.with_file_name("rylm");
    let deadline = Duration::from_secs(60);
    let mut rows: Vec<(Summary, Vec<(String, u64)>)> = Vec::new();
    let rss = |processes: &[Process]| -> Vec<(String, u64)> {
        processes
            .iter()
            .map(|p| (p.name.clone(), peak_rss_kib(p.child.id()).unwrap_or(0)))
            .collect()
    };

    // 1. pylm Master, pylm Workers.
    {
        let (pull, publish, wpull, wpush, db) = (
            free_address()?,
            free_address()?,
            free_address()?,
            free_address()?,
            free_address()?,
        );
        let mut processes = vec![spawn(
            "pylm master",
            &python,
            &[
                script("pylm_master.py"),
                "pm".into(),
                pull,
                publish,
                wpull,
                wpush,
                db.clone(),
            ],
        )?];
        for i in 0..2 {
            processes.push(spawn(
                "pylm worker",
                &python,
                &[script("pylm_worker.py"), format!("w{i}"), db.clone()],
            )?);
        }
        let summary = run(
            "pylm Master + 2 pylm Workers",
            &db,
            ClientOptions::pylm(deadline),
        )
        .await?;
        rows.push((summary, rss(&processes)));
    }
    // 2. rylm Master (pylm mode), pylm Workers.
    {
        let (pull, publish, workers, db) = (
            free_address()?,
            free_address()?,
            free_address()?,
            free_address()?,
        );
        let mut processes = vec![spawn(
            "rylm master --wire pylm",
            &rylm,
            &[
                "master",
                "--wire",
                "pylm",
                "--name",
                "rm",
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
        for i in 0..2 {
            processes.push(spawn(
                "pylm worker",
                &python,
                &[script("pylm_worker.py"), format!("w{i}"), db.clone()],
            )?);
        }
        let summary = run(
            "rylm Master (pylm mode) + 2 pylm Workers",
            &db,
            ClientOptions::pylm(deadline),
        )
        .await?;
        rows.push((summary, rss(&processes)));
    }
    // 3. rylm Master, rylm Workers (native).
    {
        let (pull, publish, workers, db) = (
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
                "rn",
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
                &["worker", "--db", &db].map(str::to_owned),
            )?);
        }
        let options = ClientOptions {
            deadline,
            ..ClientOptions::default()
        };
        let summary = run("rylm Master + 2 rylm Workers", &db, options).await?;
        rows.push((summary, rss(&processes)));
    }
    // 4. pylm Server against rylm Server (pylm mode).
    {
        let (pull, publish, db) = (free_address()?, free_address()?, free_address()?);
        let processes = vec![spawn(
            "pylm server",
            &python,
            &[
                script("pylm_server.py"),
                "ps".into(),
                pull,
                publish,
                db.clone(),
            ],
        )?];
        let summary = run("pylm Server", &db, ClientOptions::pylm(deadline)).await?;
        rows.push((summary, rss(&processes)));
    }
    {
        let (pull, publish, db) = (free_address()?, free_address()?, free_address()?);
        let processes = vec![spawn(
            "rylm server --wire pylm",
            &rylm,
            &[
                "server", "--wire", "pylm", "--name", "rs", "--pull", &pull, "--pub", &publish,
                "--db", &db,
            ]
            .map(str::to_owned),
        )?];
        let summary = run(
            "rylm Server (pylm mode)",
            &db,
            ClientOptions::pylm(deadline),
        )
        .await?;
        rows.push((summary, rss(&processes)));
    }

    let base_master = rows[0].0.rate();
    let base_server = rows[3].0.rate();
    println!(
        "| run | msgs | msgs/s | p50 | p99 | × pylm's | peak RSS of its processes |\n|---|---:|---:|---:|---:|---:|---|"
    );
    for (i, (summary, memory)) in rows.iter().enumerate() {
        let base = if i < 3 { base_master } else { base_server };
        let memory: Vec<String> = memory
            .iter()
            .map(|(name, kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} | {} |",
            summary.name,
            summary.count,
            summary.rate(),
            summary.p50.as_secs_f64() * 1e3,
            summary.p99.as_secs_f64() * 1e3,
            summary.rate() / base.max(f64::EPSILON),
            memory.join(", ")
        );
    }
    println!(
        "\npeak RSS of the bench client: {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    Ok(())
}
