//! The commands that run other programs: test, demo, bench, publish, fuzz.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{codegen, peers, provision};

/// On Ctrl-C (or SIGTERM, SIGHUP) stop the servers this run started before exiting.
pub fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handler")?;
    std::thread::Builder::new()
        .name("xtask-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!(
                    "\nxtask: interrupted (signal {signal}); stopping the servers it started"
                );
                provision::stop_started();
                std::process::exit(128 + signal);
            }
        })
        .context("starting the signal handler thread")?;
    Ok(())
}

pub fn print_exports(servers: &provision::Servers) {
    for (name, value) in servers.env() {
        println!("export {name}={value}");
    }
    println!("export RYLM_SERVERS_DIR={}", servers.dir.display());
    eprintln!(
        "xtask: servers left running; stop them with: cargo xtask servers stop {}",
        servers.dir.display()
    );
}

/// Set when the disk is short of room: the cargo runs of this process skip incremental caches.
static LOW_DISK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if LOW_DISK.load(std::sync::atomic::Ordering::Relaxed) {
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

/// What `cargo xtask test` ran, for its closing line.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failed_steps: Vec<String>,
}

impl Tally {
    fn step(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failed_steps.push(name.to_owned());
        }
    }
}

fn banner(text: &str) {
    eprintln!("\nxtask: ==== {text} ====");
}

fn status_ok(command: &mut Command) -> Result<bool> {
    let program = format!("{:?}", command.get_program());
    Ok(command
        .status()
        .with_context(|| format!("running {program}"))?
        .success())
}

/// A cold `cargo xtask test` writes about 4.6 GiB under `target/` with incremental
/// compilation (2 GiB of it incremental caches) and about 2.6 GiB without.
const BUILD_GIB: u64 = 5;

/// Free space where the build goes, in GiB, as `df` reports it (`None` when it cannot).
fn free_gib(dir: &std::path::Path) -> Option<u64> {
    let output = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib / (1024 * 1024))
}

/// Says how much room the build has; with less than it needs, turns incremental compilation
/// off for this run (it saves about 2 GiB) and says that a full disk is the likely failure.
fn check_disk() {
    let Some(free) = free_gib(&crate::workspace_root()) else {
        return;
    };
    eprintln!("xtask: {free} GiB free where the build goes (a cold run needs about {BUILD_GIB})");
    if free < BUILD_GIB && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        eprintln!(
            "xtask: little room: incremental compilation is off for this run; if the build still fails with 'No space left on device', free space under {}",
            crate::workspace_root().display()
        );
        LOW_DISK.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn test(keep_servers: bool, cargo_args: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut tally = Tally::default();
    check_disk();

    banner("cargo fmt --check");
    let ok = status_ok(cargo().args(["fmt", "--all", "--", "--check"]))?;
    tally.step("formatting (cargo fmt --all -- --check)", ok);

    banner("cargo clippy, warnings denied");
    let ok = status_ok(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    tally.step("lints (cargo clippy -D warnings)", ok);

    banner("generated files are fresh (cargo xtask codegen --check)");
    let stale = codegen::check()?;
    for file in &stale {
        eprintln!("xtask: stale generated file: {file} (run `cargo xtask codegen`)");
    }
    tally.step(
        "generated files (cargo xtask codegen --check)",
        stale.is_empty(),
    );

    banner("Redis and RabbitMQ for the tests");
    let mut servers = match provision::start(true) {
        Ok(servers) => Some(servers),
        Err(error) => {
            // The tests still run: those that need a server fail and say so.
            eprintln!("xtask: could not start the servers: {error:#}");
            tally.step("servers (Redis and RabbitMQ)", false);
            None
        }
    };

    banner("third-party peers for the interop tests");
    let peer_env = match peers::prepare() {
        Ok(env) => env,
        Err(error) => {
            eprintln!("xtask: could not install the interop peers: {error:#}");
            tally.step("interop peers (npm syrpc)", false);
            Vec::new()
        }
    };

    banner("cargo test --workspace --all-features");
    let mut command = cargo();
    command
        .args(["test", "--workspace", "--all-features"])
        .args(cargo_args)
        .envs(servers.iter().flat_map(|s| s.env()))
        .envs(peer_env)
        .env("RYLM_REQUIRE_SERVERS", "1");
    let (passed, failed, ok) = run_cargo_test(&mut command)?;
    tally.passed += passed;
    tally.failed += failed;
    if !ok && failed == 0 {
        // It failed before it could report a test: a build error, a crash.
        tally.step("cargo test (did not complete)", false);
    }

    if let Some(servers) = servers.as_mut().filter(|_| keep_servers) {
        servers.keep();
        print_exports(servers);
    }
    drop(servers);

    eprintln!(
        "\nxtask: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    for step in &tally.failed_steps {
        eprintln!("xtask: FAILED: {step}");
    }
    println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_cargo_test(command: &mut Command) -> Result<(u64, u64, bool)> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test's output")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let ok = child.wait().context("waiting for cargo test")?.success();
    Ok((passed, failed, ok))
}

/// `test result: ok. 21 passed; 0 failed; 0 ignored; ...` -> (21, 0).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut passed = None;
    let mut failed = None;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(number), Some(label)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        match label {
            "passed" => passed = Some(number),
            "failed" => failed = Some(number),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

/// The examples `cargo xtask demo` runs, in order, with what each shows.
const DEMO_PARTS: [(&str, &str); 8] = [
    (
        "the ground: framed envelopes over ZeroMQ, Redis and RabbitMQ",
        "ground",
    ),
    (
        "a master as an HTTP microservice: the gateway, two workers, plain HTTP calls",
        "gateway_microservice",
    ),
    (
        "a Master farms a client's job out to two Workers",
        "pylm_master",
    ),
    (
        "servers chained: Server -> Pipeline -> Hub with a worker, and a Sink",
        "pylm_pipeline",
    ),
    (
        "a mixed cluster: a pylm worker and a rylm worker behind a rylm master in pylm mode",
        "pylm_mixed",
    ),
    (
        "SyRPC: one backend puts a request, another fetches the result by id",
        "syrpc_stateless",
    ),
    (
        "services by path and METHOD: a web front calls a slow service, sync and async",
        "services_web",
    ),
    (
        "Gilmour over HTTP: a Python node joins through the proxy, serves and calls",
        "gilmour_proxy",
    ),
];

pub fn demo(keep_servers: bool) -> Result<()> {
    banner("building the demo");
    let build = ["build", "--quiet", "--package", "rylm-examples", "--bins"];
    if !status_ok(cargo().args(build))? {
        bail!("the demo did not build");
    }
    banner("Redis and RabbitMQ for the demo");
    let mut servers = provision::start(false)?;
    // The mixed pylm cluster needs a Python with pylm; made once under target/ when python3 is
    // there, skipped with a word when not.
    let python = match peers::ensure_pylm() {
        Ok(python) => vec![("RYLM_PYTHON", python.display().to_string())],
        Err(error) => {
            eprintln!(
                "xtask: no Python with pylm ({error:#}); the mixed pylm cluster will be skipped"
            );
            Vec::new()
        }
    };
    let mut ok = true;
    for (title, example) in DEMO_PARTS {
        banner(title);
        let run = [
            "run",
            "--quiet",
            "--package",
            "rylm-examples",
            "--bin",
            example,
        ];
        ok &= status_ok(cargo().args(run).envs(servers.env()).envs(python.clone()))?;
    }
    if keep_servers {
        servers.keep();
        print_exports(&servers);
    }
    drop(servers);
    if !ok {
        bail!("the demo failed");
    }
    eprintln!("\nxtask: demo finished");
    Ok(())
}

/// The criterion benches of `benches/benches`.
const CRITERION: [&str; 2] = ["codec", "router"];

/// End-to-end benches: (name, binary of `benches`, whether it needs the provisioned servers).
const END_TO_END: [(&str, &str, bool); 6] = [
    ("syrpc", "syrpc", true),
    ("gilmour", "gilmour", true),
    ("services", "services", false),
    ("router", "router_e2e", false),
    ("gateway", "gateway", false),
    ("pylm", "pylm", false),
];

pub fn bench(name: Option<&str>, quick: bool, cpu: Option<u32>) -> Result<()> {
    if cpu.is_some() && !matches!(name, Some("gateway" | "services")) {
        bail!("--cpu is for the gateway and services benches: `cargo xtask bench gateway --cpu 5`");
    }
    if let Some(name) = name
        && !CRITERION.contains(&name)
        && !END_TO_END.iter().any(|(bench, _, _)| *bench == name)
    {
        bail!(
            "no bench named {name:?}: try {} or {}",
            CRITERION.join(", "),
            END_TO_END.map(|e| e.0).join(", ")
        );
    }
    let criterion: Vec<&str> = CRITERION
        .iter()
        .copied()
        .filter(|b| name.is_none_or(|n| n == *b))
        .collect();
    let end_to_end: Vec<(&str, &str, bool)> = END_TO_END
        .iter()
        .copied()
        .filter(|(b, _, _)| name.is_none_or(|n| n == *b))
        .collect();
    for bench in criterion {
        let mut command = cargo();
        command.args(["bench", "--package", "rylm-benches", "--bench", bench]);
        if quick {
            command.args(["--", "--test"]);
        }
        if !status_ok(&mut command)? {
            bail!("the criterion bench {bench} failed");
        }
    }
    if end_to_end.is_empty() {
        return Ok(());
    }
    // The benches' binaries, and `rylm`, which the router bench runs as master and workers.
    let build = [
        "build",
        "--release",
        "--quiet",
        "--package",
        "rylm-benches",
        "--package",
        "rylm-cli",
        "--bins",
    ];
    if !status_ok(cargo().args(build))? {
        bail!("the end-to-end benches did not build");
    }
    // The ZeroMQ benches set rylm-transport's echo beside the same echo on `zeromq` 0.7, the
    // transport rylm used before: a workspace of its own, so that no rylm crate depends on it.
    let root = crate::workspace_root();
    let zeromq_echo = if end_to_end
        .iter()
        .any(|(bench, _, _)| matches!(*bench, "router" | "services"))
    {
        let manifest = root.join("benches/zeromq-echo/Cargo.toml");
        let built = status_ok(
            cargo()
                .args(["build", "--release", "--quiet", "--manifest-path"])
                .arg(&manifest)
                .arg("--target-dir")
                .arg(root.join("target")),
        )?;
        if !built {
            bail!("the zeromq 0.7 baseline echo did not build");
        }
        vec![(
            "RYLM_ZEROMQ_ECHO",
            root.join("target/release/rylm-zeromq-echo")
                .display()
                .to_string(),
        )]
    } else {
        Vec::new()
    };
    let servers = if end_to_end.iter().any(|(_, _, needs)| *needs) {
        Some(provision::start(true)?)
    } else {
        None
    };
    for (bench, binary, _) in end_to_end {
        banner(&format!("end-to-end bench: {bench}"));
        let binary = crate::workspace_root().join("target/release").join(binary);
        let python = if bench == "pylm" {
            vec![("RYLM_PYTHON", peers::ensure_pylm()?.display().to_string())]
        } else {
            Vec::new()
        };
        let probe = cpu.map(|rounds| vec!["--cpu".to_owned(), rounds.to_string()]);
        if !status_ok(
            Command::new(&binary)
                .args(probe.into_iter().flatten())
                .envs(servers.iter().flat_map(|s| s.env()))
                .envs(python)
                .envs(zeromq_echo.iter().cloned()),
        )? {
            bail!("the {bench} bench failed");
        }
    }
    if servers.is_some() {
        println!("\npeak RSS of the servers it started:");
        for (name, kib) in provision::peak_rss() {
            println!("- {name}: {kib} KiB");
        }
    }
    Ok(())
}

pub fn publish(dry_run: bool) -> Result<()> {
    // cargo orders the crates by their dependencies and, for a dry run, verifies each one
    // against the packaged versions of its siblings.
    if dry_run {
        // A dry run verifies each crate against its siblings packaged into a local registry.
        // Cargo takes registry packages for immutable, so the artifacts of an earlier dry run of
        // the same version would be reused, stale: clear them first.
        eprintln!(
            "xtask: clearing the artifacts of earlier dry runs (cargo clean -p for each crate)"
        );
        let mut clean = cargo();
        clean.args(["clean", "--quiet"]);
        for package in publishable()? {
            clean.args(["--package", &package]);
        }
        if !status_ok(&mut clean)? {
            bail!("cargo clean failed");
        }
        let _ = std::fs::remove_dir_all(crate::workspace_root().join("target/package"));
        remove_stale_extractions(&publishable()?);
    }
    let mut command = cargo();
    command.args(["publish", "--workspace"]);
    if dry_run {
        command.args(["--dry-run", "--allow-dirty"]);
    }
    if !status_ok(&mut command)? {
        bail!("cargo publish failed");
    }
    Ok(())
}

pub fn fuzz(target: &str, seconds: u64) -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_nightly {
        bail!("cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly");
    }
    let has_cargo_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_fuzz {
        eprintln!("xtask: cargo-fuzz is missing; installing it (cargo install cargo-fuzz)");
        if !status_ok(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))? {
            bail!("could not install cargo-fuzz");
        }
    }
    // Called through rustup's proxy, not $CARGO, so that `+nightly` selects the toolchain.
    let ok = status_ok(
        Command::new("cargo")
            .current_dir("crates/message")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}")),
    )?;
    if !ok {
        bail!("fuzz target {target} failed (see the artifact path above)");
    }
    Ok(())
}

/// The names of the crates under `crates/` that are published.
/// Cargo unpacks the packaged siblings of a dry run into its registry folder
/// (`$CARGO_HOME/registry/src/<local registry>/<name>-<version>`) and never unpacks a version
/// again once it is there: a later dry run of the same version would verify against the old
/// sources. rylm's crates come from no real registry, so every unpacked copy is stale.
fn remove_stale_extractions(packages: &[String]) {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    let Some(home) = home else {
        return;
    };
    for kind in ["src", "cache"] {
        let Ok(registries) = std::fs::read_dir(home.join("registry").join(kind)) else {
            continue;
        };
        for registry in registries.flatten() {
            let Ok(entries) = std::fs::read_dir(registry.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = packages.iter().any(|p| {
                    name.strip_prefix(p.as_str())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()))
                });
                if ours {
                    let path = entry.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
    }
}

fn publishable() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(crate::workspace_root().join("crates"))? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        if text.contains("publish = false") {
            continue;
        }
        let name = text
            .lines()
            .find_map(|line| line.strip_prefix("name = "))
            .map(|name| name.trim_matches('"').to_owned());
        names.extend(name);
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::{free_gib, parse_test_result};

    #[test]
    fn reads_the_free_space_df_reports() {
        let tmp = std::env::temp_dir();
        let free = free_gib(&tmp).expect("df reports the temporary directory");
        // Against GNU df's own figure in GiB (rounded up), read from a named column.
        let output = std::process::Command::new("df")
            .args(["-BG", "--output=avail"])
            .arg(&tmp)
            .output()
            .expect("df runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let avail: u64 = text
            .lines()
            .nth(1)
            .expect("a second line")
            .trim()
            .trim_end_matches('G')
            .parse()
            .expect("a figure in GiB");
        assert!(
            free == avail || free + 1 == avail,
            "{free} GiB against df's {avail}G"
        );
        assert_eq!(free_gib(std::path::Path::new("/no/such/dir/rylm")), None);
    }

    #[test]
    fn reads_cargo_test_summaries() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 21 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"
            ),
            Some((21, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
