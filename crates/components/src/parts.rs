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
//! Messages are read and written with the part's [`Codec`]; a frame that does not decode is
//! logged and dropped (an [`Answer`] replies with an error message, as REP must reply).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, InboundLink, OutboundQueue};
use rylm_message::{Codec, Message};
use tokio::sync::Mutex;
use zeromq::{
    DealerSocket, PubSocket, PullSocket, PushSocket, RepSocket, ReqSocket, RouterSocket, Socket,
    SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use crate::Error;

/// Where a part's socket goes: bound (a service) or connected (a connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Bind this address (`tcp://127.0.0.1:0` picks a free port).
    Bind(String),
    /// Connect to this address.
    Connect(String),
}

/// Binds or connects `socket`; returns the address it ended up on.
pub async fn attach<S: Socket>(socket: &mut S, endpoint: &Endpoint) -> Result<String, Error> {
    match endpoint {
        Endpoint::Bind(address) => Ok(socket
            .bind(address)
            .await
            .map_err(Error::socket("bind", address))?
            .to_string()),
        Endpoint::Connect(address) => {
            socket
                .connect(address)
                .await
                .map_err(Error::socket("connect", address))?;
            Ok(address.clone())
        }
    }
}

/// Frames as one multipart message.
pub fn multipart(frames: Vec<Bytes>) -> ZmqMessage {
    let mut frames = frames.into_iter();
    let mut message = ZmqMessage::from(frames.next().unwrap_or_default());
    for frame in frames {
        message.push_back(frame);
    }
    message
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

/// PULL or SUB: submits every message it receives.
pub struct Listen<S> {
    socket: S,
    codec: Arc<dyn Codec>,
    /// Frames before the message (a SUB's topic).
    skip: usize,
    address: String,
    /// Connection events, and the count each accepted connection bumps.
    connections: Option<(Monitor, Arc<AtomicU64>)>,
}

/// A socket's connection events.
type Monitor = futures_lite::stream::Boxed<zeromq::SocketEvent>;

impl<S> std::fmt::Debug for Listen<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listen")
            .field("address", &self.address)
            .finish()
    }
}

impl Listen<PullSocket> {
    /// A PULL service or connection.
    pub async fn pull(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = PullSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(Listen {
            socket,
            codec,
            skip: 0,
            address,
            connections: None,
        })
    }

    /// Bumps `counter` for every connection accepted, before any message that comes over it is
    /// submitted (see [`HeldPublisher::cleared_until_new_connection`]).
    pub fn count_connections(mut self, counter: Arc<AtomicU64>) -> Self {
        let monitor = futures_lite::StreamExt::boxed(self.socket.monitor());
        self.connections = Some((monitor, counter));
        self
    }
}

impl Listen<SubSocket> {
    /// A SUB service or connection subscribed to `topics` (an empty string takes everything).
    pub async fn sub(
        endpoint: &Endpoint,
        topics: &[&str],
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let mut socket = SubSocket::new();
        for topic in topics {
            socket
                .subscribe(topic)
                .await
                .map_err(Error::socket("subscribe", topic))?;
        }
        let address = attach(&mut socket, endpoint).await?;
        Ok(Listen {
            socket,
            codec,
            skip: 1,
            address,
            connections: None,
        })
    }
}

impl<S: SocketRecv + Send + 'static> Listen<S> {
    /// The address the socket is on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The router component.
    pub async fn run(mut self, mut link: InboundLink) -> Result<(), RouterError> {
        loop {
            let received = tokio::select! {
                // Connection events first: a message must not overtake the news of its connection.
                biased;
                event = next_event(&mut self.connections) => {
                    match event {
                        Some(zeromq::SocketEvent::Accepted(..)) => {
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
                received = self.socket.recv() => received,
            };
            let frames = match received {
                Ok(message) => message.into_vec(),
                Err(error) => {
                    tracing::warn!(address = %self.address, %error, "receiving failed");
                    continue;
                }
            };
            match self
                .codec
                .decode_frames(frames.get(self.skip..).unwrap_or_default())
            {
                Ok(message) => {
                    link.submit(message).await?;
                }
                Err(error) => {
                    tracing::warn!(address = %self.address, %error, "dropped a message that does not decode")
                }
            }
        }
    }
}

/// The next connection event, or never when nothing is monitored.
async fn next_event(
    connections: &mut Option<(Monitor, Arc<AtomicU64>)>,
) -> Option<zeromq::SocketEvent> {
    match connections {
        Some((monitor, _)) => futures_lite::StreamExt::next(monitor).await,
        None => std::future::pending().await,
    }
}

/// PUSH or PUB: sends every message it is given; a PUB prefixes the topic `topic(message)`.
pub struct Emit<S> {
    socket: S,
    codec: Arc<dyn Codec>,
    topic: Option<TopicFn>,
    address: String,
}

/// The topics a PUB part publishes a message under (usually one).
pub type TopicFn = Arc<dyn Fn(&Message) -> Vec<String> + Send + Sync>;

impl<S> std::fmt::Debug for Emit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emit")
            .field("address", &self.address)
            .finish()
    }
}

impl Emit<PushSocket> {
    /// A PUSH service or connection.
    pub async fn push(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = PushSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(Emit {
            socket,
            codec,
            topic: None,
            address,
        })
    }
}

impl Emit<PubSocket> {
    /// A PUB service or connection publishing each message under each of `topic(message)`.
    pub async fn publish(
        endpoint: &Endpoint,
        topic: TopicFn,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let mut socket = PubSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(Emit {
            socket,
            codec,
            topic: Some(topic),
            address,
        })
    }
}

impl<S: SocketSend + Send + 'static> Emit<S> {
    /// The address the socket is on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The router component.
    pub async fn run(mut self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            let frames = match self.codec.encode_frames(&message) {
                Ok(frames) => frames,
                Err(error) => {
                    responder.send(Err(router_error(error.into())));
                    continue;
                }
            };
            let mut sent = Ok(());
            match &self.topic {
                None => sent = send_when_connected(&mut self.socket, multipart(frames)).await,
                Some(topics) => {
                    for topic in topics(&message) {
                        let mut with_topic = vec![Bytes::from(topic)];
                        with_topic.extend(frames.iter().cloned());
                        sent = sent.and(self.socket.send(multipart(with_topic)).await);
                    }
                }
            }
            responder.send(
                sent.map(|()| None)
                    .map_err(|e| router_error(Error::socket("send", &self.address)(e))),
            );
        }
        Ok(())
    }
}

/// How long a PUSH waits for a first peer before it gives a message up.
const NO_PEER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends, waiting (up to [`NO_PEER_PATIENCE`]) while the socket has no peer at all: this ZeroMQ
/// refuses a PUSH with no connected peer where libzmq would wait for one, and a worker that
/// joins late must still get what was sent before it came.
async fn send_when_connected<S: SocketSend>(
    socket: &mut S,
    message: ZmqMessage,
) -> zeromq::ZmqResult<()> {
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(5);
    let mut message = message;
    loop {
        match socket.send(message).await {
            Err(zeromq::ZmqError::ReturnToSender { message: back, .. })
                if started.elapsed() < NO_PEER_PATIENCE =>
            {
                message = back;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// REP: submits each request and replies with its feedback (or an error message).
pub struct Answer {
    socket: RepSocket,
    codec: Arc<dyn Codec>,
    address: String,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("address", &self.address)
            .finish()
    }
}

impl Answer {
    /// A REP service or connection.
    pub async fn rep(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = RepSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(Answer {
            socket,
            codec,
            address,
        })
    }

    /// The router component (register it blocking).
    pub async fn run(mut self, mut link: InboundLink) -> Result<(), RouterError> {
        loop {
            let received = tokio::select! {
                _ = link.stopping() => return Ok(()),
                received = self.socket.recv() => received,
            };
            let Ok(received) = received else { continue };
            let reply = answer(&link, self.codec.as_ref(), &received.into_vec()).await;
            let frames = self
                .codec
                .encode_frames(&reply)
                .map_err(|e| router_error(e.into()))?;
            if let Err(error) = self.socket.send(multipart(frames)).await {
                tracing::warn!(address = %self.address, %error, "could not send a reply");
            }
        }
    }
}

/// REQ: sends each message and hands back the reply as feedback, one at a time.
pub struct Ask {
    socket: ReqSocket,
    codec: Arc<dyn Codec>,
    address: String,
    raw_replies: bool,
}

impl std::fmt::Debug for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ask")
            .field("address", &self.address)
            .finish()
    }
}

impl Ask {
    /// A REQ service or connection.
    pub async fn req(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = ReqSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(Ask {
            socket,
            codec,
            address,
            raw_replies: false,
        })
    }

    /// Takes replies as raw bytes, as pylm's cache sends them: the reply becomes the request's
    /// envelope with those bytes as payload, marked [`crate::MISSING`] when empty.
    pub fn with_raw_replies(mut self) -> Self {
        self.raw_replies = true;
        self
    }

    /// One request and its reply.
    pub async fn ask(&mut self, message: &Message) -> Result<Message, Error> {
        let frames = self.codec.encode_frames(message)?;
        self.socket
            .send(multipart(frames))
            .await
            .map_err(Error::socket("send", &self.address))?;
        let reply = self
            .socket
            .recv()
            .await
            .map_err(Error::socket("receive", &self.address))?;
        if self.raw_replies {
            let payload: Bytes = reply.into_vec().concat().into();
            let reply = message.reply(payload.clone());
            return Ok(if payload.is_empty() {
                reply.with_header(crate::MISSING, "true")
            } else {
                reply
            });
        }
        Ok(self.codec.decode_frames(&reply.into_vec())?)
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
pub struct RouterIn {
    socket: RouterSocket,
    codec: Arc<dyn Codec>,
    address: String,
}

impl std::fmt::Debug for RouterIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterIn")
            .field("address", &self.address)
            .finish()
    }
}

impl RouterIn {
    /// A ROUTER service or connection.
    pub async fn router(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = RouterSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(RouterIn {
            socket,
            codec,
            address,
        })
    }

    /// The router component (register it blocking).
    pub async fn run(self, mut link: InboundLink) -> Result<(), RouterError> {
        let (sender, mut receiver) = self.socket.split();
        let sender = Arc::new(Mutex::new(sender));
        let mut calls = tokio::task::JoinSet::new();
        loop {
            let received = tokio::select! {
                _ = link.stopping() => break,
                received = receiver.recv() => received,
            };
            while calls.try_join_next().is_some() {}
            let Ok(received) = received else { continue };
            let mut frames = received.into_vec();
            if frames.is_empty() {
                continue;
            }
            let identity = frames.remove(0);
            let (link, sender, codec, address) = (
                link.clone(),
                sender.clone(),
                self.codec.clone(),
                self.address.clone(),
            );
            calls.spawn(async move {
                let reply = answer(&link, codec.as_ref(), &frames).await;
                let Ok(mut frames) = codec.encode_frames(&reply) else {
                    return;
                };
                frames.insert(0, identity);
                if let Err(error) = sender.lock().await.send(multipart(frames)).await {
                    tracing::warn!(%address, %error, "could not send a reply; the peer is gone");
                }
            });
        }
        while calls.join_next().await.is_some() {}
        Ok(())
    }
}

/// DEALER: sends each message and hands back the answer carrying the same `cache` id as
/// feedback; many at once.
pub struct DealerOut {
    socket: DealerSocket,
    codec: Arc<dyn Codec>,
    address: String,
}

impl std::fmt::Debug for DealerOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DealerOut")
            .field("address", &self.address)
            .finish()
    }
}

impl DealerOut {
    /// A DEALER service or connection.
    pub async fn dealer(endpoint: &Endpoint, codec: Arc<dyn Codec>) -> Result<Self, Error> {
        let mut socket = DealerSocket::new();
        let address = attach(&mut socket, endpoint).await?;
        Ok(DealerOut {
            socket,
            codec,
            address,
        })
    }

    /// The router component (register it blocking). A message without a `cache` id gets one.
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        let (mut sender, mut receiver) = self.socket.split();
        let pending: Arc<std::sync::Mutex<HashMap<String, rylm_core_router::Responder>>> =
            Arc::default();
        let answers = {
            let (pending, codec, address) =
                (pending.clone(), self.codec.clone(), self.address.clone());
            tokio::spawn(async move {
                while let Ok(received) = receiver.recv().await {
                    let answer = match codec.decode_frames(&received.into_vec()) {
                        Ok(answer) => answer,
                        Err(error) => {
                            tracing::warn!(%address, %error, "dropped an answer that does not decode");
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
                            tracing::debug!(%address, cache = %answer.cache, "an answer nobody waits for")
                        }
                    }
                }
            })
        };
        while let Some(delivery) = queue.recv().await {
            let (mut message, responder) = delivery.into_parts();
            if message.cache.is_empty() {
                message.cache = rylm_message::new_id();
            }
            let frames = match self.codec.encode_frames(&message) {
                Ok(frames) => frames,
                Err(error) => {
                    responder.send(Err(router_error(error.into())));
                    continue;
                }
            };
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(message.cache.clone(), responder);
            if let Err(error) = sender.send(multipart(frames)).await {
                let responder = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&message.cache);
                if let Some(responder) = responder {
                    responder.send(Err(router_error(Error::socket("send", &self.address)(
                        error,
                    ))));
                }
            }
        }
        answers.abort();
        Ok(())
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
/// when it is cleared. A new request connection
/// revokes every clearance, because it may be a per-call client whose new SUB is still on its
/// way while the one it replaces has closed. The request socket reads connection news ahead of
/// messages; zeromq sends that news a few instructions after it starts reading the connection,
/// the one window in which a request could overtake it (and a result then be lost only if the
/// new SUB's subscription were also still on its way). So a long-lived subscriber pays no latency, and a
/// per-call one at most once per call what it paid before. This relies on clients that open a new SUB opening a new
/// request connection with it, as pylm's client does and rylm's (which keeps both) does not need
/// to. The publisher's own new connections cannot serve instead: zeromq reports an accepted
/// connection after the peer's subscription may already have been read, and a subscription
/// read before its connection's news would be forgotten.
pub struct HeldPublisher {
    socket: zeromq::XPubSocket,
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
        codec: Arc<dyn Codec>,
        grace: std::time::Duration,
    ) -> Result<Self, Error> {
        let mut socket = zeromq::XPubSocket::new();
        let address = attach(&mut socket, endpoint).await?;
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
        if let Err(error) = self.socket.send(multipart(frames)).await {
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
                    let Ok(received) = received else { continue };
                    let Some(frame) = received.get(0) else { continue };
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
