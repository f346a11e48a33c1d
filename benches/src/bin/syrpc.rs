//! `cargo xtask bench syrpc`: SyRPC round trips through a real RabbitMQ, one at a time and many
//! in flight, beside a raw lapin request/response with direct reply-to in the same run (the
//! baseline of what the broker allows).
//!
//! Both sides run in this process, each with connections of its own. Three repetitions,
//! subject and baseline interleaved. Also: calls published persistent (`persistent_calls`),
//! eight clients sharing one result queue, and the same calls on a three-node cluster with
//! quorum queues. xtask provisions the brokers, passes `RYLM_AMQP_URL` and
//! `RYLM_AMQP_CLUSTER_URLS`, and reports their peak memory.

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
use rylm_benches::{Summary, measure, peak_rss_kib, spread};
use rylm_syrpc::{Client, Handlers, QueueType, Server, Settings};
use tokio::sync::oneshot;

const ONE_AT_A_TIME: usize = 1_000;
const IN_FLIGHT_TOTAL: usize = 4_000;
const IN_FLIGHT: usize = 200;
const DEADLINE: Duration = Duration::from_secs(30);
const REPETITIONS: usize = 3;
/// The shared-bucket run: this many clients, each on its own connection, every result id in
/// one bucket, `IN_FLIGHT` calls in flight between them.
const SHARED_CLIENTS: usize = 8;

/// One row: the subject's runs and the baseline's, in the same repetitions.
struct Row {
    label: String,
    subject: Vec<Summary>,
    baseline: Vec<Summary>,
}

impl Row {
    fn new(label: impl Into<String>) -> Row {
        Row {
            label: label.into(),
            subject: Vec::new(),
            baseline: Vec::new(),
        }
    }
}

fn print_rows(title: &str, rows: &[Row]) {
    println!(
        "{title}; calls/s as median (min-max) over {REPETITIONS} interleaved repetitions\n\n| run | rylm calls/s | raw lapin calls/s | rylm / raw (min / median / max) | rylm p50 / p99 (median repetition) |\n|---|---:|---:|---:|---:|"
    );
    for row in rows {
        let rates = |runs: &[Summary]| {
            let (min, median, max) = spread(&runs.iter().map(Summary::rate).collect::<Vec<_>>());
            format!("{median:.0} ({min:.0}-{max:.0})")
        };
        let ratios: Vec<f64> = row
            .subject
            .iter()
            .zip(&row.baseline)
            .map(|(a, b)| a.rate() / b.rate().max(f64::EPSILON))
            .collect();
        let (min, median, max) = spread(&ratios);
        let mut by_rate: Vec<&Summary> = row.subject.iter().collect();
        by_rate.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        let middle = by_rate[by_rate.len() / 2];
        println!(
            "| {} | {} | {} | {min:.2} / {median:.2} / {max:.2} | {:.2} ms / {:.2} ms |",
            row.label,
            rates(&row.subject),
            rates(&row.baseline),
            middle.p50.as_secs_f64() * 1e3,
            middle.p99.as_secs_f64() * 1e3,
        );
    }
    println!();
}

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("RYLM_AMQP_URL")
        .context("RYLM_AMQP_URL is not set: run `cargo xtask bench syrpc`")?;
    let payload = serde_json::json!({"text": "x".repeat(64)});

    let rylm = Rylm::start(
        Settings::new(format!("bench_{}", std::process::id()), &url),
        1,
    )
    .await?;
    // The same with calls published persistent (`persistent_calls`), what `put_request` and
    // the published peers do: the price of the broker's disk.
    let persistent = Rylm::start(
        Settings::new(format!("bench_persistent_{}", std::process::id()), &url)
            .with_persistent_calls(true),
        1,
    )
    .await?;
    let shared = Rylm::start(
        Settings::new(format!("bench_shared_{}", std::process::id()), &url).with_num_queues(1),
        SHARED_CLIENTS,
    )
    .await?;
    let raw = Arc::new(Raw::start(&url).await?);
    rylm.run("warm-up", 200, 20, &payload).await?;
    shared.run("warm-up", 200, 20, &payload).await?;
    persistent.run("warm-up", 200, 20, &payload).await?;
    raw.run("warm-up", 200, 20).await?;

    // Subject and baseline alternate, so that drift hits both.
    let mut rows = vec![
        Row::new("one at a time, 1,000 calls"),
        Row::new(format!("{IN_FLIGHT} in flight, 4,000 calls")),
        Row::new(format!(
            "shared bucket: {SHARED_CLIENTS} clients, one result queue, {IN_FLIGHT} in flight"
        )),
        Row::new("persistent calls, one at a time, 1,000 calls"),
        Row::new(format!(
            "persistent calls, {IN_FLIGHT} in flight, 4,000 calls"
        )),
    ];
    for _ in 0..REPETITIONS {
        rows[0].subject.push(
            rylm.run("rylm, one at a time", ONE_AT_A_TIME, 1, &payload)
                .await?,
        );
        rows[0]
            .baseline
            .push(raw.run("raw, one at a time", ONE_AT_A_TIME, 1).await?);
        rows[1].subject.push(
            rylm.run("rylm, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT, &payload)
                .await?,
        );
        rows[1].baseline.push(
            raw.run("raw, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT)
                .await?,
        );
        rows[2].subject.push(
            shared
                .run("rylm, shared bucket", IN_FLIGHT_TOTAL, IN_FLIGHT, &payload)
                .await?,
        );
        rows[2].baseline.push(
            raw.run("raw, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT)
                .await?,
        );
        rows[3].subject.push(
            persistent
                .run(
                    "rylm, persistent, one at a time",
                    ONE_AT_A_TIME,
                    1,
                    &payload,
                )
                .await?,
        );
        rows[3]
            .baseline
            .push(raw.run("raw, one at a time", ONE_AT_A_TIME, 1).await?);
        rows[4].subject.push(
            persistent
                .run(
                    "rylm, persistent, in flight",
                    IN_FLIGHT_TOTAL,
                    IN_FLIGHT,
                    &payload,
                )
                .await?,
        );
        rows[4].baseline.push(
            raw.run("raw, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT)
                .await?,
        );
    }
    print_rows("single RabbitMQ node, classic queues", &rows);

    // The same on the three-node cluster with quorum queues, against the raw baseline on its
    // first node (a classic queue: what one node allows).
    if let Some(cluster) = std::env::var("RYLM_AMQP_CLUSTER_URLS")
        .ok()
        .filter(|urls| !urls.is_empty())
    {
        let urls: Vec<String> = cluster.split(',').map(str::to_owned).collect();
        let settings = Settings::new(format!("bench_quorum_{}", std::process::id()), "")
            .with_urls(urls.clone())
            .with_queue_type(QueueType::Quorum);
        let quorum = Rylm::start(settings, 1).await?;
        let raw = Arc::new(Raw::start(&urls[0]).await?);
        quorum.run("warm-up", 200, 20, &payload).await?;
        raw.run("warm-up", 200, 20).await?;
        let mut rows = vec![
            Row::new("quorum queues, one at a time, 1,000 calls"),
            Row::new(format!("quorum queues, {IN_FLIGHT} in flight, 4,000 calls")),
        ];
        for _ in 0..REPETITIONS {
            rows[0].subject.push(
                quorum
                    .run("quorum, one at a time", ONE_AT_A_TIME, 1, &payload)
                    .await?,
            );
            rows[0]
                .baseline
                .push(raw.run("raw, one at a time", ONE_AT_A_TIME, 1).await?);
            rows[1].subject.push(
                quorum
                    .run("quorum, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT, &payload)
                    .await?,
            );
            rows[1].baseline.push(
                raw.run("raw, in flight", IN_FLIGHT_TOTAL, IN_FLIGHT)
                    .await?,
            );
        }
        print_rows(
            "three-node RabbitMQ cluster, quorum queues (raw lapin: a classic queue on node 1)",
            &rows,
        );
    }
    println!(
        "peak RSS of the bench process (every rylm client and server, raw clients and servers): {} KiB",
        peak_rss_kib(std::process::id()).unwrap_or(0)
    );
    Ok(())
}

/// A rylm server and `clients` clients (each on its own connection) of one app.
struct Rylm {
    clients: Vec<Client>,
    _stop: oneshot::Sender<()>,
}

impl Rylm {
    async fn start(settings: Settings, clients: usize) -> Result<Rylm> {
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
        let mut connected = Vec::new();
        for _ in 0..clients.max(1) {
            connected.push(Client::connect(settings.clone()).await?);
        }
        Ok(Rylm {
            clients: connected,
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
        let (clients, payload) = (Arc::new(self.clients.clone()), payload.clone());
        measure(name, total, in_flight, move |n| {
            let (client, payload) = (clients[n % clients.len()].clone(), payload.clone());
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
