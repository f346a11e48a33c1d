//! ZeroMQ sockets as router components: a *service* binds, a *connection* connects.
//!
//! | pattern | side | component | blocking |
//! |---|---|---|---|
//! | PULL, SUB | inbound | [`Listen`] | no: each message is submitted and travels on |
//! | REP | inbound | [`Answer`] | yes: the feedback is the reply |
//! | ROUTER | inbound | [`RouterIn`] | yes, many at once: each feedback goes back to its peer |
//! | PUSH, PUB | outbound | [`Emit`] | no (a PUB's topic comes from the message) |
//! | REQ | outbound | [`Ask`] | yes, one at a time: the reply is the feedback |
//! | DEALER | outbound | [`DealerOut`] | yes, many at once, matched by the message's `cache` id |
//!
//! Every part is one shape: a [`PartSocket`] (a `rylm-transport` socket, its codec and its
//! address) and the loop of its pattern. Sockets come from `rylm-transport` with its safe
//! defaults and the [`Transport`] options given (security among them): connecting parts
//! reconnect by themselves when their peer comes back. Messages are read and written with the
//! part's [`Codec`]; a frame that does not decode is logged and dropped (an [`Answer`] replies
//! with an error message, as REP must reply).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, InboundLink, OutboundQueue};
use rylm_message::{Codec, Message};
use rylm_transport::{Event, Events, Kind, Options, Security, Socket};

use crate::Error;
use crate::pool::{Hook, run_hook};

/// Where a part's socket goes: bound (a service) or connected (a connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Bind this address (`tcp://127.0.0.1:0` picks a free port).
    Bind(String),
    /// Connect to this address.
    Connect(String),
}

/// The socket options of a server, worker or client: one set for the sockets it binds, one
/// for those it connects (CURVE has a server side and a client side).
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// Options of bound sockets.
    pub bound: Options,
    /// Options of connected sockets.
    pub connected: Options,
}

impl Transport {
    /// Bound sockets are CURVE servers with `keypair`, admitting the clients in `allowed`
    /// (or any client that knows the server's public key, with `None`).
    pub fn curve_server(
        mut self,
        keypair: rylm_transport::Keypair,
        allowed: Option<Vec<rylm_transport::PublicKey>>,
    ) -> Self {
        self.bound = self
            .bound
            .security(Security::CurveServer { keypair, allowed });
        self
    }

    /// Connected sockets are CURVE clients with `keypair`, of a server whose key is `server`.
    pub fn curve_client(
        mut self,
        keypair: rylm_transport::Keypair,
        server: rylm_transport::PublicKey,
    ) -> Self {
        self.connected = self
            .connected
            .security(Security::CurveClient { keypair, server });
        self
    }

    /// The options for a socket going to `endpoint`.
    pub fn options(&self, endpoint: &Endpoint) -> &Options {
        match endpoint {
            Endpoint::Bind(_) => &self.bound,
            Endpoint::Connect(_) => &self.connected,
        }
    }

    /// A socket of `kind` bound or connected as `endpoint` says, and the address it is on.
    pub async fn open(&self, kind: Kind, endpoint: &Endpoint) -> Result<(Socket, String), Error> {
        let socket = Socket::new(kind, self.options(endpoint))?;
        let address = match endpoint {
            Endpoint::Bind(address) => socket.bind(address).await?,
            Endpoint::Connect(address) => {
                socket.connect(address).await?;
                address.clone()
            }
        };
        Ok((socket, address))
    }
}

/// What every part holds: its socket, its codec and the address it is on.
#[derive(Clone)]
pub struct PartSocket {
    socket: Socket,
    codec: Arc<dyn Codec>,
    address: String,
}

impl std::fmt::Debug for PartSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartSocket")
            .field("kind", &self.socket.kind())
            .field("address", &self.address)
            .finish()
    }
}

impl PartSocket {
    /// Opens a socket of `kind` at `endpoint` with `transport`'s options.
    pub async fn open(
        kind: Kind,
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let (socket, address) = transport.open(kind, endpoint).await?;
        Ok(PartSocket {
            socket,
            codec,
            address,
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The socket itself.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// Encodes and sends `message`, after `prefix` frames (a topic, an identity).
    async fn send(&self, prefix: Option<Bytes>, message: &Message) -> Result<(), Error> {
        let mut frames = self.codec.encode_frames(message)?;
        if let Some(prefix) = prefix {
            frames.insert(0, prefix);
        }
        Ok(self.socket.send(frames).await?)
    }

    /// The next message's frames; `None` once the socket is closed. Receive errors other than
    /// a close are logged and skipped.
    async fn recv(&self) -> Option<Vec<Bytes>> {
        loop {
            match self.socket.recv().await {
                Ok(frames) => return Some(frames),
                Err(error) if error.is_closed() => return None,
                Err(error) => {
                    tracing::warn!(address = %self.address, %error, "receiving failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// The frame of an error answer: the request's envelope, no payload, the error in headers.
pub fn error_reply(request: &Message, kind: &str, message: &str) -> Message {
    let mut reply = request.reply(Bytes::new());
    reply.headers.insert(crate::ERROR_KIND.into(), kind.into());
    reply
        .headers
        .insert(crate::ERROR_MESSAGE.into(), message.into());
    reply
}

/// The frames of an answer to send: `message` encoded, or, when it does not encode or is above
/// `max_message` (the peer would drop its connection on it), an `unencodable` error reply in its
/// place, so that the peer still gets an answer and learns why. An error only when even that
/// reply does not encode.
pub(crate) fn answer_frames(
    codec: &dyn Codec,
    message: &Message,
    max_message: usize,
) -> Result<Vec<Bytes>, rylm_message::Error> {
    let encoded = codec.encode_frames(message).and_then(|frames| {
        let size: usize = frames.iter().map(Bytes::len).sum();
        if size > max_message {
            Err(rylm_message::Error::TooLarge {
                size,
                limit: max_message,
            })
        } else {
            Ok(frames)
        }
    });
    match encoded {
        Ok(frames) => Ok(frames),
        Err(error) => {
            tracing::warn!(%error, "an answer could not be sent as it is; sending an error instead");
            codec.encode_frames(&error_reply(message, "unencodable", &error.to_string()))
        }
    }
}

/// The answer to a request that arrived as `frames`: its feedback through the router, or an
/// error reply for a request that does not decode or could not be routed.
async fn answer(link: &InboundLink, codec: &dyn Codec, frames: &[Bytes]) -> Message {
    match codec.decode_frames(frames) {
        Ok(request) => match link.submit(request.clone()).await {
            Ok(Some(feedback)) => feedback,
            Ok(None) => request.reply(Bytes::new()),
            Err(error) => error_reply(&request, "failed", &error.to_string()),
        },
        Err(error) => error_reply(&Message::default(), "malformed", &error.to_string()),
    }
}

fn router_error(error: Error) -> RouterError {
    RouterError::Component {
        component: "socket".into(),
        reason: error.to_string(),
    }
}

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
    /// submitted (see [`HeldPublisher::cleared_until_new_connection`]).
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

/// PUSH or PUB: sends every message it is given; a PUB prefixes the topic `topic(message)`.
pub struct Emit {
    part: PartSocket,
    topic: Option<TopicFn>,
}

impl std::fmt::Debug for Emit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emit").field("part", &self.part).finish()
    }
}

/// The topics a PUB part publishes a message under (usually one).
pub type TopicFn = Arc<dyn Fn(&Message) -> Vec<String> + Send + Sync>;

impl Emit {
    /// A PUSH service or connection. A message waits (up to the transport's send timeout)
    /// for a peer: a worker that joins late still gets what was sent before it came.
    pub async fn push(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Emit {
            part: PartSocket::open(Kind::Push, endpoint, transport, codec).await?,
            topic: None,
        })
    }

    /// The socket, to watch its peers.
    pub fn socket(&self) -> &Socket {
        self.part.socket()
    }

    /// A PUB service or connection publishing each message under each of `topic(message)`.
    pub async fn publish(
        endpoint: &Endpoint,
        topic: TopicFn,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Emit {
            part: PartSocket::open(Kind::Pub, endpoint, transport, codec).await?,
            topic: Some(topic),
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component.
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            let sent = match &self.topic {
                None => self.part.send(None, &message).await,
                Some(topics) => {
                    let mut sent = Ok(());
                    for topic in topics(&message) {
                        sent = sent.and(self.part.send(Some(Bytes::from(topic)), &message).await);
                    }
                    sent
                }
            };
            responder.send(sent.map(|()| None).map_err(router_error));
        }
        self.part.socket.close().await;
        Ok(())
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

/// How long an [`Ask`] waits for its reply by default.
pub const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// REQ: sends each message and hands back the reply as feedback, one at a time. A request
/// without a reply within its deadline fails, and the socket is opened afresh (REQ cannot send
/// again before it has a reply).
#[derive(Debug)]
pub struct Ask {
    part: PartSocket,
    endpoint: Endpoint,
    transport: Transport,
    raw_replies: bool,
    deadline: Duration,
}

impl Ask {
    /// A REQ service or connection.
    pub async fn req(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Ask {
            part: PartSocket::open(Kind::Req, endpoint, transport, codec).await?,
            endpoint: endpoint.clone(),
            transport: transport.clone(),
            raw_replies: false,
            deadline: ASK_DEADLINE,
        })
    }

    /// Takes replies as raw bytes, as pylm's cache sends them: the reply becomes the request's
    /// envelope with those bytes as payload, marked [`crate::MISSING`] when empty.
    pub fn with_raw_replies(mut self) -> Self {
        self.raw_replies = true;
        self
    }

    /// Waits at most `deadline` for each reply (default [`ASK_DEADLINE`]).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// One request and its reply.
    pub async fn ask(&mut self, message: &Message) -> Result<Message, Error> {
        let exchange = async {
            self.part.send(None, message).await?;
            self.part.recv().await.ok_or(Error::Closed)
        };
        let reply = match tokio::time::timeout(self.deadline, exchange).await {
            Ok(Ok(reply)) => reply,
            failed => {
                // The REQ is stuck waiting for a reply that may never come: start afresh.
                let fresh = PartSocket::open(
                    Kind::Req,
                    &self.endpoint,
                    &self.transport,
                    self.part.codec.clone(),
                )
                .await?;
                std::mem::replace(&mut self.part, fresh)
                    .socket
                    .close()
                    .await;
                return Err(match failed {
                    Ok(Err(error)) => error,
                    _ => Error::Timeout {
                        what: format!("a reply from {}", self.endpoint_address()),
                        waited: self.deadline,
                    },
                });
            }
        };
        if self.raw_replies {
            let payload: Bytes = reply.concat().into();
            let reply = message.reply(payload.clone());
            return Ok(if payload.is_empty() {
                reply.with_header(crate::MISSING, "true")
            } else {
                reply
            });
        }
        Ok(self.part.codec.decode_frames(&reply)?)
    }

    fn endpoint_address(&self) -> &str {
        match &self.endpoint {
            Endpoint::Bind(address) | Endpoint::Connect(address) => address,
        }
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component (register it blocking).
    pub async fn run(mut self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            responder.send(self.ask(&message).await.map(Some).map_err(router_error));
        }
        Ok(())
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

/// DEALER: sends each message and hands back the answer carrying the same `cache` id as
/// feedback; many at once.
#[derive(Debug)]
pub struct DealerOut {
    part: PartSocket,
}

type Pending = Arc<std::sync::Mutex<HashMap<String, rylm_core_router::Responder>>>;

impl DealerOut {
    /// A DEALER service or connection.
    pub async fn dealer(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(DealerOut {
            part: PartSocket::open(Kind::Dealer, endpoint, transport, codec).await?,
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component (register it blocking). A message without a `cache` id gets one.
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        let pending: Pending = Arc::default();
        let answers = tokio::spawn(Self::answers(self.part.clone(), pending.clone()));
        while let Some(delivery) = queue.recv().await {
            let (mut message, responder) = delivery.into_parts();
            if message.cache.is_empty() {
                message.cache = rylm_message::new_id();
            }
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(message.cache.clone(), responder);
            if let Err(error) = self.part.send(None, &message).await {
                let responder = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&message.cache);
                if let Some(responder) = responder {
                    responder.send(Err(router_error(error)));
                }
            }
        }
        answers.abort();
        Ok(())
    }

    async fn answers(part: PartSocket, pending: Pending) {
        while let Some(received) = part.recv().await {
            let answer = match part.codec.decode_frames(&received) {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::warn!(address = %part.address, %error, "dropped an answer that does not decode");
                    continue;
                }
            };
            let responder = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&answer.cache);
            match responder {
                Some(responder) => responder.send(Ok(Some(answer))),
                None => {
                    tracing::debug!(address = %part.address, cache = %answer.cache, "an answer nobody waits for")
                }
            }
        }
    }
}

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
    /// clients' socket with [`Listen::count_connections`]).
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
