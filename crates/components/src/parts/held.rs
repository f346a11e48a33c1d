//! [`HeldPublisher`]: pylm's publisher, an XPUB that holds each result until its topic is
//! subscribed to or a grace period passes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, OutboundQueue};
use rylm_message::Codec;
use rylm_transport::{Kind, Socket};

use super::{Endpoint, TopicFn, Transport, router_error};
use crate::Error;

/// A PUB for peers that subscribe just before they send (pylm's client opens a new SUB, and a
/// new PUSH, for every call): an XPUB that sees subscriptions arrive, and holds each message
/// until a subscription to its topic arrives *after* the message was ready, or at most `grace`.
/// In the first case the subscriber was late and is now there; in the second its subscription
/// came before the message and it is there already. Counting subscriptions instead would not
/// work: a closed SUB sends no unsubscription, so counts go stale.
///
/// With [`HeldPublisher::cleared_until_new_connection`], a topic is *cleared* once a
/// subscription to it has arrived, or a message for it went out at its deadline (which assumes
/// the subscriber is there), and no client connection has been accepted on the requests' socket
/// since; a message for a cleared topic goes out at once, and so does all that waits for a topic
/// when it is cleared. A new request connection revokes every clearance, because it may be a
/// per-call client whose new SUB is still on its way while the one it replaces has closed. The
/// request socket reads connection news ahead of messages, and the transport publishes that
/// news when it accepts the connection, before its handshake, so a request cannot overtake
/// it. So a long-lived subscriber pays no latency, and a per-call one at most once per call
/// what it paid before. This relies on clients that open a new SUB opening a new request
/// connection with it, as pylm's client does and rylm's (which keeps both) does not need to. The publisher's own new connections cannot serve instead: an accepted connection may be
/// reported after the peer's subscription was already read, and a subscription read before
/// its connection's news would be forgotten.
pub struct HeldPublisher {
    socket: Socket,
    /// Connections accepted on the clients' request socket, when clearance is on.
    connections: Option<Arc<AtomicU64>>,
    codec: Arc<dyn Codec>,
    topic: TopicFn,
    grace: std::time::Duration,
    address: String,
}

impl std::fmt::Debug for HeldPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldPublisher")
            .field("address", &self.address)
            .finish()
    }
}

impl HeldPublisher {
    /// An XPUB service or connection.
    pub async fn xpub(
        endpoint: &Endpoint,
        topic: TopicFn,
        transport: &Transport,
        codec: Arc<dyn Codec>,
        grace: std::time::Duration,
    ) -> Result<Self, Error> {
        let (socket, address) = transport.open(Kind::XPub, endpoint).await?;
        Ok(HeldPublisher {
            socket,
            connections: None,
            codec,
            topic,
            grace,
            address,
        })
    }

    /// Sends a message for a cleared topic at once (see the type's documentation). `counter`
    /// must count every connection over which a client's requests can arrive (give it to the
    /// clients' socket with [`Listen::count_connections`](super::Listen::count_connections)).
    pub fn cleared_until_new_connection(mut self, counter: Arc<AtomicU64>) -> Self {
        self.connections = Some(counter);
        self
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        &self.address
    }

    async fn send(&mut self, frames: Vec<Bytes>) {
        if let Err(error) = self.socket.send(frames).await {
            tracing::warn!(address = %self.address, %error, "could not publish");
        }
    }

    /// The router component (non-blocking).
    pub async fn run(mut self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        // Messages waiting, by topic: when each may go out at the latest, and its frames.
        let mut held: HashMap<Bytes, Vec<(std::time::Instant, Vec<Bytes>)>> = HashMap::new();
        // Subscription prefixes seen since the last accepted connection, and that count.
        let mut cleared: Vec<Bytes> = Vec::new();
        let mut cleared_at = 0u64;
        let clearing = self.connections.is_some();
        let mut ticker =
            tokio::time::interval((self.grace / 4).max(std::time::Duration::from_millis(5)));
        loop {
            tokio::select! {
                delivery = queue.recv() => {
                    let Some(delivery) = delivery else { break };
                    let (message, responder) = delivery.into_parts();
                    let frames = match self.codec.encode_frames(&message) {
                        Ok(frames) => frames,
                        Err(error) => {
                            responder.send(Err(router_error(error.into())));
                            continue;
                        }
                    };
                    let due = std::time::Instant::now() + self.grace;
                    revoke_if_connected(&self.connections, &mut cleared, &mut cleared_at);
                    for topic in (self.topic)(&message) {
                        let topic = Bytes::from(topic);
                        let mut with_topic = vec![topic.clone()];
                        with_topic.extend(frames.iter().cloned());
                        let waiting = held.contains_key(&topic);
                        if clearing && !waiting && cleared.iter().any(|p| topic.starts_with(p)) {
                            self.send(with_topic).await;
                        } else {
                            held.entry(topic).or_default().push((due, with_topic));
                        }
                    }
                    responder.send(Ok(None));
                }
                received = self.socket.recv() => {
                    let received = match received {
                        Ok(received) => received,
                        Err(error) if error.is_closed() => break,
                        Err(_) => continue,
                    };
                    let Some(frame) = received.first() else { continue };
                    if frame.first() != Some(&1) {
                        continue;
                    }
                    // A subscription: what waits for a topic it covers goes out now.
                    let prefix = frame.get(1..).unwrap_or_default();
                    revoke_if_connected(&self.connections, &mut cleared, &mut cleared_at);
                    if clearing && !cleared.iter().any(|p| p.as_ref() == prefix) {
                        cleared.push(Bytes::copy_from_slice(prefix));
                    }
                    let ready: Vec<Bytes> = held.keys().filter(|t| t.starts_with(prefix)).cloned().collect();
                    for topic in ready {
                        for (_, frames) in held.remove(&topic).unwrap_or_default() {
                            self.send(frames).await;
                        }
                    }
                }
                _ = ticker.tick() => {
                    let now = std::time::Instant::now();
                    let mut due = Vec::new();
                    if clearing {
                        // Sending at the deadline assumes the subscriber came first and is there:
                        // then it is there for what follows too, until a new connection.
                        revoke_if_connected(&self.connections, &mut cleared, &mut cleared_at);
                        let topics: Vec<Bytes> = held
                            .iter()
                            .filter(|(_, waiting)| waiting.iter().any(|(at, _)| *at <= now))
                            .map(|(topic, _)| topic.clone())
                            .collect();
                        for topic in topics {
                            due.extend(held.remove(&topic).unwrap_or_default().into_iter().map(|(_, frames)| frames));
                            cleared.push(topic);
                        }
                    } else {
                        held.retain(|_, waiting| {
                            let (now_due, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= now);
                            due.extend(now_due.into_iter().map(|(_, frames)| frames));
                            *waiting = later;
                            !waiting.is_empty()
                        });
                    }
                    for frames in due {
                        self.send(frames).await;
                    }
                }
            }
        }
        for (_, waiting) in held.drain() {
            for (_, frames) in waiting {
                self.send(frames).await;
            }
        }
        Ok(())
    }
}

/// Forgets every clearance when a connection was accepted since they were given.
fn revoke_if_connected(
    connections: &Option<Arc<AtomicU64>>,
    cleared: &mut Vec<Bytes>,
    cleared_at: &mut u64,
) {
    if let Some(counter) = connections {
        let now = counter.load(Ordering::SeqCst);
        if now != *cleared_at {
            cleared.clear();
            *cleared_at = now;
        }
    }
}
