//! `rylm-gilmour-proxy`: the Gilmour HTTP proxy on its own (the same as `rylm gilmour-proxy`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match rylm_gilmour_proxy::proxy::ProxyConfig::from_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            print!("{}", rylm_gilmour_proxy::proxy::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("rylm-gilmour-proxy: {error}");
            return ExitCode::from(2);
        }
    };
    match rylm_gilmour_proxy::proxy::run_until_stopped(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rylm-gilmour-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
