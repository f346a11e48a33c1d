//! A mixed cluster, as a pylm user moves over one process at a time: a rylm Master in pylm
//! mode, a real pylm Worker (Python, from PyPI) and a rylm Worker behind it, and a rylm Client
//! speaking pylm's wire format in front.
//!
//! Needs a Python with pylm: `RYLM_PYTHON` (what `cargo xtask demo` passes when it could make
//! one), else the example says so and exits. `cargo run -p rylm-examples --bin pylm_mixed`

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rylm_components::{Client, ClientOptions, Functions, Master, Worker};

#[tokio::main]
async fn main() -> Result<()> {
    let Ok(python) = std::env::var("RYLM_PYTHON") else {
        println!("(no Python with pylm here: RYLM_PYTHON is not set; skipping the mixed cluster)");
        return Ok(());
    };
    let master = Master::builder("mixed").pylm_wire().start().await?;
    println!(
        "== a rylm Master in pylm mode; its cache at {}",
        master.db_address()
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/pylm_worker.py");
    let mut pylm_worker = tokio::process::Command::new(&python)
        .args([script, "pylm-worker", master.db_address()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the pylm worker")?;
    let client = Client::connect_with(
        master.db_address(),
        ClientOptions::pylm(Duration::from_secs(20)),
    )
    .await?;
    let answer = client.eval("upper", "served by a python worker").await?;
    println!(
        "a pylm Worker answered: {}",
        String::from_utf8_lossy(&answer)
    );

    let rylm_functions = Functions::new().add("upper", |p: Bytes| async move {
        Ok::<_, String>(Bytes::from(format!(
            "rylm says: {}",
            String::from_utf8_lossy(&p).to_uppercase()
        )))
    });
    let rylm_worker = Worker::builder(rylm_functions)
        .connect_pylm(master.db_address(), Duration::from_secs(10))
        .await?;
    let mut results = client.job(
        "upper",
        (0..6).map(|i| Bytes::from(format!("message {i}"))),
        6,
    );
    println!("a job over both workers:");
    while let Some((index, result)) = results.recv().await {
        println!("  {index}: {}", String::from_utf8_lossy(&result?));
    }
    rylm_worker.shutdown().await;
    let _ = pylm_worker.kill().await;
    master.shutdown().await?;
    Ok(())
}
