//! Helpers shared by rylm's end-to-end benches: latency summaries and peak memory.
//!
//! Every end-to-end bench reports throughput, p50 and p99 latency, the ratio to a baseline
//! measured in the same run, and the peak resident memory of each process it started.

use std::time::Duration;

/// Throughput and latency of one measured run.
#[derive(Clone, Debug)]
pub struct Summary {
    /// What was measured.
    pub name: String,
    /// Operations completed.
    pub count: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

impl Summary {
    /// Summarises `latencies` (any order) of a run that took `elapsed`.
    pub fn new(
        name: impl Into<String>,
        mut latencies: Vec<Duration>,
        elapsed: Duration,
    ) -> Summary {
        latencies.sort_unstable();
        let at = |q: f64| {
            let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies.get(index).copied().unwrap_or_default()
        };
        Summary {
            name: name.into(),
            count: latencies.len(),
            elapsed,
            p50: at(0.50),
            p99: at(0.99),
        }
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Runs `total` calls, `in_flight` at a time (each worker a task of its own), and summarises
/// their latencies. `call(n)` makes call number `n`.
pub async fn measure<F, Fut>(
    name: &str,
    total: usize,
    in_flight: usize,
    call: F,
) -> anyhow::Result<Summary>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let call = std::sync::Arc::new(call);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // On a terminal, a progress bar on standard error (nothing when it is piped); it is drawn
    // from a counter the calls bump, at most 10 times a second.
    let bar = indicatif::ProgressBar::with_draw_target(
        u64::try_from(total).ok(),
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    )
    .with_message(name.to_owned());
    let started = std::time::Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (call, next, bar) = (call.clone(), next.clone(), bar.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(latencies);
                }
                let sent = std::time::Instant::now();
                call(n).await?;
                latencies.push(sent.elapsed());
                bar.inc(1);
            }
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    bar.finish_and_clear();
    Ok(Summary::new(name, latencies, started.elapsed()))
}

/// Runs `total` calls at a fixed rate (`per_second`, open loop: a call starts on schedule
/// whether or not earlier ones are done, each in a task of its own), and summarises their
/// latencies: the latency a steady load sees, rather than a saturated one.
pub async fn measure_at_rate<F, Fut>(
    name: &str,
    total: usize,
    per_second: f64,
    call: F,
) -> anyhow::Result<Summary>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let call = std::sync::Arc::new(call);
    let period = Duration::from_secs_f64(1.0 / per_second.max(1.0));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut latencies = Vec::with_capacity(total);
    for n in 0..total {
        ticker.tick().await;
        // Collect what is done, so that finished calls do not pile up in memory.
        while let Some(done) = calls.try_join_next() {
            latencies.push(done??);
        }
        let call = call.clone();
        calls.spawn(async move {
            let sent = std::time::Instant::now();
            call(n).await?;
            anyhow::Ok(sent.elapsed())
        });
    }
    while let Some(done) = calls.join_next().await {
        latencies.push(done??);
    }
    Ok(Summary::new(name, latencies, started.elapsed()))
}

/// Binds a ROUTER at `address` that echoes every message, in a task; returns where it listens.
pub async fn serve_echo(address: &str) -> anyhow::Result<String> {
    use rylm_transport::{Kind, Options, Socket};
    let router = Socket::new(Kind::Router, &Options::default())?;
    let endpoint = router.bind(address).await?;
    tokio::spawn(async move {
        while let Ok(message) = router.recv().await {
            if router.send(message).await.is_err() {
                break;
            }
        }
    });
    Ok(endpoint)
}

type Waiting = std::sync::Arc<
    std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
>;

/// A DEALER whose calls to an echo are matched by an id frame, so that many can be in flight:
/// the baseline of what ZeroMQ (through `rylm-transport`) allows.
#[allow(missing_debug_implementations)]
pub struct RawEcho {
    socket: rylm_transport::Socket,
    waiting: Waiting,
}

impl RawEcho {
    /// Connects to the echo at `endpoint`.
    pub async fn connect(endpoint: &str) -> anyhow::Result<RawEcho> {
        use rylm_transport::{Kind, Options, Socket};
        let socket = Socket::new(Kind::Dealer, &Options::default())?;
        socket.connect(endpoint).await?;
        let waiting: Waiting = Default::default();
        let (dispatch, receiver) = (waiting.clone(), socket.clone());
        tokio::spawn(async move {
            while let Ok(message) = receiver.recv().await {
                let Some(id) = message
                    .first()
                    .and_then(|f| <[u8; 8]>::try_from(f.as_ref()).ok())
                else {
                    continue;
                };
                let waiter = dispatch
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&u64::from_be_bytes(id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(());
                }
            }
        });
        Ok(RawEcho { socket, waiting })
    }

    /// One echo of `payload`, matched by `id`, within 30 s.
    pub async fn call(&self, id: u64, payload: bytes::Bytes) -> anyhow::Result<()> {
        let (done, answered) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, done);
        let frames = vec![bytes::Bytes::copy_from_slice(&id.to_be_bytes()), payload];
        self.socket.send(frames).await?;
        match tokio::time::timeout(Duration::from_secs(30), answered).await {
            Ok(Ok(())) => Ok(()),
            _ => anyhow::bail!("no echo within 30 s"),
        }
    }
}

/// A process a bench started, killed and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    /// What it is, for the memory report.
    pub name: String,
    /// The child.
    pub child: std::process::Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` with `args`, its output discarded.
pub fn spawn(name: &str, program: &std::path::Path, args: &[String]) -> anyhow::Result<Process> {
    use anyhow::Context;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    Ok(Process {
        name: name.to_owned(),
        child,
    })
}

/// A free loopback tcp address, as `tcp://127.0.0.1:PORT`.
pub fn free_address() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("tcp://127.0.0.1:{port}"))
}

/// Peak resident memory (VmHWM) of process `pid`, in KiB, from `/proc`.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident memory now (VmRSS) of process `pid`, in KiB, from `/proc`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// CPU time (user and system, every thread) process `pid` has used so far, from `/proc`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    // Fields 14 and 15 of `stat` (after the command name, which may hold spaces), in clock
    // ticks of `USER_HZ`, which Linux fixes at 100 for user space.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// What one subject of a CPU probe cost: its rate, and the CPU time of this process per
/// operation while it ran (everything the bench runs in this process counts).
#[derive(Clone, Debug)]
pub struct CpuCost {
    /// The run.
    pub summary: Summary,
    /// CPU time of the process per operation.
    pub per_op: Duration,
    /// Cores busy on average during the run.
    pub cores: f64,
}

/// The rounds asked for with `--cpu ROUNDS` among `args` (5 when the number is left out);
/// `None` without `--cpu`.
pub fn cpu_rounds(args: &[String]) -> Option<usize> {
    let at = args.iter().position(|a| a == "--cpu")?;
    Some(args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(5))
}

/// Runs `run` and measures the CPU time this process spent meanwhile.
pub async fn cpu_cost<F: std::future::Future<Output = anyhow::Result<Summary>>>(
    run: F,
) -> anyhow::Result<CpuCost> {
    let me = std::process::id();
    let read = || cpu_time(me).ok_or_else(|| anyhow::anyhow!("cannot read /proc/{me}/stat"));
    let before = read()?;
    let summary = run.await?;
    let used = read()?.saturating_sub(before);
    Ok(CpuCost {
        per_op: used.div_f64(summary.count.max(1) as f64),
        cores: used.as_secs_f64() / summary.elapsed.as_secs_f64().max(f64::EPSILON),
        summary,
    })
}

/// A CPU probe's report: subject and baseline alternated `rounds` times, each round's CPU time
/// per operation, and the ratio of the baseline's to the subject's (min / median / max).
pub fn cpu_table(subject: &str, baseline: &str, rounds: &[(CpuCost, CpuCost)]) -> String {
    let mut out = format!(
        "| round | {subject} ops/s | {subject} CPU per op | {baseline} ops/s | {baseline} CPU per op | {baseline} CPU / {subject} CPU |\n|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut ratios = Vec::new();
    for (n, (s, b)) in rounds.iter().enumerate() {
        let ratio = b.per_op.as_secs_f64() / s.per_op.as_secs_f64().max(f64::EPSILON);
        ratios.push(ratio);
        out += &format!(
            "| {} | {:.0} | {:.1} µs ({:.2} cores) | {:.0} | {:.1} µs ({:.2} cores) | {ratio:.2} |\n",
            n + 1,
            s.summary.rate(),
            s.per_op.as_secs_f64() * 1e6,
            s.cores,
            b.summary.rate(),
            b.per_op.as_secs_f64() * 1e6,
            b.cores,
        );
    }
    let (min, median, max) = spread(&ratios);
    out += &format!(
        "\n{baseline} CPU / {subject} CPU per op: {min:.2} / {median:.2} / {max:.2} (min / median / max)\n"
    );
    out
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// A Markdown table of `rows` with each rate as a ratio to `baseline`'s.
pub fn table(rows: &[(&Summary, &Summary)]) -> String {
    let mut out = String::from(
        "| run | ops | ops/s | p50 | p99 | baseline ops/s | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (measured, baseline) in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} |\n",
            measured.name,
            measured.count,
            measured.rate(),
            measured.p50.as_secs_f64() * 1e3,
            measured.p99.as_secs_f64() * 1e3,
            baseline.rate(),
            measured.rate() / baseline.rate().max(f64::EPSILON),
        ));
    }
    out
}

/// One row of a comparison: a subject and the two raw echoes, each over the same repetitions.
#[derive(Debug)]
pub struct Compared<'a> {
    /// What the row is (a payload size, a mode).
    pub label: String,
    /// The subject's runs.
    pub subject: &'a [Summary],
    /// The raw echo on rylm-transport, in the same repetitions.
    pub echo: &'a [Summary],
    /// The raw echo on `zeromq` 0.7, in the same repetitions.
    pub old: &'a [Summary],
}

/// A Markdown table of `rows`: rates as median (min-max), the subject's ratio to the
/// same-run echo and the two transports' echoes' ratio, each as min / median / max over the
/// repetitions; then each run's median repetition's latencies.
pub fn compared_table(title: &str, subject: &str, rows: &[Compared<'_>]) -> String {
    let rates = |runs: &[Summary]| runs.iter().map(Summary::rate).collect::<Vec<_>>();
    let cell = |runs: &[Summary]| {
        let (min, median, max) = spread(&rates(runs));
        format!("{median:.0} ({min:.0}-{max:.0})")
    };
    let ratio = |a: &[Summary], b: &[Summary]| {
        let ratios: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(a, b)| a.rate() / b.rate().max(f64::EPSILON))
            .collect();
        let (min, median, max) = spread(&ratios);
        format!("{min:.2} / {median:.2} / {max:.2}")
    };
    let mut out = format!(
        "{title}; ops/s as median (min-max)\n\n| run | {subject} ops/s | echo ops/s, rylm-transport | echo ops/s, zeromq 0.7 | {subject} / echo (min / median / max) | rylm-transport echo / zeromq 0.7 echo (min / median / max) |\n|---|---:|---:|---:|---:|---:|\n"
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.label,
            cell(row.subject),
            cell(row.echo),
            cell(row.old),
            ratio(row.subject, row.echo),
            ratio(row.echo, row.old)
        ));
    }
    out.push_str("\n| run (median repetition) | p50 | p99 |\n|---|---:|---:|\n");
    for row in rows {
        for runs in [row.subject, row.echo, row.old] {
            let mut sorted: Vec<&Summary> = runs.iter().collect();
            sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            if let Some(summary) = sorted.get(sorted.len() / 2) {
                out.push_str(&format!(
                    "| {} | {:.3} ms | {:.3} ms |\n",
                    summary.name,
                    summary.p50.as_secs_f64() * 1e3,
                    summary.p99.as_secs_f64() * 1e3
                ));
            }
        }
    }
    out
}

/// One row of a two-way comparison: a subject and its baseline, over the same repetitions.
#[derive(Debug)]
pub struct Paired<'a> {
    /// What the row is.
    pub label: String,
    /// The subject's runs.
    pub subject: &'a [Summary],
    /// The baseline's runs, interleaved with the subject's.
    pub baseline: &'a [Summary],
}

/// A Markdown table of `rows`: rates as median (min-max), the subject's ratio to its same-run
/// baseline as min / median / max over the repetitions, and the median repetition's latencies.
pub fn paired_table(rows: &[Paired<'_>]) -> String {
    let rates = |runs: &[Summary]| runs.iter().map(Summary::rate).collect::<Vec<_>>();
    let cell = |runs: &[Summary]| {
        let (min, median, max) = spread(&rates(runs));
        format!("{median:.0} ({min:.0}-{max:.0})")
    };
    let median = |runs: &[Summary]| {
        let mut sorted: Vec<&Summary> = runs.iter().collect();
        sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        sorted.get(sorted.len() / 2).map(|s| {
            format!(
                "{:.2} ms | {:.2} ms",
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3
            )
        })
    };
    let mut out = String::from(
        "| run | ops/s, median (min-max) | baseline ops/s | ratio (min / median / max) | p50 | p99 |
|---|---:|---:|---:|---:|---:|
",
    );
    for row in rows {
        let ratios: Vec<f64> = row
            .subject
            .iter()
            .zip(row.baseline)
            .map(|(a, b)| a.rate() / b.rate().max(f64::EPSILON))
            .collect();
        let (min, mid, max) = spread(&ratios);
        out.push_str(&format!(
            "| {} | {} | {} | {min:.2} / {mid:.2} / {max:.2} | {} |
",
            row.label,
            cell(row.subject),
            cell(row.baseline),
            median(row.subject).unwrap_or_else(|| "- | -".to_owned()),
        ));
    }
    out
}

/// One row's runs: the subject, the echo on rylm-transport and the echo on `zeromq` 0.7.
#[derive(Debug, Default)]
pub struct ThreeWay {
    /// The subject's runs.
    pub subject: Vec<Summary>,
    /// The rylm-transport echo's runs.
    pub echo: Vec<Summary>,
    /// The `zeromq` 0.7 echo's runs.
    pub old: Vec<Summary>,
    /// The peak RSS of the `zeromq` 0.7 load client over the runs, KiB.
    pub old_client_rss: u64,
}

/// What the `zeromq` 0.7 echo load runs: its name, the echo's address, the calls, how many in
/// flight, the payload size.
#[derive(Debug, Clone, Copy)]
pub struct OldEchoLoad<'a> {
    /// The run's name.
    pub name: &'a str,
    /// The echo server's address.
    pub address: &'a str,
    /// How many calls.
    pub total: usize,
    /// How many in flight.
    pub in_flight: usize,
    /// The payload's size in bytes.
    pub size: usize,
}

/// `repetitions` rounds of the subject, the rylm-transport echo and the `zeromq` 0.7 echo,
/// interleaved, so that the machine's noise falls on all three alike.
pub async fn interleaved<S, SF, E, EF>(
    repetitions: usize,
    mut subject: S,
    mut echo: E,
    old: OldEchoLoad<'_>,
) -> anyhow::Result<ThreeWay>
where
    S: FnMut() -> SF,
    SF: std::future::Future<Output = anyhow::Result<Summary>>,
    E: FnMut() -> EF,
    EF: std::future::Future<Output = anyhow::Result<Summary>>,
{
    let mut runs = ThreeWay::default();
    for _ in 0..repetitions {
        runs.subject.push(subject().await?);
        runs.echo.push(echo().await?);
        let (summary, rss) =
            zeromq_echo_load(old.name, old.address, old.total, old.in_flight, old.size)?;
        runs.old.push(summary);
        runs.old_client_rss = runs.old_client_rss.max(rss);
    }
    Ok(runs)
}

/// min / median / max of `values` (NaN-free), for ratios over repetitions.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |i: usize| sorted.get(i).copied().unwrap_or(f64::NAN);
    (
        at(0),
        at(sorted.len() / 2),
        at(sorted.len().saturating_sub(1)),
    )
}

/// The `zeromq` 0.7 echo of `benches/zeromq-echo` (the old transport, a baseline beside
/// rylm-transport's): its path from `RYLM_ZEROMQ_ECHO`, which `cargo xtask bench` sets.
pub fn zeromq_echo() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let path = std::env::var_os("RYLM_ZEROMQ_ECHO")
        .context("RYLM_ZEROMQ_ECHO is not set: run the bench through `cargo xtask bench`")?;
    Ok(path.into())
}

/// Starts the `zeromq` 0.7 echo server at `address` and waits (up to 10 s) until it listens.
pub fn start_zeromq_echo(address: &str) -> anyhow::Result<Process> {
    let process = spawn(
        "zeromq 0.7 echo server",
        &zeromq_echo()?,
        &["serve".to_owned(), address.to_owned()],
    )?;
    let port = address.trim_start_matches("tcp://");
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(port).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("the zeromq echo server did not listen at {address}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(process)
}

/// One run of the `zeromq` 0.7 echo's load client (a process of its own): the summary and the
/// client's peak RSS in KiB.
pub fn zeromq_echo_load(
    name: &str,
    address: &str,
    total: usize,
    in_flight: usize,
    size: usize,
) -> anyhow::Result<(Summary, u64)> {
    use anyhow::Context;
    let output = std::process::Command::new(zeromq_echo()?)
        .args(["load", address])
        .args([total, in_flight, size].map(|n| n.to_string()))
        .output()
        .context("running the zeromq echo load")?;
    if !output.status.success() {
        anyhow::bail!(
            "the zeromq echo load failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected output {text:?}"))?;
    let [count, elapsed, p50, p99, rss] = fields[..] else {
        anyhow::bail!("unexpected output {text:?}");
    };
    Ok((
        Summary {
            name: name.to_owned(),
            count: count as usize,
            elapsed: Duration::from_secs_f64(elapsed),
            p50: Duration::from_secs_f64(p50),
            p99: Duration::from_secs_f64(p99),
        },
        rss as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rates() {
        let latencies = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::new("x", latencies, Duration::from_secs(2));
        assert_eq!(s.p50, Duration::from_millis(51));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert!((s.rate() - 50.0).abs() < 1e-9);
        assert!(peak_rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
    }

    /// The process's CPU time grows by about what a busy loop spends (within the 10 ms of a
    /// clock tick and what else the test process runs).
    #[test]
    fn cpu_time_counts_a_busy_loop() {
        let me = std::process::id();
        let before = cpu_time(me).expect("this process's CPU time");
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let used = cpu_time(me).expect("this process's CPU time") - before;
        assert!(
            used >= Duration::from_millis(250),
            "a 300 ms busy loop counted {used:?}"
        );
        assert!(cpu_time(u32::MAX).is_none(), "no such process");
    }

    #[test]
    fn a_cpu_table_gives_the_baselines_share_per_round_and_its_spread() {
        let cost = |count: usize, per_op_us: u64| CpuCost {
            summary: Summary::new(
                "x",
                vec![Duration::from_millis(1); count],
                Duration::from_secs(1),
            ),
            per_op: Duration::from_micros(per_op_us),
            cores: 2.0,
        };
        let rounds = [
            (cost(100, 20), cost(200, 10)),
            (cost(100, 40), cost(200, 10)),
        ];
        let table = cpu_table("subject", "echo", &rounds);
        assert!(
            table
                .contains("| 1 | 100 | 20.0 µs (2.00 cores) | 200 | 10.0 µs (2.00 cores) | 0.50 |"),
            "{table}"
        );
        assert!(table.contains("0.25 / 0.50 / 0.50"), "{table}");
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(cpu_rounds(&args(&["bench", "--cpu", "7"])), Some(7));
        assert_eq!(cpu_rounds(&args(&["bench", "--cpu"])), Some(5));
        assert_eq!(cpu_rounds(&args(&["bench"])), None);
    }
}

/// Scrapes `GET /metrics` of every admin address (`host:port`) every `every` until dropped, as
/// Prometheus would (far more often than its usual 15 s, so that the cost shows): the
/// "metrics on" half of the observability benches.
#[derive(Debug)]
pub struct Scraper {
    task: tokio::task::JoinHandle<()>,
    scrapes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Scraper {
    /// Starts scraping.
    pub fn start(addresses: Vec<String>, every: Duration) -> Scraper {
        let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = scrapes.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for address in &addresses {
                    if scrape(address).await.is_ok() {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        });
        Scraper { task, scrapes }
    }

    /// Scrapes that got an answer so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `GET /metrics` of `address`, within 5 s: the body's length.
async fn scrape(address: &str) -> anyhow::Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        anyhow::Ok(body.len())
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| anyhow::anyhow!("no scrape within 5 s"))?
}
