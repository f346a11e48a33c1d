//! How every long-running command stops: on SIGTERM (systemd, Kubernetes, Docker) or SIGINT
//! (Ctrl-C) it drains within a bound; when a part of its server dies under it, it ends with an
//! error (a non-zero status, so a supervisor restarts it) instead of running headless.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The first SIGTERM or SIGINT; its name.
pub(crate) async fn stop_signal() -> Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

/// Waits for a stop signal (then `Ok`: drain), or for `died` to tell that a part of the server
/// ended (then an error).
pub(crate) async fn until_stopped(what: &str, died: impl Future<Output = String>) -> Result<()> {
    tokio::select! {
        signal = stop_signal() => {
            eprintln!("rylm {what}: {}; stopping, finishing the messages in hand", signal?);
            Ok(())
        }
        ended = died => bail!("rylm {what}: {ended}; it cannot serve any more"),
    }
}

/// `--drain-for` as a duration.
pub(crate) fn drain(seconds: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds).context("--drain-for is not a number of seconds")
}

/// How long a whole shutdown may take: the drain, and time to close sockets after it.
pub(crate) fn shutdown_limit(drain: Duration) -> Duration {
    drain + Duration::from_secs(5)
}
