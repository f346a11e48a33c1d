//! `--admin ADDR` of the long-running commands: the servers' own counters as Prometheus
//! metrics, read at each scrape (the hot paths only count, in atomics), and their readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use rylm_admin::{Admin, Readiness, calls, counter, gauge};
use rylm_components::{Functions, PoolStatus, ResultCounters};
use rylm_message::stats::CallTable;

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
        for (name, help, value) in status.counters().fields() {
            counter(&mut encoder, &format!("rylm_pool_{name}"), help, value)?;
        }
        Ok(())
    }
}

/// A server's answers to its callers.
#[derive(Debug)]
struct Results(Arc<ResultCounters>);

impl Collector for Results {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, value) in self.0.fields() {
            counter(&mut encoder, &format!("rylm_results_{name}"), help, value)?;
        }
        Ok(())
    }
}

/// The functions a server or worker runs: calls, failures, panics and latencies, by function.
#[derive(Debug)]
struct Ran(Functions);

impl Collector for Ran {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        calls(&mut encoder, "rylm_function", "function", &self.0.stats())
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
                "rylm_syrpc_unconfirmed_retried",
                "results published again for want of a confirm",
                &c.unconfirmed_retried,
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
        calls(&mut encoder, "rylm_syrpc_type", "type", &c.types.all())
    }
}

/// The connections of every ZeroMQ socket of the process together.
#[derive(Debug)]
struct Connections;

impl Collector for Connections {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let t = rylm_components::rylm_transport::totals();
        let counters = [
            (
                "rylm_transport_accepted",
                "connections accepted by bound sockets",
                t.accepted,
            ),
            (
                "rylm_transport_connected",
                "connections made by connecting sockets, reconnections included",
                t.connected,
            ),
            ("rylm_transport_ready", "handshakes completed", t.ready),
            (
                "rylm_transport_disconnected",
                "connections ended, for any reason",
                t.disconnected,
            ),
            (
                "rylm_transport_dropped",
                "connections dropped after their handshake: the peer broke the protocol or a limit",
                t.dropped,
            ),
            (
                "rylm_transport_handshake_failed",
                "handshakes that failed: timeouts, refused CURVE keys, a peer breaking the protocol or a limit before its handshake ended",
                t.handshake_failed,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

/// A gateway's requests by route.
#[derive(Debug)]
struct Routes(Arc<CallTable>);

impl Collector for Routes {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        calls(&mut encoder, "rylm_gateway_route", "route", &self.0.all())
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
        calls(&mut encoder, "rylm_service_route", "route", &c.routes.all())
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
    /// A gateway: its pool as a master's, and its requests by route.
    Gateway {
        pool: Arc<PoolStatus>,
        pylm: bool,
        routes: Arc<CallTable>,
    },
}

/// Ready while a worker is connected (a busy master still takes work, up to its waiting
/// line); in pylm's layout, whose workers cannot be seen, always.
fn pool_ready(pool: Arc<PoolStatus>, pylm: bool) -> Readiness {
    Arc::new(move || {
        if pylm || pool.live_workers() > 0 {
            Ok(())
        } else {
            Err("no worker is connected".to_owned())
        }
    })
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
    // Every command here but the SyRPC server speaks ZeroMQ.
    if !matches!(shows, Shows::Syrpc(_)) {
        registry.register_collector(Box::new(Connections));
    }
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
            pool_ready(pool, pylm)
        }
        Shows::Gateway { pool, pylm, routes } => {
            registry.register_collector(Box::new(Pool(pool.clone())));
            registry.register_collector(Box::new(Routes(routes)));
            pool_ready(pool, pylm)
        }
    };
    let admin = Admin::start(listen, registry, ready).await?;
    eprintln!(
        "rylm {what}: admin at http://{0}/metrics, /healthz, /readyz",
        admin.local_addr()
    );
    Ok(Some(admin))
}
