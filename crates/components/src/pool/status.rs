//! What a pool shows of itself while it runs: its counters and its view of the workers, shared
//! with the admin endpoints, `rylm.status` and the gateway's readiness check.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What a pool has done, counted since it started.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Messages sent to a worker (re-dispatches included).
    pub dispatched: AtomicU64,
    /// Answers passed on.
    pub answered: AtomicU64,
    /// Messages sent to a second worker after the first was buried.
    pub redispatched: AtomicU64,
    /// Messages answered `busy` because the waiting line was full.
    pub busy: AtomicU64,
    /// Messages answered `deadline`: still waiting, or still unanswered, at their deadline.
    pub expired: AtomicU64,
    /// Messages failed back because the workers holding them died.
    pub worker_died: AtomicU64,
    /// Answers dropped: late duplicates, answers from a worker a dispatch was not sent to,
    /// answers to unknown dispatches.
    pub dropped_answers: AtomicU64,
    /// Frames from workers that did not decode.
    pub malformed: AtomicU64,
    /// Workers buried for silence.
    pub buried: AtomicU64,
    /// Workers admitted (again, after a burial or a restart, included).
    pub admitted: AtomicU64,
    /// Messages withdrawn by their caller before an answer.
    pub withdrawn: AtomicU64,
    /// Withdrawn messages a worker stopped running at the pool's request, its credit back.
    pub cancelled: AtomicU64,
}

impl PoolCounters {
    /// Every counter as (name, what it counts, value now): what `rylm.status` and the admin
    /// metrics both show, from one list.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 12] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "dispatched",
                "messages sent to a worker, re-dispatches included",
                load(&self.dispatched),
            ),
            ("answered", "answers passed on", load(&self.answered)),
            (
                "redispatched",
                "messages sent again after their worker was buried",
                load(&self.redispatched),
            ),
            (
                "busy",
                "messages answered busy: the waiting line was full",
                load(&self.busy),
            ),
            ("expired", "messages answered deadline", load(&self.expired)),
            (
                "worker_died",
                "messages failed back because their workers died",
                load(&self.worker_died),
            ),
            (
                "dropped_answers",
                "late, duplicate or unknown answers dropped",
                load(&self.dropped_answers),
            ),
            (
                "malformed",
                "frames from workers that did not decode",
                load(&self.malformed),
            ),
            (
                "workers_buried",
                "workers buried for silence or a closed connection",
                load(&self.buried),
            ),
            (
                "workers_admitted",
                "workers admitted, again after a burial included",
                load(&self.admitted),
            ),
            (
                "withdrawn",
                "messages withdrawn by their caller",
                load(&self.withdrawn),
            ),
            (
                "cancelled",
                "withdrawn messages a worker stopped running, its credit back",
                load(&self.cancelled),
            ),
        ]
    }
}

/// What a worker pool knows of its workers, shared with whoever asks.
#[derive(Debug, Default)]
pub struct PoolStatus {
    pub(super) live: AtomicUsize,
    pub(super) free_credits: AtomicUsize,
    pub(super) waiting: AtomicUsize,
    pub(super) in_flight: AtomicUsize,
    pub(super) functions: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub(super) counters: PoolCounters,
}

impl PoolStatus {
    /// How many workers are live now.
    pub fn live_workers(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Free credits over all live workers.
    pub fn free_credits(&self) -> usize {
        self.free_credits.load(Ordering::Relaxed)
    }

    /// Messages waiting for a credit.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Messages held by workers.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the pool has done.
    pub fn counters(&self) -> &PoolCounters {
        &self.counters
    }

    /// Whether a worker has announced `function` (no copy of the list, for hot paths).
    pub fn knows(&self, function: &str) -> bool {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(function)
    }

    /// The functions the workers have announced.
    pub fn functions(&self) -> Vec<String> {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
