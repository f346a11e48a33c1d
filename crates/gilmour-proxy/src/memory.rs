//! Giving memory back after nodes leave. glibc's allocator keeps the memory it freed for later
//! (per thread arena, in the middle of its heaps), so a proxy that held 1,000 nodes would keep
//! their high-water mark for good after they are deleted. After a node is deleted or forgotten,
//! a background task asks the allocator, at most once a second, to return its free pages to
//! the system (`malloc_trim`). On other allocators this does nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Between a deletion and the trim that follows it (deletions in a burst share one trim).
const SETTLE: Duration = Duration::from_secs(1);

/// Starts the trimming task; notify the returned handle after freeing a node.
pub(crate) fn trimmer() -> (Arc<Notify>, tokio::task::JoinHandle<()>) {
    let freed = Arc::new(Notify::new());
    let task = tokio::spawn({
        let freed = freed.clone();
        async move {
            loop {
                freed.notified().await;
                tokio::time::sleep(SETTLE).await;
                give_back();
            }
        }
    });
    (freed, task)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn give_back() {
    // SAFETY: `malloc_trim` has no preconditions: it takes the allocator's own locks, may be
    // called from any thread at any time, and only returns free pages to the system.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, "returned free memory to the system");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back() {}
