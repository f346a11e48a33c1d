//! `rylm-gilmour-proxy`: the Gilmour HTTP proxy on its own (the same as `rylm gilmour-proxy`).

use std::process::ExitCode;

use clap::Parser;

/// Lets programs in any language join a Gilmour network over HTTP.
#[derive(Debug, Parser)]
#[command(name = "rylm-gilmour-proxy", version)]
struct Cli {
    #[command(flatten)]
    proxy: rylm_gilmour_proxy::ProxyArgs,
}

fn main() -> ExitCode {
    // Before any thread: memory freed after nodes leave can then go back to the system.
    rylm_gilmour_proxy::without_thread_caches();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    // `log` records (fred's) reach this log too: the subscriber installs the bridge.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.proxy.config() {
        Ok(config) => rylm_gilmour_proxy::run_until_stopped(config).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rylm-gilmour-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
