//! The admin listener of a long-running rylm server: what an operator, Prometheus or an
//! orchestrator asks of it, on an address of its own, apart from the traffic.
//!
//! - `GET /metrics`: the server's metrics as Prometheus text (OpenMetrics), encoded from a
//!   [`prometheus_client`] registry at each scrape. Servers keep their counters as plain atomics
//!   on their hot paths and register a [`Collector`](prometheus_client::collector::Collector)
//!   that reads them when asked: between scrapes a metric costs only its counting.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 when the server can serve, 503 with the reason when it cannot
//!   (readiness): a master without a worker with credit, a client whose broker is gone.
//!
//! [`logging`] is the programs' log: text or JSON lines, `log` records bridged in, repeated
//! warnings throttled. With the `otlp` feature, [`otlp`] sends the spans of traced requests to
//! an OpenTelemetry collector (OTLP/HTTP, JSON).
//!
//! The listener is bounded as every rylm listener: a few connections at once, headers within a
//! deadline, GET only, nothing read from a body. [`counter`] and [`gauge`] write one sample in a
//! collector.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rylm_admin::Error> {
//! use std::sync::Arc;
//! use prometheus_client::registry::Registry;
//!
//! let registry = Registry::default();
//! let admin = rylm_admin::Admin::start(
//!     "127.0.0.1:9090".parse().unwrap(),
//!     registry,
//!     Arc::new(|| Ok(())),
//! )
//! .await?;
//! println!("metrics at http://{}/metrics", admin.local_addr());
//! admin.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod logging;
#[cfg(feature = "otlp")]
pub mod otlp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rylm_message::stats::{CallStat, ErrorKind};
use tokio::sync::{Semaphore, watch};

/// Whether the server can serve now; the reason when it cannot.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Connections the admin listener serves at once; more wait in the kernel's backlog.
const CONNECTIONS: usize = 16;
/// A request's headers within this, or the connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin address could not be bound.
    #[error("cannot listen on {address} for the admin endpoints: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting is not valid.
    #[error("{0}")]
    Config(String),
    /// The system refused a thread or runtime.
    #[error("cannot start: {0}")]
    Io(#[source] std::io::Error),
}

/// A running admin listener.
pub struct Admin {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

struct State {
    registry: Registry,
    ready: Readiness,
}

impl Admin {
    /// Binds `listen` and serves `/metrics` from `registry`, `/healthz`, and `/readyz` from
    /// `ready`.
    pub async fn start(
        listen: SocketAddr,
        registry: Registry,
        ready: Readiness,
    ) -> Result<Admin, Error> {
        let failed = |source| Error::Listen {
            address: listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(failed)?;
        let local_addr = listener.local_addr().map_err(failed)?;
        let (stop, stopped) = watch::channel(false);
        let state = Arc::new(State { registry, ready });
        let task = tokio::spawn(serve(listener, state, stopped));
        Ok(Admin {
            local_addr,
            stop,
            task,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening; requests in hand are dropped (they are scrapes and probes).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let place = tokio::select! {
            _ = stopped.changed() => break,
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "the admin listener could not accept; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = answer(&state, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(place);
        });
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn answer(state: &State, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "the metrics could not be encoded\n".into(),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, PLAIN, "alive\n".into()),
        "/readyz" => match (state.ready)() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "the admin endpoints are /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

/// Writes one counter sample (`<name>_total`) in a collector's scrape.
pub fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    counter.encode(metric)
}

/// Writes the counters of calls by name in a collector's scrape: `{prefix}_calls_total`,
/// `{prefix}_errors_total` (with a `kind` label; a series once that kind happened) and the histogram
/// `{prefix}_duration_seconds`, each labelled `label="<name>"`.
pub fn calls(
    encoder: &mut DescriptorEncoder<'_>,
    prefix: &str,
    label: &str,
    stats: &[(String, Arc<CallStat>)],
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    use std::sync::atomic::Ordering;
    let (calls_name, errors_name, duration_name) = (
        format!("{prefix}_calls"),
        format!("{prefix}_errors"),
        format!("{prefix}_duration_seconds"),
    );
    let (calls_help, errors_help, duration_help) = (
        format!("calls by {label}"),
        format!(
            "failed calls by {label} and kind (failed, panicked, timeout, busy, unknown, invalid)"
        ),
        format!("how long calls took, by {label}"),
    );
    let mut family =
        encoder.encode_descriptor(&calls_name, &calls_help, None, MetricType::Counter)?;
    for (name, stat) in stats {
        ConstCounter::new(stat.calls.load(Ordering::Relaxed))
            .encode(family.encode_family(&[(label, name.as_str())])?)?;
    }
    let mut family =
        encoder.encode_descriptor(&errors_name, &errors_help, None, MetricType::Counter)?;
    // Only the kinds that happened: six series per name, mostly zero, would swamp a server.
    for (name, stat) in stats {
        for kind in ErrorKind::ALL {
            let errors = stat.errors(kind);
            if errors > 0 {
                let labels = [(label, name.as_str()), ("kind", kind.as_str())];
                ConstCounter::new(errors).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let mut family =
        encoder.encode_descriptor(&duration_name, &duration_help, None, MetricType::Histogram)?;
    for (name, stat) in stats {
        family
            .encode_family(&[(label, name.as_str())])?
            .encode_histogram::<Vec<(String, String)>>(
                stat.seconds(),
                stat.calls.load(Ordering::Relaxed),
                &stat.buckets(),
                None,
            )?;
    }
    Ok(())
}

/// Writes one gauge sample in a collector's scrape.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}
