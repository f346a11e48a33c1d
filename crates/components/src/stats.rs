//! What a server's or worker's functions did: calls, failures and panics, and a latency
//! histogram per function, as atomics bumped where a function runs and read by whoever asks
//! (the `--admin` metrics of `rylm`). Names are the registered ones, known before the first
//! call; a call of an unknown name counts under `_unknown`, so the set of names stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

/// The name calls of unknown functions count under.
pub const UNKNOWN: &str = "_unknown";

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It returned a result.
    Ok,
    /// It returned an error.
    Failed,
    /// It panicked.
    Panicked,
}

/// One function's counters.
#[derive(Debug, Default)]
pub struct FunctionStat {
    /// Calls that ran (or were asked for, under [`UNKNOWN`]).
    pub calls: AtomicU64,
    /// Calls that returned an error.
    pub failed: AtomicU64,
    /// Calls that panicked.
    pub panicked: AtomicU64,
    /// Calls per latency bucket, the last past every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    nanos: AtomicU64,
}

impl FunctionStat {
    /// Counts one call that took `took`.
    pub fn record(&self, took: Duration, outcome: Outcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Panicked => {
                self.panicked.fetch_add(1, Ordering::Relaxed);
            }
        }
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The calls per bucket as (upper bound, calls), the last bound `f64::MAX`; not cumulative.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(&self.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// The time of every call together, in seconds.
    pub fn seconds(&self) -> f64 {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed)).as_secs_f64()
    }
}

/// The counters of every function of one [`crate::Functions`], made at the first call.
#[derive(Debug, Default)]
pub struct FunctionStats {
    table: OnceLock<HashMap<String, Arc<FunctionStat>>>,
}

impl FunctionStats {
    fn table(&self, names: impl FnOnce() -> Vec<String>) -> &HashMap<String, Arc<FunctionStat>> {
        self.table.get_or_init(|| {
            names()
                .into_iter()
                .chain([UNKNOWN.to_owned()])
                .map(|name| (name, Arc::default()))
                .collect()
        })
    }

    /// The counters of `method` (`sleep:100` counts under `sleep`), or of [`UNKNOWN`].
    pub(crate) fn of(&self, method: &str, names: impl FnOnce() -> Vec<String>) -> &FunctionStat {
        let table = self.table(names);
        let base = method.split_once(':').map_or(method, |(name, _)| name);
        table
            .get(method)
            .or_else(|| table.get(base))
            .or_else(|| table.get(UNKNOWN))
            .map_or_else(|| unknown(), |stat| stat.as_ref())
    }

    /// Every function's counters, by name.
    pub(crate) fn all(
        &self,
        names: impl FnOnce() -> Vec<String>,
    ) -> Vec<(String, Arc<FunctionStat>)> {
        let mut all: Vec<(String, Arc<FunctionStat>)> = self
            .table(names)
            .iter()
            .map(|(name, stat)| (name.clone(), stat.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// A sink for the impossible case of a table without [`UNKNOWN`].
fn unknown() -> &'static FunctionStat {
    static UNKNOWN_STAT: OnceLock<FunctionStat> = OnceLock::new();
    UNKNOWN_STAT.get_or_init(FunctionStat::default)
}
