//! How every long-running command stops: on SIGTERM (systemd, Kubernetes, Docker) or SIGINT
//! (Ctrl-C) it drains within a bound; when a part of its server dies under it, it ends with an
//! error (a non-zero status, so a supervisor restarts it) instead of running headless.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The stop signals' listeners, made by [`listen`] before a command says how to stop it, so
/// that a signal sent as soon as that line shows is neither lost nor fatal (SIGTERM's default
/// action would end the process before it drains).
#[cfg(unix)]
static LISTENING: std::sync::Mutex<Option<Listening>> = std::sync::Mutex::new(None);

#[cfg(unix)]
struct Listening {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Listening {
    fn new() -> Result<Listening> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Listening {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }
}

/// Starts listening for SIGTERM and SIGINT (within the runtime), for [`stop_signal`] to wait
/// on: call it before telling anyone how to stop the command.
pub(crate) fn listen() -> Result<()> {
    #[cfg(unix)]
    {
        let listening = Listening::new()?;
        *LISTENING.lock().unwrap_or_else(|e| e.into_inner()) = Some(listening);
    }
    Ok(())
}

/// The first SIGTERM or SIGINT (since [`listen`], if it was called); its name.
pub(crate) async fn stop_signal() -> Result<&'static str> {
    #[cfg(unix)]
    {
        let listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut listening = match listening {
            Some(listening) => listening,
            None => Listening::new()?,
        };
        tokio::select! {
            _ = listening.term.recv() => Ok("SIGTERM"),
            _ = listening.int.recv() => Ok("SIGINT"),
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
