//! The project's automation, reached as `cargo xtask <command>`.
//!
//! - `test`: formatting, clippy with warnings denied, the generated files' freshness, and
//!   `cargo test --workspace --all-features` against private Redis and RabbitMQ servers; closes
//!   with one line `N passed, N failed` over everything it ran.
//! - `demo`: the system working on loopback.
//! - `bench [NAME] [--quick] [--cpu ROUNDS]`: the criterion and end-to-end benches of
//!   `benches`; `--cpu` runs the gateway's or the services' busiest rows alone, with the CPU
//!   time each operation cost.
//! - `codegen [--check]`: the golden vectors and `docs/wire-format.md`.
//! - `publish [--dry-run]`: every publishable crate, in dependency order.
//! - `fuzz TARGET --seconds N`: one cargo-fuzz target of `rylm-message`.
//! - `servers start|stop`: the private servers on their own, for working by hand.

mod codegen;
mod peers;
mod provision;
mod redis_sets;
mod run;
#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "rylm's project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Checks formatting, lints and generated files, and runs every test against real servers.
    Test {
        /// Leave Redis and RabbitMQ running afterwards and print their URLs.
        #[arg(long)]
        keep_servers: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Runs the demo: the system at work on loopback, with real servers.
    Demo {
        /// Leave Redis and RabbitMQ running afterwards and print their URLs.
        #[arg(long)]
        keep_servers: bool,
    },
    /// Runs the criterion benches (all, or the one named).
    Bench {
        /// A bench of the `benches` crate, e.g. `codec`.
        name: Option<String>,
        /// Run each bench once, as a smoke test, instead of measuring.
        #[arg(long)]
        quick: bool,
        /// For `gateway` and `services`: only their busiest rows, subject and baseline
        /// alternated this many times, with the CPU time each operation cost.
        #[arg(long, value_name = "ROUNDS")]
        cpu: Option<u32>,
    },
    /// Writes the golden vectors and docs/wire-format.md, or checks that they are fresh.
    Codegen {
        /// Fail if a generated file differs from what would be written.
        #[arg(long)]
        check: bool,
    },
    /// Publishes every publishable crate in dependency order.
    Publish {
        /// Package and verify each crate without uploading.
        #[arg(long)]
        dry_run: bool,
    },
    /// Runs one cargo-fuzz target of rylm-message (needs a nightly toolchain).
    Fuzz {
        /// The target: decode_native, decode_frames, decode_stream, decode_json, decode_pylm.
        target: String,
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Starts or stops private Redis and RabbitMQ servers by hand.
    Servers {
        #[command(subcommand)]
        action: ServersAction,
    },
}

#[derive(Subcommand, Debug)]
enum ServersAction {
    /// Starts them, prints `export` lines for the shell, and leaves them running.
    Start,
    /// Stops the servers whose directory `start` printed.
    Stop {
        /// The directory (`RYLM_SERVERS_DIR`).
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    run::install_signal_handler()?;
    std::env::set_current_dir(workspace_root())?;
    match cli.command {
        Task::Test {
            keep_servers,
            cargo_args,
        } => run::test(keep_servers, &cargo_args),
        Task::Demo { keep_servers } => run::demo(keep_servers),
        Task::Bench { name, quick, cpu } => run::bench(name.as_deref(), quick, cpu),
        Task::Codegen { check } => {
            if check {
                let stale = codegen::check()?;
                if !stale.is_empty() {
                    bail!(
                        "generated files are stale: {}\nrun `cargo xtask codegen` and review the diff",
                        stale.join(", ")
                    );
                }
                eprintln!("xtask: generated files are fresh");
                Ok(())
            } else {
                codegen::write()
            }
        }
        Task::Publish { dry_run } => run::publish(dry_run),
        Task::Fuzz { target, seconds } => run::fuzz(&target, seconds),
        Task::Servers { action } => match action {
            ServersAction::Start => {
                let mut servers = provision::start(true)?;
                servers.keep();
                run::print_exports(&servers);
                Ok(())
            }
            ServersAction::Stop { dir } => provision::stop_dir(&dir),
        },
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
