//! `rylm gilmour`: the nodes of a Gilmour network and their health, and one request or signal
//! from the command line (traced like any rylm node's).

use std::time::Duration;

use anyhow::{Context, Result};
use rylm_gilmour::node::Node;
use serde_json::Value;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum GilmourCommand {
    /// Sends a request to a topic and prints the reply (`{"code":..,"data":..}`); fails when
    /// the code is 300 or more.
    Request {
        /// The Redis of the Gilmour network.
        #[arg(long, env = "RYLM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// The topic.
        topic: String,
        /// The data, JSON (text that is not JSON is sent as a string).
        #[arg(default_value = "null")]
        data: String,
        /// How long to wait for the reply, in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Publishes a signal on a topic and prints how many subscriptions heard it.
    Signal {
        /// The Redis of the Gilmour network.
        #[arg(long, env = "RYLM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// The topic.
        topic: String,
        /// The data, JSON (text that is not JSON is sent as a string).
        #[arg(default_value = "null")]
        data: String,
    },
    /// Lists the nodes of the health registry and pings each, as the engines' monitors do.
    Status {
        /// The Redis of the Gilmour network.
        #[arg(long, env = "RYLM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// How long each ping may take, in seconds.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
}

pub(crate) async fn run(command: GilmourCommand) -> Result<()> {
    match command {
        GilmourCommand::Status {
            redis,
            json,
            timeout,
        } => status(&redis, json, timeout).await,
        GilmourCommand::Request {
            redis,
            topic,
            data,
            timeout,
        } => {
            let deadline = Duration::try_from_secs_f64(timeout)
                .context("--timeout is not a number of seconds")?;
            let node = Node::connect(&redis).await?;
            let reply = node.request(&topic, json_or_text(&data), deadline).await;
            node.shutdown().await;
            let reply = reply?;
            println!(
                "{}",
                serde_json::json!({ "code": reply.code(), "data": reply.data })
            );
            if reply.failed() {
                anyhow::bail!("{topic} answered code {}", reply.code());
            }
            Ok(())
        }
        GilmourCommand::Signal { redis, topic, data } => {
            let node = Node::connect(&redis).await?;
            let heard = node.signal(&topic, json_or_text(&data)).await;
            node.shutdown().await;
            println!("{}", serde_json::json!({ "receivers": heard? }));
            Ok(())
        }
    }
}

/// `text` as JSON, or as a JSON string when it is not JSON.
fn json_or_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::from(text))
}

/// Lists the nodes of the health registry and pings each, at once.
async fn status(redis: &str, json: bool, timeout: f64) -> Result<()> {
    let deadline =
        Duration::try_from_secs_f64(timeout).context("--timeout is not a number of seconds")?;
    let node = std::sync::Arc::new(Node::connect(redis).await?);
    let known = node.known_nodes().await;
    // Every node pinged at once: a registry full of gone nodes costs one timeout, not one each.
    let mut pings = tokio::task::JoinSet::new();
    for (i, (ident, registered)) in known.as_deref().unwrap_or_default().iter().enumerate() {
        let (node, ident, registered) = (node.clone(), ident.clone(), registered.clone());
        pings.spawn(async move {
            let channel = rylm_gilmour::protocol::health_channel(&ident);
            let (code, answer) = match node.request(&channel, Value::Null, deadline).await {
                Ok(reply) => (reply.code(), reply.data),
                Err(error) => (0, Value::from(error.to_string())),
            };
            let report = serde_json::json!({
                "ident": ident, "registered": registered, "code": code, "answer": answer,
            });
            (i, report)
        });
    }
    let mut nodes: Vec<(usize, Value)> = pings.join_all().await;
    nodes.sort_by_key(|(i, _)| *i);
    let nodes: Vec<Value> = nodes.into_iter().map(|(_, report)| report).collect();
    node.shutdown().await;
    known?;
    if json {
        println!("{}", serde_json::json!({ "nodes": nodes }));
        return Ok(());
    }
    if nodes.is_empty() {
        println!("no node in the health registry");
    }
    for node in &nodes {
        let answer = match &node["answer"] {
            Value::Array(channels) => channels
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        println!(
            "{}  {}  {}",
            node["ident"].as_str().unwrap_or_default(),
            node["code"],
            answer
        );
    }
    Ok(())
}
