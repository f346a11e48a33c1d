//! What happens to a socket's connections: events for its owner, counters for an operator,
//! and warnings about misbehaving peers at a bounded rate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One change of a socket's connections.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A bound socket accepted a connection (its handshake is still to come).
    Accepted {
        /// The connection's id within this socket.
        connection: u64,
        /// The peer's address (TCP only).
        peer: Option<SocketAddr>,
    },
    /// A connecting socket reached its peer (its handshake is still to come).
    Connected {
        /// The connection's id within this socket.
        connection: u64,
    },
    /// A connection completed its handshake and may carry messages.
    Ready {
        /// The connection's id within this socket.
        connection: u64,
        /// The routing identity the peer declared, if it declared one (untrusted: any peer
        /// may declare any identity).
        identity: Option<bytes::Bytes>,
    },
    /// A connection ended.
    Disconnected {
        /// The connection's id within this socket.
        connection: u64,
        /// Why, in words.
        reason: String,
        /// The peer broke the protocol or a limit (an oversized frame, a malformed
        /// frame, a missed heartbeat), as opposed to a close by either side.
        dropped: bool,
    },
    /// A connection failed its handshake (a wrong key, a refused client, a timeout).
    HandshakeFailed {
        /// Why, in words.
        reason: String,
    },
    /// A connecting socket stopped dialling because its peer refused it for good (CURVE
    /// refusal); it will not connect again.
    Refused {
        /// Why, in words.
        reason: String,
    },
}

impl Event {
    pub(crate) fn from_omq(event: omq_tokio::MonitorEvent) -> Option<Event> {
        use omq_tokio::{DisconnectReason, MonitorEvent as M};
        Some(match event {
            M::Accepted {
                connection_id,
                peer_ident,
                ..
            } => Event::Accepted {
                connection: connection_id,
                peer: match peer_ident {
                    omq_tokio::PeerIdent::Socket(address) => Some(address),
                    _ => None,
                },
            },
            M::Connected { connection_id, .. } => Event::Connected {
                connection: connection_id,
            },
            M::HandshakeSucceeded { peer, .. } => Event::Ready {
                connection: peer.connection_id,
                identity: peer.peer_identity.clone(),
            },
            M::Disconnected { peer, reason, .. } => Event::Disconnected {
                connection: peer.connection_id,
                dropped: matches!(reason, DisconnectReason::Error(_)),
                reason: match reason {
                    DisconnectReason::PeerClosed => "closed by the peer".into(),
                    DisconnectReason::LocalClose => "closed here".into(),
                    DisconnectReason::Handover => "replaced by a new connection".into(),
                    DisconnectReason::Error(reason) => reason,
                    DisconnectReason::HandshakeRefused(refusal) => refusal.to_string(),
                    other => format!("{other:?}"),
                },
            },
            M::HandshakeFailed { reason, .. } => Event::HandshakeFailed { reason },
            M::ConnectStopped { reason, .. } => Event::Refused {
                reason: format!("{reason:?}"),
            },
            _ => return None,
        })
    }
}

/// Counters of one socket's connections since it was created.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) connected: AtomicU64,
    pub(crate) ready: AtomicU64,
    pub(crate) disconnected: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) handshake_failed: AtomicU64,
}

/// A copy of a socket's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted (bound sockets).
    pub accepted: u64,
    /// Connections made (connecting sockets, reconnections included).
    pub connected: u64,
    /// Handshakes completed.
    pub ready: u64,
    /// Connections ended, for any reason.
    pub disconnected: u64,
    /// Connections dropped because the peer broke the protocol or a limit.
    pub dropped: u64,
    /// Handshakes that failed (timeouts and refused keys among them).
    pub handshake_failed: u64,
}

/// Every socket's counters of this process together.
static TOTALS: Stats = Stats::new();

/// The counters of every socket of this process together, since it started (sockets closed
/// since included): what an admin endpoint shows, with no label per socket, so that sockets
/// that come and go (a client's fresh request sockets) cannot grow its series.
pub fn totals() -> StatsSnapshot {
    TOTALS.snapshot()
}

impl Stats {
    pub(crate) const fn new() -> Stats {
        Stats {
            accepted: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            handshake_failed: AtomicU64::new(0),
        }
    }

    /// Counts `event` for this socket and in the process's totals.
    pub(crate) fn count(&self, event: &Event) {
        self.bump(event);
        TOTALS.bump(event);
    }

    fn bump(&self, event: &Event) {
        let counter = match event {
            Event::Accepted { .. } => &self.accepted,
            Event::Connected { .. } => &self.connected,
            Event::Ready { .. } => &self.ready,
            Event::Disconnected { dropped, .. } => {
                if *dropped {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                &self.disconnected
            }
            Event::HandshakeFailed { .. } | Event::Refused { .. } => &self.handshake_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
            disconnected: self.disconnected.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            handshake_failed: self.handshake_failed.load(Ordering::Relaxed),
        }
    }
}

/// At most one log line per `every`, saying how many were held back meanwhile: a hostile
/// peer must not be able to flood the log.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(number held back since the last line)` when a line may be written now.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// A socket's stream of [`Event`]s (see [`crate::Socket::events`]).
#[derive(Debug)]
pub struct Events {
    pub(crate) stream: omq_tokio::MonitorStream,
}

impl Events {
    /// The next event, or `None` once the socket is closed. Events a slow reader missed are
    /// skipped (the socket's [`Stats`] still count them).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.stream.recv().await {
                Ok(event) => {
                    if let Some(event) = Event::from_omq(event) {
                        return Some(event);
                    }
                }
                Err(omq_tokio::MonitorRecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "connection events skipped");
                }
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let start = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.admit(start), Some(0));
        for i in 1..=5 {
            assert_eq!(throttle.admit(start + Duration::from_secs(i)), None);
        }
        assert_eq!(throttle.admit(start + Duration::from_secs(11)), Some(5));
        assert_eq!(throttle.admit(start + Duration::from_secs(12)), None);
    }
}
