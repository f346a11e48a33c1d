//! SyRPC's stateless pattern: backend 0 puts a request and hands its result id to the web
//! client; backend 1, with no shared state but the id, fetches the result.
//!
//! Each role has a connection of its own, as three processes would. Run it with
//! `cargo xtask demo`, or against your own broker:
//!
//! ```sh
//! RYLM_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F cargo run -p rylm-examples --bin syrpc_stateless
//! ```
//!
//! The same with processes, from a shell: `rylm syrpc serve`, then `rylm syrpc put upper hello`
//! in one terminal and `rylm syrpc get <id>` in another.

use std::time::Duration;

use anyhow::{Context, Result};
use rylm_syrpc::{Client, Handlers, Server, Settings};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("RYLM_AMQP_URL").context(
        "RYLM_AMQP_URL is not set: run this with `cargo xtask demo`, which starts RabbitMQ",
    )?;
    let settings = Settings::new(
        format!("stateless_demo_{}", std::process::id()),
        url.as_str(),
    )
    .with_timeout(Some(Duration::from_secs(10)));
    println!(
        "== SyRPC's stateless pattern on {}",
        rylm_syrpc::protocol::redact(&url)
    );

    // The server: any number of these may run; each takes one request at a time.
    let server = Server::connect(settings.clone()).await?;
    let handlers = Handlers::new().on("render", |data: Value| async move {
        let name = data["name"].as_str().ok_or("render needs a name")?;
        Ok::<_, String>(json!({ "html": format!("<p>Hello, {name}!</p>") }))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server
            .serve(handlers, async {
                let _ = stopped.await;
            })
            .await
    });

    // Backend 0 answers the web client's first request: it puts the work and returns the id.
    let backend0 = Client::connect(settings.clone()).await?;
    let result_id = backend0
        .put_request("render", &json!({ "name": "Zoë" }))
        .await?;
    backend0.close().await;
    println!("backend 0: put a `render` request; the page carries result id {result_id}");

    // The web client's AJAX call reaches backend 1, which knows nothing but the id.
    let backend1 = Client::connect(settings.clone()).await?;
    let result = backend1.get_result(&result_id, None).await?;
    println!("backend 1: fetched the result by id: {result}");

    // A failing request comes back as a typed error, not as a hang.
    match backend1.call("render", &json!({}), None).await {
        Err(rylm_syrpc::Error::Remote { exception, .. }) => {
            println!("a bad request answers an exception: {exception}")
        }
        other => anyhow::bail!("expected an exception, got {other:?}"),
    }
    backend1.close().await;

    let _ = stop.send(());
    serving.await??;
    println!("the server drained and stopped");
    Ok(())
}
