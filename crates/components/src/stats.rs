//! What a server's or worker's functions did: calls, failures and panics, and a latency
//! histogram per function, as atomics bumped where a function runs and read by whoever asks
//! (the `--admin` metrics of `rylm`). Names are the registered ones, known before the first
//! call; a call of an unknown name counts under `_unknown`, so the set of names stays bounded.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

pub use rylm_message::stats::{CallStat as FunctionStat, ErrorKind, LATENCY_BUCKETS, Outcome};

/// The name calls of unknown functions count under.
pub const UNKNOWN: &str = "_unknown";

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
