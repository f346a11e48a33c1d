//! The inbound parts: [`Listen`] (PULL, SUB), [`Answer`] (REP) and [`RouterIn`] (ROUTER), each
//! taking messages from its socket into the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, InboundLink};
use rylm_message::Codec;
use rylm_transport::{Event, Events, Kind};

use super::{Endpoint, PartSocket, Transport, answer};
use crate::Error;
use crate::pool::{Hook, run_hook};

/// PULL or SUB: submits every message it receives (or what a hook makes of it).
pub struct Listen {
    part: PartSocket,
    /// Frames before the message (a SUB's topic).
    skip: usize,
    /// Connection events, and the count each accepted connection bumps.
    connections: Option<(Events, Arc<AtomicU64>)>,
    /// What each message becomes before it is submitted, and the hook's name for the log.
    hook: Option<(Hook, &'static str)>,
}

impl std::fmt::Debug for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listen")
            .field("part", &self.part)
            .field("hook", &self.hook.as_ref().map(|(_, name)| name))
            .finish()
    }
}

impl Listen {
    /// A PULL service or connection.
    pub async fn pull(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Listen {
            part: PartSocket::open(Kind::Pull, endpoint, transport, codec).await?,
            skip: 0,
            connections: None,
            hook: None,
        })
    }

    /// A DEALER service or connection announcing `identity`: a next stage's input from the
    /// stream of a previous server, which routes to it by that name.
    pub async fn dealer(
        endpoint: &Endpoint,
        identity: &str,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let mut transport = transport.clone();
        let identity = Bytes::copy_from_slice(identity.as_bytes());
        transport.bound.identity = identity.clone();
        transport.connected.identity = identity;
        Ok(Listen {
            part: PartSocket::open(Kind::Dealer, endpoint, &transport, codec).await?,
            skip: 0,
            connections: None,
            hook: None,
        })
    }

    /// A SUB service or connection subscribed to `topics` (an empty string takes everything).
    pub async fn sub(
        endpoint: &Endpoint,
        topics: &[&str],
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let part = PartSocket::open(Kind::Sub, endpoint, transport, codec).await?;
        for topic in topics {
            part.socket
                .subscribe(Bytes::from(topic.to_string()))
                .await?;
        }
        Ok(Listen {
            part,
            skip: 1,
            connections: None,
            hook: None,
        })
    }

    /// Bumps `counter` for every connection accepted, before any message that comes over it is
    /// submitted (see [`HeldPublisher::cleared_until_new_connection`](super::HeldPublisher::cleared_until_new_connection)).
    pub fn count_connections(mut self, counter: Arc<AtomicU64>) -> Self {
        self.connections = Some((self.part.socket.events(), counter));
        self
    }

    /// Submits what `hook` (named `name` in the log) makes of each message instead of the
    /// message: none, one or many. A hook that panics loses its message (pylm's layout has no
    /// error reply), which the log says; the part goes on with the next.
    pub fn with_hook(mut self, hook: Hook, name: &'static str) -> Self {
        self.hook = Some((hook, name));
        self
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component.
    pub async fn run(mut self, mut link: InboundLink) -> Result<(), RouterError> {
        loop {
            let received = tokio::select! {
                // Connection events first: a message must not overtake the news of its connection.
                biased;
                event = next_event(&mut self.connections) => {
                    match event {
                        Some(Event::Accepted { .. }) => {
                            if let Some((_, counter)) = &self.connections {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some(_) => {}
                        None => self.connections = None,
                    }
                    continue;
                }
                _ = link.stopping() => return Ok(()),
                received = self.part.recv() => received,
            };
            let Some(frames) = received else {
                return Ok(());
            };
            match self
                .part
                .codec
                .decode_frames(frames.get(self.skip..).unwrap_or_default())
            {
                Ok(message) => match &self.hook {
                    None => {
                        link.submit(message).await?;
                    }
                    Some((hook, name)) => {
                        // A panic is logged; pylm's layout has no error reply to send.
                        for message in run_hook(hook, name, message).unwrap_or_default() {
                            link.submit(message).await?;
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(address = %self.part.address, %error, "dropped a message that does not decode")
                }
            }
        }
    }
}

/// The next connection event, or never when nothing is monitored.
async fn next_event(connections: &mut Option<(Events, Arc<AtomicU64>)>) -> Option<Event> {
    match connections {
        Some((events, _)) => events.next().await,
        None => std::future::pending().await,
    }
}

/// REP: submits each request and replies with its feedback (or an error message).
#[derive(Debug)]
pub struct Answer {
    part: PartSocket,
}

impl Answer {
    /// A REP service or connection.
    pub async fn rep(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Answer {
            part: PartSocket::open(Kind::Rep, endpoint, transport, codec).await?,
        })
    }

    /// The router component (register it blocking).
    pub async fn run(self, mut link: InboundLink) -> Result<(), RouterError> {
        loop {
            let received = tokio::select! {
                _ = link.stopping() => return Ok(()),
                received = self.part.recv() => received,
            };
            let Some(received) = received else {
                return Ok(());
            };
            let reply = answer(&link, self.part.codec.as_ref(), &received).await;
            if let Err(error) = self.part.send(None, &reply).await {
                tracing::warn!(address = %self.part.address, %error, "could not send a reply");
            }
        }
    }
}

/// ROUTER: submits each request, many at once, and sends each feedback back to its peer.
#[derive(Debug)]
pub struct RouterIn {
    part: PartSocket,
}

impl RouterIn {
    /// A ROUTER service or connection.
    pub async fn router(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(RouterIn {
            part: PartSocket::open(Kind::Router, endpoint, transport, codec).await?,
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component (register it blocking).
    pub async fn run(self, mut link: InboundLink) -> Result<(), RouterError> {
        let mut calls = tokio::task::JoinSet::new();
        loop {
            let received = tokio::select! {
                _ = link.stopping() => break,
                received = self.part.recv() => received,
            };
            while calls.try_join_next().is_some() {}
            let Some(mut frames) = received else { break };
            if frames.is_empty() {
                continue;
            }
            let identity = frames.remove(0);
            let (link, part) = (link.clone(), self.part.clone());
            calls.spawn(async move {
                let reply = answer(&link, part.codec.as_ref(), &frames).await;
                if let Err(error) = part.send(Some(identity), &reply).await {
                    tracing::warn!(address = %part.address, %error, "could not send a reply; the peer is gone");
                }
            });
        }
        while calls.join_next().await.is_some() {}
        Ok(())
    }
}
