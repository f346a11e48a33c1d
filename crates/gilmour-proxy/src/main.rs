//! `rylm-gilmour-proxy`: the Gilmour HTTP proxy on its own (the same as `rylm gilmour-proxy`).

use std::process::ExitCode;

use clap::Parser;

/// Lets programs in any language join a Gilmour network over HTTP.
#[derive(Debug, Parser)]
#[command(name = "rylm-gilmour-proxy", version)]
struct Cli {
    /// How log lines are written: `text`, or `json` (one object per line, for log shippers).
    #[arg(long, env = "RYLM_LOG_FORMAT", default_value = "text")]
    log_format: rylm_admin::logging::LogFormat,
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
    let cli = Cli::parse();
    // `log` records (fred's) reach this log too; repeated warnings are throttled.
    rylm_admin::logging::init(cli.log_format, "info");
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
