//! pylm's Master with Workers: the master farms messages out to whichever worker has a free
//! credit; a client streams a job through them.
//!
//! `cargo run -p rylm-examples --bin pylm_master`

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rylm_components::{Client, Functions, Master, Worker};

fn functions(name: &'static str) -> Functions {
    Functions::new().add("square", move |n: Bytes| async move {
        let n: u64 = String::from_utf8_lossy(&n)
            .parse()
            .map_err(|_| "square takes a number")?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, &str>(Bytes::from(format!("{}:{name}", n * n)))
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let master = Master::builder("squares").start().await?;
    println!(
        "== a Master at {}; workers connect to {}",
        master.db_address(),
        master.worker_address()
    );
    let mut workers = Vec::new();
    for name in ["worker-1", "worker-2"] {
        workers.push(
            Worker::builder(functions(name))
                .credits(4)
                .connect_via_cache(master.db_address(), Duration::from_secs(5))
                .await?,
        );
    }
    let client = Client::connect(master.db_address(), Duration::from_secs(5)).await?;
    let mut results = client.job("square", (1..=20).map(|n| Bytes::from(n.to_string())), 8);
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0u64;
    while let Some((_, result)) = results.recv().await {
        let text = String::from_utf8_lossy(&result?).into_owned();
        let (square, worker) = text.split_once(':').unwrap_or((&text, "?"));
        total += square.parse::<u64>().unwrap_or(0);
        *by_worker.entry(worker.to_owned()).or_default() += 1;
    }
    println!("a job of 20 squares, 8 in flight: sum {total}, served by {by_worker:?}");
    for worker in workers {
        worker.shutdown().await;
    }
    master.shutdown().await?;
    Ok(())
}
