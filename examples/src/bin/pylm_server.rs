//! pylm's Server: one process runs the functions itself; a client finds it from its cache.
//!
//! `cargo run -p rylm-examples --bin pylm_server`

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rylm_components::{Client, Functions, Server};

#[tokio::main]
async fn main() -> Result<()> {
    let functions = Functions::new()
        .add("upper", |text: Bytes| async move {
            Ok::<_, String>(Bytes::from(String::from_utf8_lossy(&text).to_uppercase()))
        })
        .add_blocking("count", |text: Bytes| {
            Ok::<_, String>(Bytes::from(text.len().to_string()))
        });
    let server = Server::builder("text").functions(functions).start().await?;
    println!(
        "== a Server named {:?}; its cache at {}",
        server.name(),
        server.db_address()
    );

    let client = Client::connect(server.db_address(), Duration::from_secs(5)).await?;
    let upper = client
        .eval("upper", "a server runs functions itself")
        .await?;
    println!("eval upper -> {}", String::from_utf8_lossy(&upper));
    let both = client
        .eval_stages(&["upper", "count"], "two stages")
        .await?;
    println!("stages upper, count -> {}", String::from_utf8_lossy(&both));
    match client.eval("missing", "x").await {
        Err(error) => println!("an unknown function is a typed error: {error}"),
        Ok(_) => anyhow::bail!("expected an error"),
    }
    let key = client.set(None, "kept in the server's cache").await?;
    println!(
        "cache set -> key {key}; get -> {:?}",
        client
            .get(&key)
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    );
    server.shutdown().await?;
    Ok(())
}
