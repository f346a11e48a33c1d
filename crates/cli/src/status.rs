//! `rylm status ADDR`: asks a running rylm server, master, hub or pipeline stage what it is and
//! how it is doing (it answers `rylm.status` itself), and prints a table, or the JSON with
//! `--json`. For Gilmour, `rylm gilmour status` lists the nodes of the health registry and
//! pings each.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rylm_components::{Client, STATUS_FUNCTION};
use serde_json::Value;

use crate::security::SecurityArgs;

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The server's cache address (what its clients are given).
    address: String,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[command(flatten)]
    security: SecurityArgs,
}

pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let deadline = Duration::try_from_secs_f64(args.timeout)
        .context("--timeout is not a number of seconds")?;
    let options = rylm_components::ClientOptions {
        deadline,
        transport: rylm_components::Transport {
            connected: args.security.connecting()?,
            ..rylm_components::Transport::default()
        },
        ..rylm_components::ClientOptions::default()
    };
    let client = Client::connect_with(&args.address, options).await?;
    let answer = client.eval(STATUS_FUNCTION, "").await?;
    let report: Value = serde_json::from_slice(&answer)
        .with_context(|| format!("{} answered something that is not a status", args.address))?;
    if args.json {
        println!("{report}");
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The report as a two-column table: nested objects flattened as `outer.inner`, lists joined.
pub(crate) fn table(report: &Value) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    flatten("", report, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, rows);
            }
        }
        Value::Array(items) => rows.push((
            prefix.to_owned(),
            items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(", "),
        )),
        Value::String(text) => rows.push((prefix.to_owned(), text.clone())),
        other => rows.push((prefix.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_a_table_of_flattened_keys() {
        let report = serde_json::json!({
            "name": "m", "functions": ["echo", "upper"], "workers": {"live": 2}
        });
        let table = table(&report);
        assert_eq!(
            table,
            "functions     echo, upper\nname          m\nworkers.live  2\n"
        );
    }
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum GilmourCommand {
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

pub(crate) async fn gilmour(command: GilmourCommand) -> Result<()> {
    let GilmourCommand::Status {
        redis,
        json,
        timeout,
    } = command;
    let deadline =
        Duration::try_from_secs_f64(timeout).context("--timeout is not a number of seconds")?;
    let node = std::sync::Arc::new(rylm_gilmour::node::Node::connect(&redis).await?);
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
