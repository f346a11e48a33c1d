//! The socket: rylm's handle on one ZeroMQ socket of the implementation.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::events::{Event, Events, Stats, StatsSnapshot, Throttle};
use crate::{Error, Kind, Options};

/// How often a socket may log a warning about its peers.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One ZeroMQ socket. Cheap to clone: every clone is the same socket, so one task can receive
/// while others send. Messages are lists of frames.
///
/// Created with [`Options`] (safe defaults); a watcher task counts its connection events in
/// [`Socket::stats`] and logs misbehaving peers at most once per ten seconds.
#[derive(Clone)]
pub struct Socket {
    inner: omq_tokio::Socket,
    shared: Arc<Shared>,
}

struct Shared {
    kind: Kind,
    send_timeout: Duration,
    /// The first address bound or connected, for error messages.
    address: Mutex<String>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("kind", &self.shared.kind)
            .field("address", &self.address())
            .finish()
    }
}

impl Socket {
    /// A new socket of `kind`. Must be called within a tokio runtime.
    pub fn new(kind: Kind, options: &Options) -> Result<Self, Error> {
        let inner = omq_tokio::Socket::try_new(kind.omq(), options.omq()?)
            .map_err(|e| Error::socket("create", "(new socket)")(e))?;
        let stats = Arc::new(Stats::default());
        tokio::spawn(watch(kind, inner.monitor(), stats.clone()));
        Ok(Socket {
            inner,
            shared: Arc::new(Shared {
                kind,
                send_timeout: options.send_timeout,
                address: Mutex::new(String::new()),
                stats,
            }),
        })
    }

    /// The socket's pattern.
    pub fn kind(&self) -> Kind {
        self.shared.kind
    }

    /// The first address this socket was bound or connected to (empty before).
    pub fn address(&self) -> String {
        self.shared
            .address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn remember(&self, address: &str) {
        let mut first = self
            .shared
            .address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if first.is_empty() {
            *first = address.to_owned();
        }
    }

    /// Binds `address` (`tcp://HOST:PORT`, port 0 picks a free one; `ipc://PATH`;
    /// `inproc://NAME`) and returns the address actually bound.
    pub async fn bind(&self, address: &str) -> Result<String, Error> {
        let bound = self
            .inner
            .bind(address)
            .await
            .map_err(|e| Error::socket("bind", address)(e))?
            .to_string();
        self.remember(&bound);
        Ok(bound)
    }

    /// Connects to `address`. The connection is made in the background and made again,
    /// with backoff, whenever it is lost; messages sent meanwhile wait in the queue (up to
    /// the high-water mark).
    pub async fn connect(&self, address: &str) -> Result<(), Error> {
        self.inner
            .connect(address)
            .await
            .map_err(|e| Error::socket("connect", address)(e))?;
        self.remember(address);
        Ok(())
    }

    /// Subscribes a SUB socket to messages whose first frame starts with `prefix`.
    pub async fn subscribe(&self, prefix: impl Into<Bytes>) -> Result<(), Error> {
        let prefix = prefix.into();
        self.inner
            .subscribe(prefix)
            .await
            .map_err(|e| Error::socket("subscribe", &self.address())(e))
    }

    /// Sends one message, waiting at most the socket's send timeout for a peer to take it
    /// (a PUB never waits: what no subscriber takes is dropped, as ZeroMQ does).
    pub async fn send(&self, frames: Vec<Bytes>) -> Result<(), Error> {
        self.send_within(frames, self.shared.send_timeout).await
    }

    /// Sends one message, waiting at most `deadline` for a peer to take it.
    pub async fn send_within(&self, frames: Vec<Bytes>, deadline: Duration) -> Result<(), Error> {
        // The common case, room in the queue, needs neither a timer nor a wait.
        match self.try_send(frames)? {
            None => Ok(()),
            Some(unsent) => self.send_unsent(unsent, deadline).await,
        }
    }

    /// Sends one message if there is room for it now, without waiting: `Some` gives it back
    /// when there is none (send it with [`Socket::send_unsent`]).
    pub fn try_send(&self, frames: Vec<Bytes>) -> Result<Option<Unsent>, Error> {
        match self.inner.try_send(omq_tokio::Message::multipart(frames)) {
            Ok(()) => Ok(None),
            Err(omq_tokio::TrySendError::Full(message)) => Ok(Some(Unsent(message))),
            Err(omq_tokio::TrySendError::Closed) => Err(Error::Closed {
                address: self.address(),
            }),
            Err(omq_tokio::TrySendError::Error(error)) => {
                Err(Error::socket("send", &self.address())(error))
            }
        }
    }

    /// Sends a message [`Socket::try_send`] had no room for, waiting at most `deadline`.
    pub async fn send_unsent(&self, unsent: Unsent, deadline: Duration) -> Result<(), Error> {
        match tokio::time::timeout(deadline, self.inner.send(unsent.0)).await {
            Ok(sent) => sent.map_err(|e| Error::socket("send", &self.address())(e)),
            Err(_) => Err(Error::SendTimeout {
                address: self.address(),
                waited: deadline,
            }),
        }
    }

    /// The socket's send timeout (see [`crate::Options`]).
    pub fn send_timeout(&self) -> Duration {
        self.shared.send_timeout
    }

    /// Receives the next message (a ROUTER's starts with the peer's identity; an XPUB's
    /// subscriptions come as `\x01prefix` and `\x00prefix`).
    pub async fn recv(&self) -> Result<Vec<Bytes>, Error> {
        Ok(self.recv_message().await?.into_frames())
    }

    /// Receives the next message without copying its frames out: [`Received::part`] borrows
    /// them, which saves an allocation per small frame for a reader that only parses.
    pub async fn recv_message(&self) -> Result<Received, Error> {
        let message = self
            .inner
            .recv()
            .await
            .map_err(|e| Error::socket("receive", &self.address())(e))?;
        Ok(Received { message })
    }

    /// The next message if one has arrived, without waiting: a loop that took one message
    /// takes the others already there before it waits again (its wait, and whatever else it
    /// waits on beside, is then paid once per burst instead of once per message).
    pub fn try_recv_message(&self) -> Result<Option<Received>, Error> {
        match self.inner.try_recv() {
            Ok(message) => Ok(Some(Received { message })),
            Err(omq_tokio::Error::WouldBlock) => Ok(None),
            Err(error) => Err(Error::socket("receive", &self.address())(error)),
        }
    }

    /// The socket's connection events from now on.
    pub fn events(&self) -> Events {
        Events {
            stream: self.inner.monitor(),
        }
    }

    /// How many peers have completed their handshake and are connected now.
    pub fn peers(&self) -> usize {
        self.inner.ready_peer_count()
    }

    /// Waits until at least `count` peers are ready, or fails after `deadline`.
    pub async fn wait_for_peers(&self, count: usize, deadline: Duration) -> Result<usize, Error> {
        self.inner
            .wait_connected(count, deadline)
            .await
            .map_err(|e| Error::socket("wait for peers", &self.address())(e))
    }

    /// The counters of this socket's connections.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Closes the socket gracefully: what was accepted for sending is flushed for at most the
    /// linger, then every connection is closed. Other clones fail with [`Error::Closed`].
    pub async fn close(self) {
        let address = self.address();
        if let Err(error) = self.inner.close().await {
            tracing::debug!(%address, %error, "closing");
        }
    }
}

/// A message [`Socket::try_send`] had no room for.
pub struct Unsent(omq_tokio::Message);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsent")
            .field("frames", &self.0.len())
            .finish()
    }
}

/// One received message, its frames borrowed from the transport's buffers.
pub struct Received {
    message: omq_tokio::Message,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("frames", &self.len())
            .finish()
    }
}

impl Received {
    /// How many frames the message has.
    pub fn len(&self) -> usize {
        self.message.len()
    }

    /// Whether the message has no frame.
    pub fn is_empty(&self) -> bool {
        self.message.is_empty()
    }

    /// Frame `index`, borrowed.
    pub fn part(&self, index: usize) -> Option<&[u8]> {
        self.message.part_slice(index)
    }

    /// Frame `index`, owned (small frames are copied).
    pub fn bytes(&self, index: usize) -> Option<Bytes> {
        self.message.part_bytes(index)
    }

    /// Every frame, owned.
    pub fn into_frames(self) -> Vec<Bytes> {
        (0..self.message.len())
            .map(|i| self.message.part_bytes(i).unwrap_or_default())
            .collect()
    }
}

/// Counts a socket's events and warns, at a bounded rate, about peers that misbehave.
async fn watch(kind: Kind, mut monitor: omq_tokio::MonitorStream, stats: Arc<Stats>) {
    let mut warnings = Throttle::new(WARN_EVERY);
    loop {
        let event = match monitor.recv().await {
            Ok(event) => event,
            Err(omq_tokio::MonitorRecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(event) = Event::from_omq(event) else {
            continue;
        };
        stats.count(&event);
        let reason = match &event {
            Event::Disconnected {
                dropped: true,
                reason,
                ..
            }
            | Event::HandshakeFailed { reason }
            | Event::Refused { reason } => reason,
            _ => continue,
        };
        if let Some(held) = warnings.admit(Instant::now()) {
            tracing::warn!(?kind, %reason, similar_held_back = held, "a ZeroMQ peer was dropped");
        }
    }
}
