//! `rylm`: the command line of the rylm toolkit.
//!
//! It reads and writes messages in each wire format (`rylm inspect`, `rylm encode`), which is
//! what one needs to look at a captured frame or to feed a peer by hand; it serves and calls
//! SyRPC (`rylm syrpc serve|call|put|get`), and services by path and METHOD (`rylm service`,
//! `rylm call`), and runs pylm's topologies (`rylm server|master|hub|worker|pipeline|sink|client`)
//! with built-in functions, and the HTTP gateway (`rylm gateway`), and the Gilmour proxy
//! (`rylm gilmour-proxy`). Every ZeroMQ command takes CURVE flags (`--curve-secret`,
//! `--curve-server-key`, `--curve-allow`), and `rylm keygen` writes the key pairs.
//!
//! Logs go to standard error through `tracing`, filtered by `RUST_LOG` (default `warn`); the
//! records that libraries write through the `log` crate (fred's, for Redis) are bridged into
//! the same output.

mod admin;
mod gilmour;
mod lifecycle;
mod security;
mod services;
mod settings;
mod status;
mod syrpc;
mod topology;

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rylm_message::{Codec, Function, JsonCodec, Message, NativeCodec, PylmCodec};

#[derive(Parser, Debug)]
#[command(name = "rylm", version, about = "rylm: message-oriented microservices")]
struct Cli {
    /// How log lines are written: `text`, or `json` (one object per line, for log shippers).
    #[arg(long, global = true, default_value = "text")]
    log_format: rylm_admin::logging::LogFormat,
    /// Send the spans of traced requests to this OpenTelemetry collector (OTLP over HTTP,
    /// `http://host:4318`); needs a `rylm` built with the `otlp` feature.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans (default `rylm-<command>`).
    #[arg(long, global = true, env = "OTEL_SERVICE_NAME")]
    otlp_service: Option<String>,
    /// Threads that run the process's work: `1` runs it all on one thread (no hand-offs
    /// between threads: the cheapest when processes outnumber cores, as with a master and its
    /// workers on one small machine); `0` (the default) one per core.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A pylm Server: runs the built-in functions itself.
    Server(topology::ServerArgs),
    /// A pylm Master: farms the work out to workers.
    Master(topology::MasterArgs),
    /// A pylm Hub: a master fed by a previous server's stream.
    Hub {
        #[command(flatten)]
        master: topology::MasterArgs,
        #[command(flatten)]
        previous: topology::PreviousArgs,
    },
    /// A worker of a master or hub, running the built-in functions.
    Worker(topology::WorkerArgs),
    /// A pipeline stage fed by a previous server.
    Pipeline {
        #[command(flatten)]
        server: topology::ServerArgs,
        #[command(flatten)]
        previous: topology::PreviousArgs,
    },
    /// A sink fed by several previous servers.
    Sink {
        #[command(flatten)]
        server: topology::ServerArgs,
        /// A previous server, as STREAM_ADDRESS=NAME (its stream address and name); repeatable.
        #[arg(long, required = true)]
        previous: Vec<String>,
    },
    /// An HTTP gateway: a master whose clients speak HTTP (`GET|POST /function`).
    Gateway(topology::GatewayArgs),
    /// A client of a server or master: eval, job, stages, and the cache.
    Client(topology::ClientArgs),
    /// What a running server, master, hub or stage is and how it is doing (a table, or --json).
    Status(status::StatusArgs),
    /// Gilmour: the nodes of the health registry, pinged.
    Gilmour {
        #[command(subcommand)]
        command: gilmour::GilmourCommand,
    },
    /// Serves built-in routes as a services-mux service (by path and METHOD over ZeroMQ).
    Service(services::ServeArgs),
    /// Calls a services-mux service.
    Call(services::CallArgs),
    /// SyRPC over RabbitMQ: serve the built-in types, or call, put and get.
    Syrpc {
        #[command(subcommand)]
        command: syrpc::SyrpcCommand,
    },
    /// The Gilmour HTTP proxy: programs in any language join a Gilmour network over HTTP.
    GilmourProxy(rylm_gilmour_proxy::ProxyArgs),
    /// Writes a CURVE key pair: BASE.key (public) and BASE.key_secret (secret).
    Keygen(security::KeygenArgs),
    /// Decode one message and print its fields.
    Inspect {
        /// The wire format of the input.
        #[arg(long, value_enum, default_value_t = Wire::Native)]
        wire: Wire,
        /// The input file (standard input when absent). For `native` it is the body, without
        /// the marker frame; a leading marker is accepted too.
        file: Option<PathBuf>,
    },
    /// Encode one message and write its bytes to standard output.
    Encode {
        /// The wire format of the output.
        #[arg(long, value_enum, default_value_t = Wire::Native)]
        wire: Wire,
        /// The function to call; several, separated by spaces, make a list of stages.
        #[arg(long)]
        function: String,
        /// The payload.
        #[arg(long, default_value = "")]
        payload: String,
        /// The client id.
        #[arg(long, default_value = "")]
        client: String,
        /// The stream id.
        #[arg(long, default_value = "")]
        pipeline: String,
        /// A header, as `name=value`; may be repeated.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Wire {
    Native,
    Json,
    Pylm,
}

impl Wire {
    fn codec(self) -> Box<dyn Codec> {
        match self {
            Wire::Native => Box::new(NativeCodec::default()),
            Wire::Json => Box::new(JsonCodec::default()),
            Wire::Pylm => Box::new(PylmCodec::default()),
        }
    }
}

fn parse_header(arg: &str) -> Result<(String, String), String> {
    arg.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected name=value, got {arg:?}"))
}

/// Installs the log, and the span exporter when an OTLP endpoint is set; the exporter sends
/// what is left when the returned handle drops at the end of `main`.
#[cfg(feature = "otlp")]
fn log_and_trace(cli: &Cli) -> Result<Option<rylm_admin::otlp::Exporter>> {
    let Some(endpoint) = cli.otlp_endpoint.clone() else {
        rylm_admin::logging::init(cli.log_format, "warn");
        return Ok(None);
    };
    let service = cli
        .otlp_service
        .clone()
        .unwrap_or_else(|| format!("rylm-{}", command_name(&cli.command)));
    let otlp = rylm_admin::otlp::Otlp {
        endpoint,
        service,
        interval: std::time::Duration::from_millis(500),
    };
    Ok(Some(rylm_admin::logging::init_with_otlp(
        cli.log_format,
        "warn",
        otlp,
    )?))
}

#[cfg(not(feature = "otlp"))]
fn log_and_trace(cli: &Cli) -> Result<Option<()>> {
    if cli.otlp_endpoint.is_some() {
        anyhow::bail!("this rylm was built without the `otlp` feature: it cannot export spans");
    }
    rylm_admin::logging::init(cli.log_format, "warn");
    Ok(None)
}

/// The command's name as `rylm` is called with it.
#[cfg(feature = "otlp")]
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Server(_) => "server",
        Command::Master(_) => "master",
        Command::Hub { .. } => "hub",
        Command::Worker(_) => "worker",
        Command::Pipeline { .. } => "pipeline",
        Command::Sink { .. } => "sink",
        Command::Gateway(_) => "gateway",
        Command::Client(_) => "client",
        Command::Status(_) => "status",
        Command::Gilmour { .. } => "gilmour",
        Command::Service(_) => "service",
        Command::Call(_) => "call",
        Command::Syrpc { .. } => "syrpc",
        Command::GilmourProxy(_) => "gilmour-proxy",
        Command::Keygen(_) => "keygen",
        Command::Inspect { .. } => "inspect",
        Command::Encode { .. } => "encode",
    }
}

fn main() -> Result<()> {
    let cli: Cli = settings::parse()?;
    // Warnings by default; repeated ones throttled; fred's and lapin's `log` records bridged in.
    let _exporter = log_and_trace(&cli)?;
    match cli.command {
        Command::Syrpc { command } => runtime(cli.threads)?.block_on(syrpc::run(command)),
        Command::GilmourProxy(args) => {
            let config = args.config()?;
            // Before the runtime's threads: freed memory can go back to the system.
            rylm_gilmour_proxy::without_thread_caches();
            Ok(runtime(cli.threads)?.block_on(rylm_gilmour_proxy::run_until_stopped(config))?)
        }
        Command::Service(args) => runtime(cli.threads)?.block_on(services::serve(args)),
        Command::Server(args) => runtime(cli.threads)?.block_on(topology::server(args)),
        Command::Master(args) => runtime(cli.threads)?.block_on(topology::master(args, None)),
        Command::Hub { master, previous } => {
            runtime(cli.threads)?.block_on(topology::master(master, Some(previous)))
        }
        Command::Worker(args) => runtime(cli.threads)?.block_on(topology::worker(args)),
        Command::Status(args) => runtime(cli.threads)?.block_on(status::status(args)),
        Command::Gilmour { command } => runtime(cli.threads)?.block_on(gilmour::run(command)),
        Command::Pipeline { server, previous } => {
            runtime(cli.threads)?.block_on(topology::pipeline(server, previous))
        }
        Command::Sink { server, previous } => {
            runtime(cli.threads)?.block_on(topology::sink(server, previous))
        }
        Command::Client(args) => runtime(cli.threads)?.block_on(topology::client(args)),
        Command::Gateway(args) => runtime(cli.threads)?.block_on(topology::gateway(args)),
        Command::Call(args) => runtime(cli.threads)?.block_on(services::call(args)),
        Command::Keygen(args) => security::keygen(args),
        Command::Inspect { wire, file } => {
            let mut input = Vec::new();
            match &file {
                Some(path) => {
                    input = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?
                }
                None => {
                    std::io::stdin()
                        .read_to_end(&mut input)
                        .context("reading standard input")?;
                }
            }
            if matches!(wire, Wire::Native) && input.starts_with(&rylm_message::MARKER) {
                input.drain(..rylm_message::MARKER.len());
            }
            let message = wire
                .codec()
                .decode(input.into())
                .context("decoding the message")?;
            print!("{}", describe(&message));
            Ok(())
        }
        Command::Encode {
            wire,
            function,
            payload,
            client,
            pipeline,
            headers,
        } => {
            let function = if function.contains(' ') {
                Function::stages(function.split_whitespace())
            } else {
                Function::Single(function)
            };
            let mut message = Message::call(function, payload)
                .with_client(client)
                .with_pipeline(pipeline);
            message.headers.extend(headers);
            let body = wire
                .codec()
                .encode(&message)
                .context("encoding the message")?;
            std::io::stdout()
                .write_all(&body)
                .context("writing standard output")?;
            Ok(())
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn describe(message: &Message) -> String {
    let mut out = format!(
        "pipeline: {:?}\nclient:   {:?}\nstage:    {}\nfunction: {}\ncache:    {:?}\n",
        message.pipeline, message.client, message.stage, message.function, message.cache
    );
    for (name, value) in &message.headers {
        out.push_str(&format!("header:   {name}: {value:?}\n"));
    }
    match std::str::from_utf8(&message.payload) {
        Ok(text) => out.push_str(&format!(
            "payload:  {} bytes, text {text:?}\n",
            message.payload.len()
        )),
        Err(_) => out.push_str(&format!(
            "payload:  {} bytes, binary\n",
            message.payload.len()
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn describe_shows_text_and_binary_payloads() {
        let text = describe(&Message::call("s.f", "hi").with_header("a", "b"));
        assert!(text.contains("payload:  2 bytes, text \"hi\""), "{text}");
        assert!(text.contains("header:   a: \"b\""), "{text}");
        let binary = describe(&Message::call("s.f", vec![0xffu8, 0xfe]));
        assert!(binary.contains("2 bytes, binary"), "{binary}");
    }
}
