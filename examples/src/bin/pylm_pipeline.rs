//! pylm's Pipeline, Hub and Sink: servers chained by their streams (PUSH to the next stage's PULL).
//!
//! A Server runs the first stage; a Pipeline stage the second; a Hub farms a third stage out to
//! a worker; two streams meet in a Sink. `cargo run -p rylm-examples --bin pylm_pipeline`

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rylm_components::{Client, Functions, Master, Server, Worker};

fn map(name: &str, f: fn(&str) -> String) -> Functions {
    Functions::new().add(name, move |p: Bytes| async move {
        Ok::<_, String>(Bytes::from(f(&String::from_utf8_lossy(&p))))
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let deadline = Duration::from_secs(5);
    let first = Server::builder("first")
        .functions(map("upper", |s| s.to_uppercase()))
        .start()
        .await?;
    let second = Server::pipeline("second", first.stream_address(), "first")
        .functions(map("exclaim", |s| format!("{s}!")))
        .start()
        .await?;
    let hub = Master::builder("hub")
        .subscribe_to(second.stream_address(), &["second"])
        .start()
        .await?;
    let worker = Worker::builder(map("brackets", |s| format!("[{s}]")))
        .connect_via_cache(hub.db_address(), deadline)
        .await?;

    let client =
        Client::connect_with_results_from(first.db_address(), Some(hub.db_address()), deadline)
            .await?;
    let result = client
        .eval_stages(
            &["first.upper", "second.exclaim", "hub.brackets"],
            "through three servers",
        )
        .await?;
    println!(
        "Server -> Pipeline -> Hub (a worker): {}",
        String::from_utf8_lossy(&result)
    );

    let other = Server::builder("other")
        .functions(map("lower", |s| s.to_lowercase()))
        .start()
        .await?;
    let sink = Server::sink("sink")
        .subscribe_to(first.stream_address(), &["first"])
        .subscribe_to(other.stream_address(), &["other"])
        .functions(map("tag", |s| format!("sink saw: {s}")))
        .start()
        .await?;
    let a =
        Client::connect_with_results_from(first.db_address(), Some(sink.db_address()), deadline)
            .await?;
    let b =
        Client::connect_with_results_from(other.db_address(), Some(sink.db_address()), deadline)
            .await?;
    println!(
        "into the Sink from first: {}",
        String::from_utf8_lossy(&a.eval_stages(&["first.upper", "sink.tag"], "left").await?)
    );
    println!(
        "into the Sink from other: {}",
        String::from_utf8_lossy(&b.eval_stages(&["other.lower", "sink.tag"], "RIGHT").await?)
    );

    worker.shutdown().await;
    for server in [sink, other, second, first] {
        server.shutdown().await?;
    }
    hub.shutdown().await?;
    Ok(())
}
