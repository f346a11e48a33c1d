//! The admin listener over real HTTP: metrics that parse as Prometheus text and move with the
//! counters they read, liveness, readiness that turns, and refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Default)]
struct Handled {
    calls: AtomicU64,
}

impl Collector for Handled {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        rylm_admin::counter(
            &mut encoder,
            "demo_calls",
            "calls handled",
            self.calls.load(Ordering::Relaxed),
        )?;
        rylm_admin::gauge(&mut encoder, "demo_workers", "workers", 3)
    }
}

/// One request on a fresh connection (`GET` through the test kit; another method by hand):
/// the status and the body.
async fn get(address: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    if method == "GET" {
        return rylm_testkit::http_get(&address.to_string(), path)
            .await
            .expect("answered");
    }
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connects");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("writes");
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("answered in time")
    .expect("reads");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, String::new())
}

fn value(body: &str, name: &str) -> f64 {
    rylm_testkit::metric_sample(body, name, None)
}

#[tokio::test]
async fn metrics_move_with_their_counters_and_readiness_turns() {
    let handled = Arc::new(Handled::default());
    let mut registry = Registry::default();
    registry.register_collector(Box::new(handled.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let probe = ready.clone();
    let admin = rylm_admin::Admin::start(
        "127.0.0.1:0".parse().expect("an address"),
        registry,
        Arc::new(move || {
            if probe.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no worker with credit".to_owned())
            }
        }),
    )
    .await
    .expect("listens");
    let address = admin.local_addr();

    let (status, body) = get(address, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(value(&body, "demo_calls_total"), 0.0, "{body}");
    assert_eq!(value(&body, "demo_workers"), 3.0);
    handled.calls.fetch_add(41, Ordering::Relaxed);
    handled.calls.fetch_add(1, Ordering::Relaxed);
    let (_, body) = get(address, "GET", "/metrics").await;
    assert_eq!(value(&body, "demo_calls_total"), 42.0, "{body}");

    assert_eq!(get(address, "GET", "/healthz").await.0, 200);
    let (status, why) = get(address, "GET", "/readyz").await;
    assert_eq!((status, why.trim()), (503, "no worker with credit"));
    ready.store(true, Ordering::Relaxed);
    assert_eq!(get(address, "GET", "/readyz").await.0, 200);

    assert_eq!(get(address, "POST", "/metrics").await.0, 405);
    assert_eq!(get(address, "GET", "/nothing").await.0, 404);
    admin.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "nothing listens after shutdown"
    );
}

/// The Grafana dashboard of `docs/` is JSON, and every metric it charts is one that
/// `docs/operations.md` documents (and so one that a server exports).
#[test]
fn the_dashboard_charts_documented_metrics() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}grafana-dashboard.json")).expect("the dashboard"),
    )
    .expect("JSON");
    let operations = std::fs::read_to_string(format!("{root}operations.md")).expect("the doc");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().expect("an expression");
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("rylm_") || w.starts_with("gilmour_proxy_"))
        {
            let documented = name
                .strip_suffix("_bucket")
                .unwrap_or(name)
                .trim_end_matches("_total");
            assert!(
                operations.contains(documented),
                "{name} (in {expr}) is not in docs/operations.md"
            );
        }
    }
}
