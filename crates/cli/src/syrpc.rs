//! `rylm syrpc`: serve and call SyRPC from the command line.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rylm_syrpc::{Client, Handlers, QueueType, ResultId, Server, Settings};
use serde_json::Value;

#[derive(Args, Debug)]
pub(crate) struct Connection {
    /// The broker, as an AMQP URI; several nodes of one cluster, comma-separated (or the
    /// option repeated), are tried in turn.
    #[arg(
        long,
        env = "RYLM_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2F",
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// The kind of the app's queues: `classic` (what the published peers declare) or
    /// `quorum` (replicated over a cluster). Every peer of the app must use the same.
    #[arg(long, default_value = "classic", value_parser = ["classic", "quorum"], env = "RYLM_SYRPC_QUEUE_TYPE")]
    queue_type: String,
    /// The app name: servers and clients of one app share its queues.
    #[arg(long, default_value = "syrpc")]
    app: String,
    /// How long a result waits in its queue, in seconds (`x-message-ttl`; a result fetched
    /// later is gone). Every peer of the app must use the same value: the broker refuses to
    /// declare a queue again with other arguments.
    #[arg(long, default_value_t = 10.0, env = "RYLM_SYRPC_MSG_TTL")]
    msg_ttl: f64,
    /// How long an unused result queue lives, in seconds (`x-expires`). Every peer of the app
    /// must use the same value.
    #[arg(long, default_value_t = 10_800.0, env = "RYLM_SYRPC_QUEUE_TTL")]
    queue_ttl: f64,
    /// How many result queues results are spread over. Every peer of the app must use the
    /// same number, or results go to queues nobody reads.
    #[arg(long, default_value_t = 64, env = "RYLM_SYRPC_NUM_QUEUES")]
    num_queues: u32,
    /// Give up reconnecting to the broker after this many seconds (default: never).
    #[arg(long, env = "RYLM_SYRPC_RECONNECT_FOR")]
    reconnect_for: Option<f64>,
    /// How long a handler may run, in seconds; past it, the caller gets an exception.
    #[arg(long, default_value_t = 300.0, env = "RYLM_SYRPC_HANDLER_TIMEOUT")]
    handler_timeout: f64,
    /// How long a publish may wait for the broker's confirm, in seconds.
    #[arg(long, default_value_t = 30.0, env = "RYLM_SYRPC_CONFIRM_TIMEOUT")]
    confirm_timeout: f64,
    /// Publish calls' requests (and so their results) persistent, written to the broker's
    /// disk. By default they are transient and a waiting caller publishes its request again
    /// after a reconnection, which covers what a broker restart loses.
    #[arg(long, env = "RYLM_SYRPC_PERSISTENT_CALLS")]
    persistent_calls: bool,
}

impl Connection {
    fn settings(&self) -> Result<Settings> {
        let reconnect_for = self.reconnect_for.map(seconds).transpose()?;
        let queue_type = match self.queue_type.as_str() {
            "quorum" => QueueType::Quorum,
            _ => QueueType::Classic,
        };
        let settings = Settings::new(&self.app, "")
            .with_urls(self.url.iter().cloned())
            .with_queue_type(queue_type)
            .with_ttls(seconds(self.queue_ttl)?, seconds(self.msg_ttl)?)
            .with_num_queues(self.num_queues)
            .with_connect_timeouts(Duration::from_secs(10), reconnect_for)
            .with_limits(
                seconds(self.handler_timeout)?,
                seconds(self.confirm_timeout)?,
            )
            .with_persistent_calls(self.persistent_calls);
        settings.validate()?;
        Ok(settings)
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum SyrpcCommand {
    /// Serves the built-in types until Ctrl-C: echo, upper, reverse, sleep (data: milliseconds),
    /// fail (answers an exception).
    Serve {
        #[command(flatten)]
        connection: Connection,
        /// How many requests to work on at once.
        #[arg(long, default_value_t = 4)]
        prefetch: u16,
        /// Where to serve /metrics, /healthz and /readyz over HTTP (none by default).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Puts a request and waits for its result.
    Call {
        #[command(flatten)]
        connection: Connection,
        /// The request type.
        type_: String,
        /// The data, as JSON (a bare word is taken as a string).
        #[arg(default_value = "null")]
        data: String,
        /// How long to wait for the result, in seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Puts a request and prints its result id at once (fetch it later with `get`).
    Put {
        #[command(flatten)]
        connection: Connection,
        /// The request type.
        type_: String,
        /// The data, as JSON (a bare word is taken as a string).
        #[arg(default_value = "null")]
        data: String,
    },
    /// Fetches the result of a request by its id, from any process.
    Get {
        #[command(flatten)]
        connection: Connection,
        /// The result id that `put` printed.
        result_id: String,
        /// How long to wait for the result, in seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

/// The JSON of a command-line argument; a bare word is a string.
fn parse_data(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn seconds(value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{value} is not a number of seconds"))
}

/// The built-in types of `rylm syrpc serve`.
pub(crate) fn builtin_handlers() -> Handlers {
    Handlers::new()
        .on("echo", |data| async move { Ok::<_, String>(data) })
        .on("upper", |data| async move {
            let text = data.as_str().ok_or("upper takes a string")?;
            Ok::<_, String>(Value::from(text.to_uppercase()))
        })
        .on("reverse", |data| async move {
            let text = data.as_str().ok_or("reverse takes a string")?;
            Ok::<_, String>(Value::from(text.chars().rev().collect::<String>()))
        })
        .on("sleep", |data| async move {
            let millis = data
                .as_u64()
                .ok_or("sleep takes a number of milliseconds")?;
            tokio::time::sleep(Duration::from_millis(millis.min(60_000))).await;
            Ok::<_, String>(Value::from(millis))
        })
        .on("fail", |data| async move {
            Err::<Value, _>(format!("failed on purpose with {data}"))
        })
}

pub(crate) async fn run(command: SyrpcCommand) -> Result<()> {
    match command {
        SyrpcCommand::Serve {
            connection,
            prefetch,
            admin,
        } => {
            let server = Server::connect(connection.settings()?.with_prefetch(prefetch)).await?;
            let shows = crate::admin::Shows::Syrpc(server.counters());
            let admin = crate::admin::start("syrpc", admin, shows).await?;
            crate::lifecycle::listen()?;
            eprintln!(
                "rylm syrpc: serving app {:?} (echo, upper, reverse, sleep, fail); SIGTERM or Ctrl-C stops",
                connection.app
            );
            server
                .serve(builtin_handlers(), async {
                    if let Err(error) =
                        crate::lifecycle::until_stopped("syrpc", std::future::pending()).await
                    {
                        eprintln!("rylm syrpc: {error:#}; stopping");
                    }
                })
                .await?;
            server.close().await;
            if let Some(admin) = admin {
                admin.shutdown().await;
            }
            Ok(())
        }
        SyrpcCommand::Call {
            connection,
            type_,
            data,
            timeout,
        } => {
            let client = Client::connect(connection.settings()?).await?;
            let result = client
                .call(&type_, &parse_data(&data), Some(seconds(timeout)?))
                .await;
            client.close().await;
            print_result(result)
        }
        SyrpcCommand::Put {
            connection,
            type_,
            data,
        } => {
            let client = Client::connect(connection.settings()?).await?;
            let id = client.put_request(&type_, &parse_data(&data)).await?;
            client.close().await;
            println!("{id}");
            Ok(())
        }
        SyrpcCommand::Get {
            connection,
            result_id,
            timeout,
        } => {
            let client = Client::connect(connection.settings()?).await?;
            let result = client
                .get_result(&ResultId::from(result_id), Some(seconds(timeout)?))
                .await;
            client.close().await;
            print_result(result)
        }
    }
}

fn print_result(result: Result<Value, rylm_syrpc::Error>) -> Result<()> {
    match result {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(rylm_syrpc::Error::Remote { exception, .. }) => {
            bail!("the server answered with an exception: {exception}")
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_words_are_strings_and_json_is_json() {
        assert_eq!(parse_data("hello"), Value::from("hello"));
        assert_eq!(parse_data("[1,2]"), serde_json::json!([1, 2]));
        assert_eq!(parse_data("\"quoted\""), Value::from("quoted"));
    }

    #[test]
    fn every_setting_peers_must_share_comes_from_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            connection: Connection,
        }
        let parse = |args: &[&str]| {
            Wrapper::try_parse_from(std::iter::once("rylm").chain(args.iter().copied()))
                .expect("parses")
                .connection
                .settings()
        };
        let settings = parse(&[
            "--app",
            "shop",
            "--url",
            "amqp://a:1/%2F,amqp://b:2/%2F",
            "--queue-type",
            "quorum",
            "--msg-ttl",
            "30",
            "--queue-ttl",
            "600",
            "--num-queues",
            "8",
            "--reconnect-for",
            "5",
            "--handler-timeout",
            "2.5",
            "--confirm-timeout",
            "3",
            "--persistent-calls",
        ])
        .expect("valid");
        assert_eq!(settings.msg_ttl, Duration::from_secs(30));
        assert_eq!(settings.ttl, Duration::from_secs(600));
        assert_eq!(settings.num_queues, 8);
        assert_eq!(settings.reconnect_for, Some(Duration::from_secs(5)));
        assert_eq!(settings.handler_timeout, Duration::from_millis(2500));
        assert_eq!(settings.confirm_timeout, Duration::from_secs(3));
        assert_eq!(
            settings.urls().collect::<Vec<_>>(),
            ["amqp://a:1/%2F", "amqp://b:2/%2F"]
        );
        assert_eq!(settings.queue_type, QueueType::Quorum);
        assert!(settings.persistent_calls);
        // The defaults are the peers'; reconnecting goes on for as long as it runs.
        let defaults = parse(&[]).expect("valid");
        assert_eq!(defaults.msg_ttl, Duration::from_secs(10));
        assert_eq!(defaults.num_queues, 64);
        assert_eq!(defaults.reconnect_for, None);
        assert_eq!(defaults.queue_type, QueueType::Classic);
        assert!(!defaults.persistent_calls);
        assert!(parse(&["--num-queues", "0"]).is_err());
        assert!(parse(&["--msg-ttl=-1"]).is_err());
    }

    #[tokio::test]
    async fn builtin_types_answer_and_refuse_bad_input() {
        let handlers = builtin_handlers();
        let request = |type_: &str, data: Value| rylm_syrpc::Request {
            type_: type_.into(),
            result_id: ResultId::new(),
            data,
            traceparent: None,
        };
        assert_eq!(
            handlers.run(&request("upper", "abc".into())).await,
            Value::from("ABC")
        );
        assert_eq!(
            handlers.run(&request("reverse", "abc".into())).await,
            Value::from("cba")
        );
        let refused = handlers.run(&request("upper", 1.into())).await;
        assert!(rylm_syrpc::protocol::exception_of(&refused).is_some());
        let failed = handlers.run(&request("fail", 1.into())).await;
        assert_eq!(
            failed,
            rylm_syrpc::protocol::exception("failed on purpose with 1")
        );
    }
}
