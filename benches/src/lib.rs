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
    let started = std::time::Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (call, next) = (call.clone(), next.clone());
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
            }
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
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
    }
}
