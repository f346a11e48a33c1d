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
