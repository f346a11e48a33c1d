//! pylm's MuxWorker: a worker function that yields many results for one message.
//!
//! `cargo run -p rylm-examples --bin pylm_mux_worker`

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rylm_components::{Client, Functions, Master, MuxWorker, Worker};

#[tokio::main]
async fn main() -> Result<()> {
    let master = Master::builder("words").start().await?;
    let split = Functions::new().add_mux("split", |text: Bytes| async move {
        let text = String::from_utf8_lossy(&text).into_owned();
        Ok::<_, String>(
            text.split_whitespace()
                .map(|w| Bytes::from(w.to_owned()))
                .collect::<Vec<_>>(),
        )
    });
    let worker: MuxWorker = Worker::builder(split)
        .connect_via_cache(master.db_address(), Duration::from_secs(5))
        .await?;
    let client = Client::connect(master.db_address(), Duration::from_secs(5)).await?;
    let parts = client
        .eval_all("split", "one message, many results")
        .await?;
    let parts: Vec<String> = parts
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    println!(
        "a MuxWorker answered one message with {} results: {parts:?}",
        parts.len()
    );
    worker.shutdown().await;
    master.shutdown().await?;
    Ok(())
}
