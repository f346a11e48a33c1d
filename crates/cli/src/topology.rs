//! `rylm server|master|hub|worker|pipeline|sink|client`: pylm's topologies from the shell, with
//! built-in functions for trying them without writing code.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use rylm_components::{Client, Functions, Master, Server, Worker};

use crate::admin::{self, Shows};
use crate::lifecycle::{drain, shutdown_limit, until_stopped};
use crate::security::SecurityArgs;

/// pylm's customary ports on loopback, so that the commands find each other with no flags.
const PULL: &str = "tcp://127.0.0.1:5555";
const PUB: &str = "tcp://127.0.0.1:5556";
const WORKERS: &str = "tcp://127.0.0.1:5557";
const DB: &str = "tcp://127.0.0.1:5559";

/// The built-in functions: `echo`, `upper`, `reverse`, `sleep:<ms>`, `fail` and `pid` (the
/// process id of whoever ran it).
pub(crate) fn builtins() -> Functions {
    Functions::new()
        .add("echo", |p: Bytes| async move { Ok::<_, String>(p) })
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(String::from_utf8_lossy(&p).to_uppercase()))
        })
        .add("reverse", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(
                String::from_utf8_lossy(&p)
                    .chars()
                    .rev()
                    .collect::<String>(),
            ))
        })
        .add_parameterized("sleep", |ms: String, p: Bytes| async move {
            let millis: u64 = ms
                .parse()
                .map_err(|_| format!("sleep:<ms> needs a number, got {ms:?}"))?;
            tokio::time::sleep(Duration::from_millis(millis.min(60_000))).await;
            Ok::<_, String>(p)
        })
        .add("fail", |p: Bytes| async move {
            Err::<Bytes, _>(format!("failed on purpose ({} bytes)", p.len()))
        })
        .add("pid", |_p: Bytes| async move {
            Ok::<_, String>(Bytes::from(std::process::id().to_string()))
        })
}

#[derive(Args, Debug)]
pub(crate) struct ServerArgs {
    /// The server's name (clients check it).
    #[arg(long, default_value = "rylm")]
    name: String,
    /// Where callers connect (a ROUTER; in pylm's layout the PULL clients push to). Default:
    /// tcp://127.0.0.1:5555 for a server, master or hub; a free loopback port, given out by
    /// its cache, for a pipeline stage or sink.
    #[arg(long = "clients", visible_alias = "pull")]
    pull: Option<String>,
    /// Where next stages connect (a ROUTER; in pylm's layout the PUB of results).
    #[arg(long = "stream", visible_alias = "pub", default_value = PUB)]
    publish: String,
    /// The host remote peers dial, given out by the cache in place of the host bound (needed
    /// when binding 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// Where the cache answers (REP).
    #[arg(long, default_value = DB)]
    db: String,
    /// The wire format: `native`, or `pylm` so that pylm clients use it.
    #[arg(long, default_value = "native", value_parser = ["native", "pylm"])]
    wire: String,
    /// Seconds a stop (SIGTERM, SIGINT) waits for the messages in hand.
    #[arg(long, default_value_t = 10.0)]
    drain_for: f64,
    /// Messages from callers held at once (a server, pipeline or sink); beyond them a caller
    /// is answered `busy`.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Where to serve /metrics, /healthz and /readyz over HTTP (none by default).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Args, Debug)]
pub(crate) struct MasterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Where workers connect (ROUTER).
    #[arg(long, default_value = WORKERS)]
    workers: String,
    /// Messages waiting for a worker; beyond them a caller is answered `busy`.
    #[arg(long, default_value_t = 10_000)]
    max_waiting: usize,
    /// The most credits one worker may announce.
    #[arg(long, default_value_t = 256)]
    max_credits: usize,
}

#[derive(Args, Debug)]
pub(crate) struct PreviousArgs {
    /// The previous server's stream address (its `--stream`; in pylm's layout its PUB).
    #[arg(long = "previous", visible_alias = "previous-pub")]
    previous_pub: String,
    /// The previous server's name (in pylm's layout, the topic it publishes pipelined results
    /// under).
    #[arg(long)]
    previous_name: String,
}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// The master's cache address (the worker address is read from it).
    #[arg(long, default_value = DB)]
    db: String,
    /// Connect straight to this worker address instead (a gateway has no cache).
    #[arg(long)]
    connect: Option<String>,
    /// How many messages it runs at once.
    #[arg(long, default_value_t = 8)]
    credits: usize,
    /// The wire format: `native`, or `pylm` to serve a pylm master (or a rylm one in pylm mode).
    #[arg(long, default_value = "native", value_parser = ["native", "pylm"])]
    wire: String,
    /// Seconds a stop (SIGTERM, SIGINT) waits for the messages in hand.
    #[arg(long, default_value_t = 10.0)]
    drain_for: f64,
    /// Where to serve /metrics, /healthz and /readyz over HTTP (none by default).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ClientAction {
    /// Calls a function once.
    Eval {
        /// The function (`echo`, or `server.echo`).
        function: String,
        /// The payload.
        #[arg(default_value = "")]
        payload: String,
    },
    /// Calls a function once per payload, several at once.
    Job {
        /// The function.
        function: String,
        /// The payloads.
        payloads: Vec<String>,
        /// How many calls at once.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
    },
    /// Runs the payload through a pipeline of functions (comma-separated, `server.fn`).
    Stages {
        /// The stages, e.g. `first.upper,second.reverse`.
        stages: String,
        /// The payload.
        payload: String,
    },
    /// Stores a value in the cache.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Reads a value from the cache.
    Get {
        /// The key.
        key: String,
    },
    /// Removes a value from the cache.
    Delete {
        /// The key.
        key: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    /// The server's cache address.
    #[arg(long, default_value = DB)]
    db: String,
    /// Take results from the last server of a pipeline too: its cache address.
    #[arg(long)]
    results_from: Option<String>,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The wire format: `native`, or `pylm` to call a pylm server or master.
    #[arg(long, default_value = "native", value_parser = ["native", "pylm"])]
    wire: String,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(subcommand)]
    action: ClientAction,
}

async fn stop_admin(admin: Option<rylm_admin::Admin>) {
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
}

fn announce(what: &str, addresses: &[(&str, &str)]) -> Result<()> {
    crate::lifecycle::listen()?;
    for (role, address) in addresses {
        eprintln!("rylm {what}: {role} at {address}");
    }
    eprintln!(
        "rylm {what}: built-in functions echo, upper, reverse, sleep:<ms>, fail, pid; SIGTERM or Ctrl-C stops"
    );
    Ok(())
}

pub(crate) async fn server(args: ServerArgs) -> Result<()> {
    let functions = builtins();
    let mut builder = Server::builder(&args.name)
        .client_address(args.pull.as_deref().unwrap_or(PULL))
        .stream_address(&args.publish)
        .db_address(&args.db)
        .functions(functions.clone())
        .max_in_flight(args.max_in_flight)
        .transport(args.security.transport()?);
    if args.wire == "pylm" {
        builder = builder.pylm_wire();
    }
    if let Some(host) = &args.advertise {
        builder = builder.advertise(host);
    }
    let server = builder.start().await?;
    announce(
        "server",
        &[
            ("callers", server.client_address()),
            ("stream", server.stream_address()),
            ("cache", server.db_address()),
        ],
    )?;
    let shows = Shows::Server(server.counters(), functions);
    let admin = admin::start("server", args.admin, shows).await?;
    let drain_for = drain(args.drain_for)?;
    let stopped = until_stopped("server", server.died()).await;
    server.shutdown_within(shutdown_limit(drain_for)).await?;
    stop_admin(admin).await;
    stopped
}

pub(crate) async fn master(args: MasterArgs, previous: Option<PreviousArgs>) -> Result<()> {
    let mut builder = Master::builder(&args.server.name)
        .stream_address(&args.server.publish)
        .worker_address(&args.workers)
        .db_address(&args.server.db)
        .admission(rylm_components::Admission {
            max_waiting: args.max_waiting,
            max_credits: args.max_credits,
            ..rylm_components::Admission::default()
        })
        .transport(args.server.security.transport()?);
    if args.server.wire == "pylm" {
        builder = builder.pylm_wire();
    }
    if let Some(host) = &args.server.advertise {
        builder = builder.advertise(host);
    }
    builder = match &previous {
        Some(previous) => {
            builder.subscribe_to(&previous.previous_pub, &[previous.previous_name.as_str()])
        }
        None => builder,
    };
    builder = builder.client_address(args.server.pull.as_deref().unwrap_or(PULL));
    let master = builder.start().await?;
    let what = if previous.is_some() { "hub" } else { "master" };
    announce(
        what,
        &[
            ("callers", master.client_address()),
            ("stream", master.stream_address()),
            ("workers", master.worker_address()),
            ("cache", master.db_address()),
        ],
    )?;
    let shows = Shows::Master {
        pool: master.status(),
        pylm: args.server.wire == "pylm",
    };
    let admin = admin::start(what, args.server.admin, shows).await?;
    let drain_for = drain(args.server.drain_for)?;
    let stopped = until_stopped(what, master.died()).await;
    master.shutdown_within(shutdown_limit(drain_for)).await?;
    stop_admin(admin).await;
    stopped
}

pub(crate) async fn worker(args: WorkerArgs) -> Result<()> {
    let transport = rylm_components::Transport {
        connected: args.security.connecting()?,
        ..rylm_components::Transport::default()
    };
    let functions = builtins();
    let builder = Worker::builder(functions.clone())
        .credits(args.credits)
        .transport(transport);
    let (worker, target) = match &args.connect {
        _ if args.wire == "pylm" => (
            builder
                .connect_pylm(&args.db, Duration::from_secs(10))
                .await?,
            args.db.as_str(),
        ),
        Some(address) => (builder.connect(address).await?, address.as_str()),
        None => (
            builder
                .connect_via_cache(&args.db, Duration::from_secs(10))
                .await?,
            args.db.as_str(),
        ),
    };
    let admin = admin::start("worker", args.admin, Shows::Worker(functions)).await?;
    announce("worker", &[("master", target)])?;
    crate::lifecycle::until_stopped("worker", worker.died()).await?;
    if !worker.shutdown_within(drain(args.drain_for)?).await {
        eprintln!("rylm worker: stopped before its messages in hand were answered");
    }
    stop_admin(admin).await;
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct GatewayArgs {
    /// Where HTTP clients connect.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Where workers connect (`rylm worker --connect <this>`).
    #[arg(long, default_value = WORKERS)]
    workers: String,
    /// Seconds a request waits for its worker before a 504.
    #[arg(long, default_value_t = 30.0)]
    deadline: f64,
    /// The largest request body, in bytes; above it, 413.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    max_body: usize,
    /// How many requests at once, over all connections; above it, 503 with Retry-After.
    #[arg(long, default_value_t = 10_000)]
    concurrency: usize,
    /// How many connections at once; above it, a new connection gets 503 and is closed.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers, or stay idle between requests.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client may take to send a request's body (then 408).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// The workers' wire format: `native`, or `pylm` for pylm workers (`--db` of a pylm
    /// Worker is then the gateway's cache, which it prints).
    #[arg(long, default_value = "native", value_parser = ["native", "pylm"])]
    wire: String,
    /// Seconds a stop (SIGTERM, SIGINT) waits for the requests in hand.
    #[arg(long, default_value_t = 10.0)]
    drain_for: f64,
    /// Where to serve /metrics, /healthz and /readyz over HTTP (none by default).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    security: SecurityArgs,
}

pub(crate) async fn gateway(args: GatewayArgs) -> Result<()> {
    let config = rylm_gateway::GatewayConfig {
        listen: args.listen,
        workers: args.workers,
        deadline: Duration::try_from_secs_f64(args.deadline)
            .context("--deadline is not a number of seconds")?,
        max_body: args.max_body,
        concurrency: args.concurrency,
        max_connections: args.max_connections,
        header_timeout: Duration::try_from_secs_f64(args.header_timeout)
            .context("--header-timeout is not a number of seconds")?,
        body_timeout: Duration::try_from_secs_f64(args.body_timeout)
            .context("--body-timeout is not a number of seconds")?,
        pylm: args.wire == "pylm",
        transport: args.security.transport()?,
        ..rylm_gateway::GatewayConfig::default()
    };
    let gateway = rylm_gateway::HttpGateway::start(config).await?;
    let http = format!("http://{}", gateway.local_addr());
    match gateway.db_address() {
        Some(db) => eprintln!("rylm gateway: HTTP at {http}; pylm workers connect with --db {db}"),
        None => eprintln!(
            "rylm gateway: HTTP at {http}; workers connect with: rylm worker --connect {}",
            gateway.worker_address()
        ),
    }
    let shows = Shows::Gateway {
        pylm: gateway.pool_status().is_none(),
        pool: gateway.pool_status().unwrap_or_default(),
        routes: gateway.routes(),
    };
    let admin = admin::start("gateway", args.admin, shows).await?;
    crate::lifecycle::listen()?;
    eprintln!("rylm gateway: try curl -d hello {http}/upper; SIGTERM or Ctrl-C stops");
    let stopped = until_stopped("gateway", std::future::pending()).await;
    stop_admin(admin).await;
    stopped?;
    let limit = shutdown_limit(drain(args.drain_for)?);
    match tokio::time::timeout(limit, gateway.shutdown()).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => bail!("rylm gateway: the requests in hand were not answered within {limit:?}"),
    }
}

pub(crate) async fn pipeline(args: ServerArgs, previous: PreviousArgs) -> Result<()> {
    let functions = builtins();
    let mut builder = Server::pipeline(&args.name, &previous.previous_pub, &previous.previous_name)
        .stream_address(&args.publish)
        .db_address(&args.db)
        .functions(functions.clone())
        .max_in_flight(args.max_in_flight)
        .transport(args.security.transport()?);
    if args.wire == "pylm" {
        builder = builder.pylm_wire();
    }
    if let Some(host) = &args.advertise {
        builder = builder.advertise(host);
    }
    if let Some(address) = &args.pull {
        builder = builder.client_address(address);
    }
    let server = builder.start().await?;
    announce(
        "pipeline",
        &[
            ("callers", server.client_address()),
            ("stream", server.stream_address()),
            ("cache", server.db_address()),
        ],
    )?;
    let shows = Shows::Server(server.counters(), functions);
    let admin = admin::start("pipeline", args.admin, shows).await?;
    let drain_for = drain(args.drain_for)?;
    let stopped = until_stopped("pipeline", server.died()).await;
    server.shutdown_within(shutdown_limit(drain_for)).await?;
    stop_admin(admin).await;
    stopped
}

pub(crate) async fn sink(args: ServerArgs, previous: Vec<String>) -> Result<()> {
    let functions = builtins();
    let mut builder = Server::sink(&args.name)
        .stream_address(&args.publish)
        .db_address(&args.db)
        .functions(functions.clone())
        .max_in_flight(args.max_in_flight)
        .transport(args.security.transport()?);
    if args.wire == "pylm" {
        builder = builder.pylm_wire();
    }
    if let Some(host) = &args.advertise {
        builder = builder.advertise(host);
    }
    for spec in &previous {
        let (address, name) = spec
            .rsplit_once('=')
            .with_context(|| format!("--previous takes STREAM_ADDRESS=NAME, got {spec:?}"))?;
        builder = builder.subscribe_to(address, &[name]);
    }
    if let Some(address) = &args.pull {
        builder = builder.client_address(address);
    }
    let server = builder.start().await?;
    announce(
        "sink",
        &[
            ("callers", server.client_address()),
            ("stream", server.stream_address()),
            ("cache", server.db_address()),
        ],
    )?;
    let shows = Shows::Server(server.counters(), functions);
    let admin = admin::start("sink", args.admin, shows).await?;
    let drain_for = drain(args.drain_for)?;
    let stopped = until_stopped("sink", server.died()).await;
    server.shutdown_within(shutdown_limit(drain_for)).await?;
    stop_admin(admin).await;
    stopped
}

pub(crate) async fn client(args: ClientArgs) -> Result<()> {
    let deadline = Duration::try_from_secs_f64(args.timeout)
        .context("--timeout is not a number of seconds")?;
    let mut options = if args.wire == "pylm" {
        rylm_components::ClientOptions::pylm(deadline)
    } else {
        rylm_components::ClientOptions {
            deadline,
            ..rylm_components::ClientOptions::default()
        }
    };
    options.results_from = args.results_from.clone();
    options.transport = rylm_components::Transport {
        connected: args.security.connecting()?,
        ..rylm_components::Transport::default()
    };
    let client = Client::connect_with(&args.db, options).await?;
    let text = |bytes: &Bytes| String::from_utf8_lossy(bytes).into_owned();
    match args.action {
        ClientAction::Eval { function, payload } => {
            println!("{}", text(&client.eval(&function, payload).await?))
        }
        ClientAction::Stages { stages, payload } => {
            let stages: Vec<&str> = stages.split(',').collect();
            println!("{}", text(&client.eval_stages(&stages, payload).await?));
        }
        ClientAction::Job {
            function,
            payloads,
            in_flight,
        } => {
            let total = payloads.len();
            let mut results =
                client.job(&function, payloads.into_iter().map(Bytes::from), in_flight);
            // On a terminal, a progress bar on standard error; nothing when it is piped.
            let bar = indicatif::ProgressBar::with_draw_target(
                u64::try_from(total).ok(),
                indicatif::ProgressDrawTarget::stderr(),
            );
            let mut failed = 0;
            while let Some((index, result)) = results.recv().await {
                let line = match result {
                    Ok(value) => format!("{index}\t{}", text(&value)),
                    Err(error) => {
                        failed += 1;
                        format!("{index}\terror: {error}")
                    }
                };
                bar.suspend(|| println!("{line}"));
                bar.inc(1);
            }
            bar.finish_and_clear();
            if failed > 0 {
                bail!("{failed} of {total} calls failed");
            }
        }
        ClientAction::Set { key, value } => println!("{}", client.set(Some(&key), value).await?),
        ClientAction::Get { key } => match client.get(&key).await? {
            Some(value) => println!("{}", text(&value)),
            None => bail!("no value under {key:?}"),
        },
        ClientAction::Delete { key } => match client.delete(&key).await? {
            Some(value) => println!("{}", text(&value)),
            None => bail!("no value under {key:?}"),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtins_answer_and_fail_as_documented() {
        let server = Server::builder("t")
            .functions(builtins())
            .start()
            .await
            .expect("starts");
        let client = Client::connect(server.db_address(), Duration::from_secs(10))
            .await
            .expect("connects");
        assert_eq!(
            &client.eval("upper", "grüße").await.expect("answered")[..],
            "GRÜSSE".as_bytes()
        );
        assert_eq!(
            &client.eval("reverse", "abc").await.expect("answered")[..],
            b"cba"
        );
        assert_eq!(
            &client.eval("sleep:10", "x").await.expect("answered")[..],
            b"x"
        );
        assert!(client.eval("sleep:soon", "x").await.is_err());
        assert!(client.eval("fail", "x").await.is_err());
        server.shutdown().await.expect("clean");
    }
}
