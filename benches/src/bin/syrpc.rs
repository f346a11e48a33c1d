//! `cargo xtask bench syrpc`: SyRPC round trips through a real RabbitMQ, one at a time and many
//! in flight, beside a raw lapin request/response with direct reply-to in the same run (the
//! baseline of what the broker allows).
//!
//! Both sides run in this process, each with connections of its own. xtask provisions the
//! broker, passes `RYLM_AMQP_URL`, and reports the broker's peak memory after the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rylm_benches::{Summary, measure, peak_rss_kib, table};
use rylm_syrpc::{Client, Handlers, Server, Settings};
use tokio::sync::oneshot;

const ONE_AT_A_TIME: usize = 1_000;
const IN_FLIGHT_TOTAL: usize = 4_000;
const IN_FLIGHT: usize = 200;
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("RYLM_AMQP_URL")
        .context("RYLM_AMQP_URL is not set: run `cargo xtask bench syrpc`")?;
    let payload = serde_json::json!({"text": "x".repeat(64)});

    // Warm-up, then the measured runs, alternating systems so that drift hits both.
    let rylm = Rylm::start(&url).await?;
    let raw = Arc::new(Raw::start(&url).await?);
    rylm.run("warm-up", 200, 20, &payload).await?;
    raw.run("warm-up", 200, 20).await?;

    let rylm_serial = rylm
        .run("rylm SyRPC, one at a time", ONE_AT_A_TIME, 1, &payload)
        .await?;
    let raw_serial = raw
        .run("raw lapin, one at a time", ONE_AT_A_TIME, 1)
        .await?;
    let rylm_parallel = rylm
        .run(
            &format!("rylm SyRPC, {IN_FLIGHT} in flight"),
            IN_FLIGHT_TOTAL,
            IN_FLIGHT,
            &payload,
        )
        .await?;
    let raw_parallel = raw
        .run(
            &format!("raw lapin, {IN_FLIGHT} in flight"),
            IN_FLIGHT_TOTAL,
            IN_FLIGHT,
        )
        .await?;

    println!(
        "{}",
        table(&[(&rylm_serial, &raw_serial), (&rylm_parallel, &raw_parallel)])
    );
    println!("| baseline run | ops | ops/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    for s in [&raw_serial, &raw_parallel] {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms |",
            s.name,
            s.count,
            s.rate(),
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "\npeak RSS of the bench process (rylm client and server, raw client and server): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    Ok(())
}

struct Rylm {
    client: Client,
    _stop: oneshot::Sender<()>,
}

impl Rylm {
    async fn start(url: &str) -> Result<Rylm> {
        let settings = Settings::new(format!("bench_{}", std::process::id()), url);
        let server = Server::connect(settings.clone().with_prefetch(64)).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let handlers = Handlers::new().on("echo", |data| async move { Ok::<_, String>(data) });
        tokio::spawn(async move {
            server
                .serve(handlers, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Rylm {
            client: Client::connect(settings).await?,
            _stop: stop,
        })
    }

    async fn run(
        &self,
        name: &str,
        total: usize,
        in_flight: usize,
        payload: &serde_json::Value,
    ) -> Result<Summary> {
        let (client, payload) = (self.client.clone(), payload.clone());
        measure(name, total, in_flight, move |_| {
            let (client, payload) = (client.clone(), payload.clone());
            async move {
                client.call("echo", &payload, Some(DEADLINE)).await?;
                Ok(())
            }
        })
        .await
    }
}

/// The baseline: a plain request/response over direct reply-to, no confirms, no buckets.
struct Raw {
    channel: Channel,
    queue: String,
    waiting: Arc<std::sync::Mutex<HashMap<String, oneshot::Sender<()>>>>,
    _connections: (Connection, Connection),
}

impl Raw {
    async fn start(url: &str) -> Result<Raw> {
        let queue = format!("raw_bench_{}", std::process::id());
        let server_connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let server = server_connection.create_channel().await?;
        server.basic_qos(64, BasicQosOptions::default()).await?;
        let options = QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        server
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await?;
        let mut requests = server
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = requests.next().await {
                let (Some(reply_to), Some(id)) = (
                    delivery.properties.reply_to().clone(),
                    delivery.properties.correlation_id().clone(),
                ) else {
                    continue;
                };
                let properties = BasicProperties::default().with_correlation_id(id);
                let _ = server
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &delivery.data,
                        properties,
                    )
                    .await;
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });

        let client_connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = client_connection.create_channel().await?;
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiting: Arc<std::sync::Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
        let dispatch = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(reply)) = replies.next().await {
                if let Some(id) = reply.properties.correlation_id() {
                    let sender = dispatch
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(id.as_str());
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                }
            }
        });
        Ok(Raw {
            channel,
            queue,
            waiting,
            _connections: (server_connection, client_connection),
        })
    }

    async fn call(&self, id: String, body: &[u8]) -> Result<()> {
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), sender);
        let properties = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.into());
        self.channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?;
        match tokio::time::timeout(DEADLINE, receiver).await {
            Ok(Ok(())) => Ok(()),
            _ => bail!("no raw reply within {DEADLINE:?}"),
        }
    }

    async fn run(self: &Arc<Raw>, name: &str, total: usize, in_flight: usize) -> Result<Summary> {
        let body = Arc::new(format!("{{\"text\":\"{}\"}}", "x".repeat(64)).into_bytes());
        let (raw, label) = (self.clone(), name.to_owned());
        measure(name, total, in_flight, move |n| {
            let (raw, body, id) = (raw.clone(), body.clone(), format!("{label}-{n}"));
            async move { raw.call(id, &body).await }
        })
        .await
    }
}
