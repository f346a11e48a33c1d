//! Counters of calls by name, as plain atomics: what a server bumps where it answers (a
//! function, an HTTP route, a service route, a SyRPC type) and an admin endpoint reads when
//! scraped. A [`CallStat`] counts calls, errors by [`ErrorKind`] and a latency histogram; a
//! [`CallTable`] holds one per name, bounded: names past its capacity count under [`OTHER`], so
//! that names chosen by callers cannot grow the set of series without end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

/// The name that calls past a table's capacity count under.
pub const OTHER: &str = "_other";

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Its handler returned an error.
    Failed,
    /// Its handler panicked.
    Panicked,
    /// It ran past its deadline.
    TimedOut,
    /// It was refused for want of room (`busy`).
    Busy,
    /// Nothing serves that name (an unknown function, route or type).
    Unknown,
    /// The call itself was refused as not valid (a malformed or oversized request).
    Invalid,
}

impl ErrorKind {
    /// Every kind, in the order [`CallStat::errors`] gives them.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Failed,
        ErrorKind::Panicked,
        ErrorKind::TimedOut,
        ErrorKind::Busy,
        ErrorKind::Unknown,
        ErrorKind::Invalid,
    ];

    /// The label value metrics show.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Failed => "failed",
            ErrorKind::Panicked => "panicked",
            ErrorKind::TimedOut => "timeout",
            ErrorKind::Busy => "busy",
            ErrorKind::Unknown => "unknown",
            ErrorKind::Invalid => "invalid",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered.
    Ok,
    /// It failed.
    Error(ErrorKind),
}

/// The counters of one name.
#[derive(Debug, Default)]
pub struct CallStat {
    /// Calls, whatever their outcome.
    pub calls: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// Calls per latency bucket, the last past every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    nanos: AtomicU64,
}

impl CallStat {
    /// Counts one call that took `took`.
    pub fn record(&self, took: Duration, outcome: Outcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Outcome::Error(kind) = outcome {
            self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
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

    /// The errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
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

/// One [`CallStat`] per name, at most `capacity` names and [`OTHER`].
#[derive(Debug)]
pub struct CallTable {
    table: RwLock<HashMap<String, Arc<CallStat>>>,
    other: Arc<CallStat>,
    capacity: usize,
}

/// Names a table holds by default.
pub const CAPACITY: usize = 256;

impl Default for CallTable {
    fn default() -> Self {
        CallTable::new(CAPACITY)
    }
}

impl CallTable {
    /// A table of at most `capacity` names (besides [`OTHER`]).
    pub fn new(capacity: usize) -> CallTable {
        CallTable {
            table: RwLock::new(HashMap::new()),
            other: Arc::default(),
            capacity,
        }
    }

    /// The counters of `name`: its own while there is room, else those of [`OTHER`].
    pub fn of(&self, name: &str) -> Arc<CallStat> {
        if let Some(stat) = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return stat.clone();
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(stat) = table.get(name) {
            return stat.clone();
        }
        if table.len() >= self.capacity || name == OTHER {
            return self.other.clone();
        }
        let stat = Arc::new(CallStat::default());
        table.insert(name.to_owned(), stat.clone());
        stat
    }

    /// Counts one call of `name`.
    pub fn record(&self, name: &str, took: Duration, outcome: Outcome) {
        self.of(name).record(took, outcome);
    }

    /// Every name's counters, sorted by name, [`OTHER`] last when it has counted anything.
    pub fn all(&self) -> Vec<(String, Arc<CallStat>)> {
        let mut all: Vec<(String, Arc<CallStat>)> = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, stat)| (name.clone(), stat.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        if self.other.calls.load(Ordering::Relaxed) > 0 {
            all.push((OTHER.to_owned(), self.other.clone()));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_counts_by_name_and_folds_names_past_its_capacity() {
        let table = CallTable::new(2);
        table.record("a", Duration::from_micros(50), Outcome::Ok);
        table.record(
            "b",
            Duration::from_millis(3),
            Outcome::Error(ErrorKind::Failed),
        );
        for name in ["c", "d", "a"] {
            table.record(
                name,
                Duration::from_secs(20),
                Outcome::Error(ErrorKind::TimedOut),
            );
        }
        let all = table.all();
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", OTHER]);
        let a = &all[0].1;
        assert_eq!(a.calls.load(Ordering::Relaxed), 2);
        assert_eq!(a.errors(ErrorKind::TimedOut), 1);
        assert_eq!(a.buckets()[0], (0.0001, 1), "50 µs in the first bucket");
        assert_eq!(
            a.buckets().last().map(|b| b.1),
            Some(1),
            "20 s past every bound"
        );
        assert_eq!(all[1].1.errors(ErrorKind::Failed), 1);
        assert_eq!(all[2].1.calls.load(Ordering::Relaxed), 2, "c and d folded");
        assert!((a.seconds() - 20.00005).abs() < 1e-9);
    }
}
