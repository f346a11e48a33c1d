//! A node's health: one check is a GET of its health check path answered 2xx in time. A
//! watchdog per node checks it every interval: after `failure_threshold` failures in a row the
//! node is `unavailable` (its subscriptions removed, its registration kept) until it answers
//! again; when its port refuses connections `dirty_after` checks in a row it is `dirty`, and
//! forgotten: its handlers and its entry are freed, and its id is answered 410 for a while.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;

use crate::api::Status;
use crate::registry::{self, Entry};
use crate::server::Shared;

/// Why a check failed.
pub(crate) enum Health {
    /// It answered badly, or late.
    Failed(String),
    /// Nothing listens on the node's port.
    Refused(String),
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Failed(why) | Health::Refused(why) => f.write_str(why),
        }
    }
}

/// One health check.
pub(crate) async fn check(shared: &Shared, entry: &Entry) -> Result<(), Health> {
    let url = entry.url(&entry.health_check);
    let request = Request::get(&url)
        .body(Full::new(Bytes::new()))
        .map_err(|error| Health::Failed(error.to_string()))?;
    let deadline = shared.config.health_timeout;
    let response = tokio::time::timeout(deadline, shared.checks.request(request))
        .await
        .map_err(|_| Health::Failed(format!("no answer within {deadline:?}")))?
        .map_err(|error| {
            if error.is_connect() {
                Health::Refused(format!("nothing listens: {error}"))
            } else {
                Health::Failed(error.to_string())
            }
        })?;
    let status = response.status();
    // Reads (and bounds) the body so the connection can be reused.
    let _ = tokio::time::timeout(
        deadline,
        Limited::new(response.into_body(), 64 << 10).collect(),
    )
    .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(Health::Failed(format!("answered {status}")))
    }
}

/// Starts the watchdog of a registered node.
pub(crate) fn start(shared: &Arc<Shared>, entry: &Arc<Entry>) {
    let watchdog = tokio::spawn(watch(shared.clone(), Arc::downgrade(entry)));
    let mut slot = entry.watchdog.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(watchdog.abort_handle());
}

/// Checks the node every interval and moves it between `ok`, `unavailable` and `dirty`. Holds
/// the entry weakly: a node removed by other means is not kept alive by its watchdog.
async fn watch(shared: Arc<Shared>, entry: std::sync::Weak<Entry>) {
    let mut ticks = tokio::time::interval(shared.config.health_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(entry) = entry.upgrade() else {
            return;
        };
        // Boxed, as every call below: their futures (an HTTP request's, Redis commands') live
        // only while they run, and the task each node keeps between checks stays small.
        let outcome = Box::pin(check(&shared, &entry)).await;
        let mut inner = entry.inner.lock().await;
        match outcome {
            Ok(()) => {
                inner.failures = 0;
                inner.refused = 0;
                if inner.status == Status::Unavailable {
                    match Box::pin(registry::subscribe_all(&shared, &entry, &mut inner)).await {
                        Ok(()) => {
                            inner.status = Status::Ok;
                            tracing::info!(id = %entry.id, "the node answers again: ok");
                        }
                        Err(error) => {
                            tracing::warn!(id = %entry.id, %error, "could not subscribe again");
                        }
                    }
                }
            }
            Err(why) => {
                inner.failures += 1;
                inner.refused = if matches!(why, Health::Refused(_)) {
                    inner.refused + 1
                } else {
                    0
                };
                if inner.refused >= shared.config.dirty_after.max(1) {
                    inner.status = Status::Dirty;
                    drop(inner);
                    tracing::warn!(id = %entry.id, %why, "the node's listener is gone: dirty, forgotten");
                    shared.registry().forget_dirty(&entry.id);
                    // Its own abort handle is taken without effect on this task, which ends.
                    let _ = entry
                        .watchdog
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    // Until nothing of it listens: Redis may be away for a while.
                    let mut inner = entry.inner.lock().await;
                    while let Err(error) =
                        Box::pin(registry::unsubscribe_all(&shared.gilmour, &mut inner)).await
                    {
                        tracing::warn!(id = %entry.id, %error, "could not unsubscribe a dirty node; trying again");
                        tokio::time::sleep(shared.config.health_interval).await;
                    }
                    shared.freed.notify_one();
                    return;
                }
                if inner.status == Status::Ok
                    && inner.failures >= shared.config.failure_threshold.max(1)
                {
                    if let Err(error) =
                        Box::pin(registry::unsubscribe_all(&shared.gilmour, &mut inner)).await
                    {
                        tracing::warn!(id = %entry.id, %error, "could not unsubscribe an unavailable node");
                    }
                    inner.status = Status::Unavailable;
                    tracing::warn!(id = %entry.id, %why, "the node fails its health check: unavailable");
                }
            }
        }
    }
}
