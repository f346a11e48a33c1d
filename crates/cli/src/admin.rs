//! `--admin ADDR` of the long-running commands: the servers' own counters as Prometheus
//! metrics, read at each scrape (nothing is added to the hot paths), and their readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use rylm_admin::{Admin, Readiness, counter, gauge};
use rylm_components::{Functions, PoolStatus, ResultCounters};

/// A master's (or hub's) worker pool.
#[derive(Debug)]
struct Pool(Arc<PoolStatus>);

fn whole(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Pool {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = &self.0;
        let gauges = [
            ("rylm_pool_workers", "live workers", status.live_workers()),
            (
                "rylm_pool_free_credits",
                "credits free over all live workers",
                status.free_credits(),
            ),
            (
                "rylm_pool_waiting",
                "messages waiting for a credit",
                status.waiting(),
            ),
            (
                "rylm_pool_in_flight",
                "messages held by workers",
                status.in_flight(),
            ),
        ];
        for (name, help, value) in gauges {
            gauge(&mut encoder, name, help, whole(value))?;
        }
        let c = status.counters();
        let counters = [
            (
                "rylm_pool_dispatched",
                "messages sent to a worker, re-dispatches included",
                &c.dispatched,
            ),
            ("rylm_pool_answered", "answers passed on", &c.answered),
            (
                "rylm_pool_redispatched",
                "messages sent again after their worker was buried",
                &c.redispatched,
            ),
            (
                "rylm_pool_busy",
                "messages answered busy: the waiting line was full",
                &c.busy,
            ),
            (
                "rylm_pool_expired",
                "messages answered deadline",
                &c.expired,
            ),
            (
                "rylm_pool_worker_died",
                "messages failed back because their workers died",
                &c.worker_died,
            ),
            (
                "rylm_pool_dropped_answers",
                "late, duplicate or unknown answers dropped",
                &c.dropped_answers,
            ),
            (
                "rylm_pool_malformed",
                "frames from workers that did not decode",
                &c.malformed,
            ),
            (
                "rylm_pool_workers_buried",
                "workers buried for silence or a closed connection",
                &c.buried,
            ),
            (
                "rylm_pool_workers_admitted",
                "workers admitted, again after a burial included",
                &c.admitted,
            ),
            (
                "rylm_pool_withdrawn",
                "messages withdrawn by their caller",
                &c.withdrawn,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// A server's answers to its callers.
#[derive(Debug)]
struct Results(Arc<ResultCounters>);

impl Collector for Results {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let counters = [
            (
                "rylm_results_answered",
                "answers sent to their callers",
                &c.answered,
            ),
            (
                "rylm_results_streamed",
                "results sent down the stream to the next stage",
                &c.streamed,
            ),
            ("rylm_results_busy", "requests answered busy", &c.busy),
            (
                "rylm_results_undeliverable",
                "answers dropped: the caller is gone or stays full",
                &c.undeliverable,
            ),
            (
                "rylm_results_stream_refused",
                "results the next stage did not take in time",
                &c.stream_refused,
            ),
            (
                "rylm_results_malformed",
                "requests that did not decode",
                &c.malformed,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// The functions a server or worker runs: calls, failures, panics and latencies, by function.
#[derive(Debug)]
struct Ran(Functions);

impl Collector for Ran {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        let stats = self.0.stats();
        let families = [
            (
                "rylm_function_calls",
                "function calls, unknown names under _unknown",
            ),
            (
                "rylm_function_failed",
                "function calls that returned an error",
            ),
            ("rylm_function_panicked", "function calls that panicked"),
        ];
        for (i, (name, help)) in families.iter().enumerate() {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (function, stat) in &stats {
                let value = [&stat.calls, &stat.failed, &stat.panicked][i].load(Ordering::Relaxed);
                let labels = [("function", function.as_str())];
                let counter = prometheus_client::metrics::counter::ConstCounter::new(value);
                counter.encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "rylm_function_duration_seconds",
            "how long function calls took",
            None,
            MetricType::Histogram,
        )?;
        for (function, stat) in &stats {
            let labels = [("function", function.as_str())];
            let count = stat.calls.load(Ordering::Relaxed);
            family
                .encode_family(&labels)?
                .encode_histogram::<Vec<(String, String)>>(
                    stat.seconds(),
                    count,
                    &stat.buckets(),
                    None,
                )?;
        }
        Ok(())
    }
}

/// A SyRPC server's requests and results.
#[derive(Debug)]
struct Syrpc(Arc<rylm_syrpc::ServerCounters>);

impl Collector for Syrpc {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        gauge(
            &mut encoder,
            "rylm_syrpc_consuming",
            "1 while the request consumer is open",
            i64::from(c.consuming.load(Ordering::Relaxed)),
        )?;
        let counters = [
            (
                "rylm_syrpc_taken",
                "requests taken from the queue",
                &c.taken,
            ),
            (
                "rylm_syrpc_answered",
                "results published and confirmed",
                &c.answered,
            ),
            (
                "rylm_syrpc_exceptions",
                "exception results: unknown type, error, panic, overrun",
                &c.exceptions,
            ),
            (
                "rylm_syrpc_publish_failed",
                "results that could not be published (the request goes back)",
                &c.publish_failed,
            ),
            (
                "rylm_syrpc_malformed",
                "requests rejected because they did not decode",
                &c.malformed,
            ),
            (
                "rylm_syrpc_consumer_restarts",
                "times the request consumer was opened again",
                &c.consumer_restarts,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// A services-mux service's calls.
#[derive(Debug)]
struct Calls(Arc<rylm_services_mux::ServiceCounters>);

impl Collector for Calls {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let counters = [
            (
                "rylm_service_answered",
                "calls dispatched to the routes and answered",
                &c.answered,
            ),
            (
                "rylm_service_errors",
                "answers of status 500 and above",
                &c.errors,
            ),
            (
                "rylm_service_busy",
                "calls answered 503 busy at once",
                &c.busy,
            ),
            (
                "rylm_service_refused",
                "frames refused: their MAC did not match",
                &c.refused,
            ),
            (
                "rylm_service_replayed",
                "requests refused as replayed or stale",
                &c.replayed,
            ),
            (
                "rylm_service_malformed",
                "frames dropped: they did not decode",
                &c.malformed,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// What a command's admin listener shows.
pub(crate) enum Shows {
    /// A services-mux service: always ready.
    Service(Arc<rylm_services_mux::ServiceCounters>),
    /// A SyRPC server: ready while its request consumer is open.
    Syrpc(Arc<rylm_syrpc::ServerCounters>),
    /// A server, pipeline stage or sink: its results and its functions; always ready.
    Server(Arc<ResultCounters>, Functions),
    /// A worker: its functions; always ready (it reconnects to its master by itself).
    Worker(Functions),
    /// A master or hub: its pool; ready while a worker is connected (a busy master still takes
    /// work, up to its waiting line), and in pylm's layout, whose workers it cannot see, always.
    Master { pool: Arc<PoolStatus>, pylm: bool },
}

/// Starts the admin listener when `--admin` was given; prints where.
pub(crate) async fn start(
    what: &str,
    listen: Option<SocketAddr>,
    shows: Shows,
) -> Result<Option<Admin>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let mut registry = Registry::default();
    let ready: Readiness = match shows {
        Shows::Server(results, functions) => {
            registry.register_collector(Box::new(Results(results)));
            registry.register_collector(Box::new(Ran(functions)));
            Arc::new(|| Ok(()))
        }
        Shows::Syrpc(counters) => {
            registry.register_collector(Box::new(Syrpc(counters.clone())));
            Arc::new(move || {
                if counters.consuming.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("not consuming requests: the broker is not connected".to_owned())
                }
            })
        }
        Shows::Service(counters) => {
            registry.register_collector(Box::new(Calls(counters)));
            Arc::new(|| Ok(()))
        }
        Shows::Worker(functions) => {
            registry.register_collector(Box::new(Ran(functions)));
            Arc::new(|| Ok(()))
        }
        Shows::Master { pool, pylm } => {
            registry.register_collector(Box::new(Pool(pool.clone())));
            Arc::new(move || {
                if pylm || pool.live_workers() > 0 {
                    Ok(())
                } else {
                    Err("no worker is connected".to_owned())
                }
            })
        }
    };
    let admin = Admin::start(listen, registry, ready).await?;
    eprintln!(
        "rylm {what}: admin at http://{0}/metrics, /healthz, /readyz",
        admin.local_addr()
    );
    Ok(Some(admin))
}
