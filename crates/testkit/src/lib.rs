//! Helpers for rylm's own tests; not published.
//!
//! `cargo xtask test` starts private Redis and RabbitMQ servers and passes their URLs to the
//! tests in `RYLM_REDIS_URL` and `RYLM_AMQP_URL`, with `RYLM_REQUIRE_SERVERS=1`. A test that
//! needs a server asks for its URL here: under xtask a missing URL fails the test; under a plain
//! `cargo test` the test is skipped with a loud message, so that the rest of the suite still runs
//! on a machine without the servers.
#![warn(missing_docs)]

mod otlp;
mod recorder;
mod redis;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use recorder::{HttpRecorder, Recorded};
pub use redis::PrivateRedis;

use std::io::Write;

/// The variable that names the Redis URL.
pub const REDIS_URL: &str = "RYLM_REDIS_URL";
/// The variable that names the AMQP (RabbitMQ) URL.
pub const AMQP_URL: &str = "RYLM_AMQP_URL";
/// Set to `1` by `cargo xtask test`: a missing server is then a failure, not a skip.
pub const REQUIRE_SERVERS: &str = "RYLM_REQUIRE_SERVERS";

/// The URL of the provisioned Redis, or `None` (after a loud message) when the test should skip.
///
/// # Panics
///
/// When no URL is given and `RYLM_REQUIRE_SERVERS=1`.
pub fn redis_url(test: &str) -> Option<String> {
    server_url(REDIS_URL, "Redis", test)
}

/// The URL of the provisioned RabbitMQ, or `None` (after a loud message) when the test should
/// skip.
///
/// # Panics
///
/// When no URL is given and `RYLM_REQUIRE_SERVERS=1`.
pub fn amqp_url(test: &str) -> Option<String> {
    server_url(AMQP_URL, "RabbitMQ", test)
}

/// The `rabbitmqctl` of the provisioned RabbitMQ node (a script that sets its environment), to
/// stop and start the broker in restart tests; `None` (after a loud message) when the test
/// should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn rabbitmqctl(test: &str) -> Option<String> {
    server_url("RYLM_RABBITMQCTL", "the RabbitMQ control script", test)
}

/// The provisioned three-node RabbitMQ cluster: each node's AMQP URL and `rabbitmqctl`
/// script, or `None` (after a loud message) when the test should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn amqp_cluster(test: &str) -> Option<Vec<(String, String)>> {
    let urls = server_url("RYLM_AMQP_CLUSTER_URLS", "a RabbitMQ cluster", test)?;
    let ctls = server_url(
        "RYLM_AMQP_CLUSTER_CTLS",
        "the cluster's control scripts",
        test,
    )?;
    Some(
        urls.split(',')
            .map(str::to_owned)
            .zip(ctls.split(',').map(str::to_owned))
            .collect(),
    )
}

/// Node.js and the folder of installed npm peers (`node_modules`), as `cargo xtask test`
/// installs them; `None` (after a loud message) when the test should skip.
///
/// # Panics
///
/// When they are not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn node_peers(test: &str) -> Option<(String, String)> {
    let node = server_url("RYLM_NODE", "Node.js", test)?;
    let modules = server_url("RYLM_NODE_MODULES", "the npm peers", test)?;
    Some((node, modules))
}

/// The provisioned Sentinel set: the sentinels' `host:port` addresses and the service name
/// they watch (a primary and its replica), or `None` (after a loud message) when the test
/// should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn redis_sentinels(test: &str) -> Option<(Vec<String>, String)> {
    let hosts = server_url("RYLM_REDIS_SENTINELS", "a Redis Sentinel set", test)?;
    let service =
        std::env::var("RYLM_REDIS_SENTINEL_SERVICE").unwrap_or_else(|_| "rylm".to_owned());
    Some((hosts.split(',').map(str::to_owned).collect(), service))
}

/// The provisioned three-primary Redis Cluster: each node's `host:port`, or `None` (after a
/// loud message) when the test should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn redis_cluster(test: &str) -> Option<Vec<String>> {
    let nodes = server_url("RYLM_REDIS_CLUSTER", "a Redis Cluster", test)?;
    Some(nodes.split(',').map(str::to_owned).collect())
}

/// The `redis-server` program, for a test that runs (and restarts) a Redis of its own; `None`
/// (after a loud message) when the test should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn redis_server(test: &str) -> Option<String> {
    server_url("RYLM_REDIS_SERVER", "the redis-server program", test)
}

/// A Python with pylm installed, as `cargo xtask test` provides it; `None` (after a loud
/// message) when the test should skip.
///
/// # Panics
///
/// When it is not given and `RYLM_REQUIRE_SERVERS=1`.
pub fn pylm_python(test: &str) -> Option<String> {
    server_url("RYLM_PYTHON", "a Python with pylm", test)
}

/// The resident memory of process `pid` now (VmRSS), in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A loopback port nobody listens on now, for a process or server a test starts, and one this
/// test process has not handed out before: the system may give a port it just released to the
/// next `bind` to port 0, so two calls could otherwise return the same port, and two servers of
/// one test would then fight over it.
///
/// # Panics
///
/// When the system has no free port, or gives only ports handed out already (after 1,000 tries).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no loopback port that was not handed out already, after 1,000 tries");
}

fn server_url(variable: &str, server: &str, test: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(REQUIRE_SERVERS).is_ok_and(|v| v == "1") => panic!(
            "{test} needs {server}, but {variable} is not set although {REQUIRE_SERVERS}=1; \
             run the tests with `cargo xtask test`, which starts the servers"
        ),
        _ => {
            // Straight to the file descriptor: libtest captures `eprintln!` of passing tests,
            // and a skip must not pass unseen.
            let notice = format!(
                "\n!!! SKIPPED {test}: it needs {server} and {variable} is not set. \
                 Run `cargo xtask test` to start the servers and run it. !!!\n"
            );
            let _ = std::io::stderr().write_all(notice.as_bytes());
            None
        }
    }
}

/// One HTTP/1.1 GET of `path` on a fresh connection to `address` (`host:port`), within 10 s:
/// the status and the body. For the admin endpoints, which tests scrape by hand.
///
/// # Errors
///
/// When nothing answers, or the answer is not HTTP.
pub async fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut answer),
    )
    .await
    .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `name` in Prometheus text `body` (parsed, not matched), the one whose
/// label `label.0` is `label.1` when given: a counter's or gauge's value, a histogram's count.
///
/// # Panics
///
/// When `body` is not Prometheus text, or has no such sample.
pub fn metric_sample(body: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    metric_sample_with(body, name, label.as_slice())
}

/// [`metric_sample`] of the sample with every label of `labels`.
///
/// # Panics
///
/// When `body` is not Prometheus text, or has no such sample.
pub fn metric_sample_with(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("{name} {labels:?} in {body}"));
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        _ => panic!("{name} is a counter, a gauge or a histogram"),
    }
}

#[cfg(test)]
mod tests {
    /// Ports are released as soon as they are picked, and the system may pick a released one
    /// again: none is handed out twice all the same.
    #[test]
    fn no_port_is_handed_out_twice() {
        let ports: Vec<u16> = (0..500).map(|_| super::free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len());
    }
}
