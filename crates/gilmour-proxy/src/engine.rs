//! A Gilmour node on Redis: services that answer requests, slots that hear signals, requests,
//! signals and compositions. One subscriber connection carries every channel the node listens
//! on, responses included (the protocol allows it, and it saves the Go engine's
//! subscribe-per-request connections); one command connection publishes, counts subscribers and
//! takes locks. Both reconnect on their own, and the subscriber subscribes again to everything
//! it had.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use serde_json::Value;
use tokio::sync::{Semaphore, oneshot};

use crate::Error;
use crate::compose::{BoxFuture, Composition, Runner};
use crate::protocol::{self, Composed, Envelope, ErrorRecord, Step};

/// A request or signal as a handler gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The concrete topic it was sent on (for a wildcard slot, the topic that matched).
    pub topic: String,
    /// The sender's id: the request's response channel is `gilmour.response.<sender>`.
    pub sender: String,
    /// The data.
    pub data: Value,
}

/// A service's answer: data and code (0 is sent as 200, 300 and above are failures).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The reply's data.
    pub data: Value,
    /// The reply's code.
    pub code: i64,
}

impl Reply {
    /// A 200 with `data`.
    pub fn ok(data: Value) -> Self {
        Reply {
            data,
            code: protocol::OK,
        }
    }
}

type ServiceHandler = Arc<dyn Fn(Incoming) -> BoxFuture<'static, Reply> + Send + Sync>;
type SlotHandler = Arc<dyn Fn(Incoming) -> BoxFuture<'static, ()> + Send + Sync>;
/// A lambda of a composition run by a node: a local transform of a step's input.
pub type Lambda = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, String>> + Send + Sync>;

/// Makes a [`Lambda`] of an async closure.
pub fn lambda<F, Fut>(f: F) -> Lambda
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    Arc::new(move |data| Box::pin(f(data)))
}

/// A subscription this node made with [`Node::reply_to`] or [`Node::slot`] (and their `_with`
/// forms), to give to [`Node::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subscription(u64);

struct Service {
    id: u64,
    channel: String,
    group: String,
    timeout: Duration,
    handler: ServiceHandler,
}

struct Slot {
    id: u64,
    /// The channel, or the pattern.
    channel: String,
    pattern: bool,
    group: Option<String>,
    handler: SlotHandler,
}

/// How a node behaves.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// At most this many handlers (services and slots together) run at once; the others wait
    /// for a place before they even try their group's lock, so another node of the group can
    /// take the work. Default 64.
    pub concurrency: usize,
    /// Also publish error records on Go's `gilmour.errors`, besides `gilmour.error`.
    pub mirror_errors: bool,
    /// Also `LPUSH` error records to this list, trimmed to its newest 10,000.
    pub error_queue: Option<String>,
    /// Between two attempts to reconnect to Redis. Default 250 ms.
    pub reconnect_delay: Duration,
    /// The deadline of each Redis command. Default 5 s.
    pub command_timeout: Duration,
    /// Messages the subscriber connection may hold for the node's dispatcher before the oldest
    /// are lost (and a warning logged). Default 4096.
    pub message_buffer: usize,
    /// One pattern subscription, `gilmour.response.<node id>.*`, made once, receives the
    /// replies to every request of this node, whose senders are `<node id>.<n>`; a request then
    /// costs a subscriber count and a PUBLISH. Off, each request subscribes to its own response
    /// channel and leaves it after, with a uuid sender, command for command as the Go engine
    /// does. Either way any Gilmour responder answers: it publishes on
    /// `gilmour.response.<sender>`, whatever the sender. Default on.
    pub shared_responses: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            concurrency: 64,
            mirror_errors: false,
            error_queue: None,
            reconnect_delay: Duration::from_millis(250),
            command_timeout: Duration::from_secs(5),
            message_buffer: 4096,
            shared_responses: true,
        }
    }
}

/// How [`Node::request`] behaves; a bare `Duration` is a deadline with the defaults.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// The reply is waited for at most this long, then the answer is 499.
    pub deadline: Duration,
    /// Count the topic's subscribers first and answer 404 at once when there are none
    /// (default); off, a request nobody hears waits out its deadline.
    pub confirm_subscriber: bool,
}

impl From<Duration> for RequestOptions {
    fn from(deadline: Duration) -> Self {
        RequestOptions {
            deadline,
            confirm_subscriber: true,
        }
    }
}

struct State {
    /// Waiting requesters, by response channel.
    pending: Mutex<std::collections::HashMap<String, oneshot::Sender<Envelope>>>,
    services: Mutex<Vec<Arc<Service>>>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// This node's ident, once health is on.
    ident: Mutex<Option<String>>,
    next_id: AtomicU64,
    running: Arc<Semaphore>,
    options: NodeOptions,
    /// With shared responses: the node's id, the prefix of its requests' senders.
    responses: Option<String>,
    next_request: AtomicU64,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Gilmour node.
pub struct Node {
    commands: Client,
    subscriber: SubscriberClient,
    state: Arc<State>,
    dispatch: tokio::task::JoinHandle<()>,
    resubscribe: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

fn redis(what: &'static str) -> impl Fn(fred::error::Error) -> Error {
    move |error| Error::Redis {
        what,
        message: error.to_string(),
    }
}

impl Node {
    /// Connects to the Redis at `url` (`redis://[:password@]host:port/db`; a password is sent
    /// with AUTH) with the default [`NodeOptions`], within 10 s.
    pub async fn connect(url: &str) -> Result<Node, Error> {
        Node::connect_with(url, NodeOptions::default()).await
    }

    /// Connects to the Redis at `url` with `options`, within 10 s.
    pub async fn connect_with(url: &str, options: NodeOptions) -> Result<Node, Error> {
        let config = Config::from_url(url).map_err(redis("reading the Redis URL"))?;
        let mut builder = Builder::from_config(config);
        let delay = u32::try_from(options.reconnect_delay.as_millis()).unwrap_or(u32::MAX);
        builder
            .set_policy(ReconnectPolicy::new_constant(0, delay.max(1)))
            .with_performance_config(|p| {
                p.default_command_timeout = options.command_timeout;
                p.broadcast_channel_capacity = options.message_buffer.max(32);
            })
            .with_connection_config(|c| c.connection_timeout = CONNECT_DEADLINE);
        let commands = builder.build().map_err(redis("building a client"))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(redis("building a subscriber"))?;
        let late = || Error::Redis {
            what: "connecting",
            message: format!("no answer within {CONNECT_DEADLINE:?}"),
        };
        tokio::time::timeout(CONNECT_DEADLINE, commands.init())
            .await
            .map_err(|_| late())?
            .map_err(redis("connecting"))?;
        tokio::time::timeout(CONNECT_DEADLINE, subscriber.init())
            .await
            .map_err(|_| late())?
            .map_err(redis("connecting"))?;
        // Subscribes again to every channel and pattern after a reconnect.
        let resubscribe = subscriber.manage_subscriptions();
        let responses = options
            .shared_responses
            .then(|| uuid::Uuid::new_v4().simple().to_string());
        let state = Arc::new(State {
            pending: Mutex::default(),
            services: Mutex::default(),
            slots: Mutex::default(),
            ident: Mutex::default(),
            next_id: AtomicU64::new(1),
            responses,
            next_request: AtomicU64::new(0),
            running: Arc::new(Semaphore::new(options.concurrency.max(1))),
            options,
        });
        let dispatch = tokio::spawn(dispatch(
            subscriber.message_rx(),
            commands.clone(),
            state.clone(),
        ));
        let node = Node {
            commands,
            subscriber,
            state,
            dispatch,
            resubscribe,
        };
        if let Some(id) = &node.state.responses {
            let pattern = protocol::shared_response_pattern(id);
            if let Err(error) = node.listen(pattern, true).await {
                node.shutdown().await;
                return Err(error);
            }
        }
        Ok(node)
    }

    /// Answers requests on `topic` in exclusion group `group` (one node of a group answers each
    /// request), each within `timeout` (a reply of 499 after it). The handler's `Ok` is a 200,
    /// its `Err` a 500 with the text as data, a panic a 500 too.
    pub async fn reply_to<F, Fut>(
        &self,
        topic: &str,
        group: &str,
        timeout: Duration,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.reply_to_with(topic, group, timeout, move |incoming: Incoming| {
            let answer = handler(incoming.data);
            async move {
                match answer.await {
                    Ok(data) => Reply::ok(data),
                    Err(error) => Reply {
                        data: Value::from(error),
                        code: protocol::HANDLER_FAILED,
                    },
                }
            }
        })
        .await
    }

    /// [`Node::reply_to`] for a handler that sees the whole request (topic, sender) and sets
    /// the reply's code.
    pub async fn reply_to_with<F, Fut>(
        &self,
        topic: &str,
        group: &str,
        timeout: Duration,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let channel = protocol::request_channel(protocol::service_topic(topic)?);
        if group.is_empty() {
            return Err(Error::NoGroup(topic.to_owned()));
        }
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let service = Arc::new(Service {
            id,
            channel: channel.clone(),
            group: group.to_owned(),
            timeout,
            handler: Arc::new(move |incoming| Box::pin(handler(incoming))),
        });
        let first = {
            let mut services = locked(&self.state.services);
            if services
                .iter()
                .any(|s| s.channel == channel && s.group == group)
            {
                return Err(Error::AlreadyServed(topic.to_owned()));
            }
            let first = !services.iter().any(|s| s.channel == channel);
            services.push(service);
            first
        };
        if first && let Err(error) = self.listen(channel, false).await {
            locked(&self.state.services).retain(|s| s.id != id);
            return Err(error);
        }
        Ok(Subscription(id))
    }

    /// Runs `handler` with the concrete topic and the data of every signal on `topic`, a Redis
    /// glob pattern when it has a wildcard (`evt.*`). Without a group the slot runs in every
    /// node that has it; with one, the group's lock lets one node of the group run each signal.
    pub async fn slot<F, Fut>(
        &self,
        topic: &str,
        group: Option<&str>,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        F: Fn(String, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.slot_with(topic, group, move |incoming: Incoming| {
            handler(incoming.topic, incoming.data)
        })
        .await
    }

    /// [`Node::slot`] for a handler that sees the whole signal, its sender too.
    pub async fn slot_with<F, Fut>(
        &self,
        topic: &str,
        group: Option<&str>,
        handler: F,
    ) -> Result<Subscription, Error>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let channel = protocol::slot_channel(protocol::slot_topic(topic)?);
        let pattern = protocol::is_pattern(&channel);
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            id,
            channel: channel.clone(),
            pattern,
            group: group.filter(|g| !g.is_empty()).map(str::to_owned),
            handler: Arc::new(move |incoming| Box::pin(handler(incoming))),
        });
        let first = {
            let mut slots = locked(&self.state.slots);
            let first = !slots
                .iter()
                .any(|s| s.channel == channel && s.pattern == pattern);
            slots.push(slot);
            first
        };
        if first && let Err(error) = self.listen(channel, pattern).await {
            locked(&self.state.slots).retain(|s| s.id != id);
            return Err(error);
        }
        Ok(Subscription(id))
    }

    /// Stops a service or slot. Its channel is unsubscribed when nothing else of this node
    /// listens on it; handlers already running finish. Returns whether it was there.
    pub async fn remove(&self, subscription: Subscription) -> Result<bool, Error> {
        let id = subscription.0;
        let service = {
            let mut services = locked(&self.state.services);
            let found = services.iter().position(|s| s.id == id);
            found.map(|i| services.remove(i))
        };
        if let Some(service) = service {
            let last = !locked(&self.state.services)
                .iter()
                .any(|s| s.channel == service.channel);
            if last {
                self.unlisten(service.channel.clone(), false).await?;
                // Gone from Redis's count when this returns.
                self.confirm().await?;
            }
            return Ok(true);
        }
        let slot = {
            let mut slots = locked(&self.state.slots);
            let found = slots.iter().position(|s| s.id == id);
            found.map(|i| slots.remove(i))
        };
        let Some(slot) = slot else {
            return Ok(false);
        };
        let last = !locked(&self.state.slots)
            .iter()
            .any(|s| s.channel == slot.channel && s.pattern == slot.pattern);
        if last {
            self.unlisten(slot.channel.clone(), slot.pattern).await?;
            self.confirm().await?;
        }
        Ok(true)
    }

    /// The topics this node serves (not its health channel), sorted, once each.
    pub fn topics(&self) -> Vec<String> {
        served_topics(&self.state)
    }

    /// Joins the health registry: `HSET gilmour.known_host.health <ident> true`, and answers
    /// pings on `gilmour.health.<ident>` with the topics this node serves. Leaves it on
    /// [`Node::shutdown`]. Returns the ident (`<host>-pid-<pid>-uuid-<uuid>`).
    pub async fn enable_health(&self) -> Result<String, Error> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let ident = format!(
            "{host}-pid-{}-uuid-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        );
        let state = self.state.clone();
        self.reply_to(
            &protocol::health_channel(&ident),
            protocol::HEALTH_GROUP,
            CONNECT_DEADLINE,
            move |_| {
                let topics = served_topics(&state);
                async move { Ok(Value::from(topics)) }
            },
        )
        .await?;
        let _: i64 = self
            .commands
            .hset(protocol::HEALTH_HASH, (ident.as_str(), "true"))
            .await
            .map_err(redis("joining the health registry"))?;
        *locked(&self.state.ident) = Some(ident.clone());
        Ok(ident)
    }

    /// Publishes a signal on `topic`; nothing replies. Returns how many subscriptions received
    /// it: 0 means no slot heard it.
    pub async fn signal(&self, topic: &str, data: Value) -> Result<usize, Error> {
        let channel = protocol::slot_channel(protocol::service_topic(topic)?);
        let sender = uuid::Uuid::new_v4().to_string();
        let receivers: i64 = self
            .commands
            .publish(channel, Envelope::request(data, sender).encode())
            .await
            .map_err(redis("publishing"))?;
        Ok(usize::try_from(receivers).unwrap_or(0))
    }

    /// Sends `data` to `topic` and waits for the reply, at most the deadline (then code 499).
    /// Nobody subscribed to the topic is code 404 at once (unless the options say not to
    /// check). `options` is a [`RequestOptions`] or a bare deadline.
    pub async fn request(
        &self,
        topic: &str,
        data: Value,
        options: impl Into<RequestOptions>,
    ) -> Result<Envelope, Error> {
        let options = options.into();
        let channel = protocol::request_channel(protocol::service_topic(topic)?);
        if options.confirm_subscriber {
            let counts: Vec<(String, i64)> = self
                .commands
                .pubsub_numsub(channel.clone())
                .await
                .map_err(redis("counting subscribers"))?;
            if counts.iter().all(|(_, n)| *n == 0) {
                return Ok(Envelope {
                    data: Value::from(format!("no subscriber for {topic}")),
                    code: Some(protocol::NOT_FOUND),
                    sender: String::new(),
                });
            }
        }
        let shared = self.state.responses.as_deref();
        let sender = match shared {
            Some(id) => {
                protocol::shared_sender(id, self.state.next_request.fetch_add(1, Ordering::Relaxed))
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let response = protocol::response_channel(&sender);
        let (tx, rx) = oneshot::channel();
        locked(&self.state.pending).insert(response.clone(), tx);
        let outcome = async {
            if shared.is_none() {
                // Confirmed: the reply must not be published before Redis holds it.
                self.listen(response.clone(), false).await?;
            }
            let _: i64 = self
                .commands
                .publish(channel, Envelope::request(data, sender.clone()).encode())
                .await
                .map_err(redis("publishing"))?;
            Ok::<_, Error>(
                tokio::time::timeout(options.deadline, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| Envelope::timed_out(&sender)),
            )
        }
        .await;
        locked(&self.state.pending).remove(&response);
        if shared.is_none() {
            let _ = self.unlisten(response, false).await;
        }
        outcome
    }

    /// Runs `composition` on `input`: its request steps go to their services through this
    /// node (each waiting at most its own timeout, or `timeout`), its lambdas run here.
    pub async fn compose(
        &self,
        composition: &Composition<Lambda>,
        input: Value,
        timeout: Duration,
    ) -> Composed {
        composition.run(input, self, timeout).await
    }

    /// Subscribes to a channel (or a pattern), confirmed.
    async fn listen(&self, channel: String, pattern: bool) -> Result<(), Error> {
        let subscribed = if pattern {
            self.subscriber.psubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await
        };
        subscribed.map_err(redis("subscribing"))?;
        self.confirm().await
    }

    /// Unsubscribes from a channel (or a pattern), unconfirmed: see [`Node::confirm`].
    async fn unlisten(&self, channel: String, pattern: bool) -> Result<(), Error> {
        let left = if pattern {
            self.subscriber.punsubscribe(channel).await
        } else {
            self.subscriber.unsubscribe(channel).await
        };
        left.map_err(redis("unsubscribing"))
    }

    /// Returns once Redis has run every (un)subscription sent before on the subscriber
    /// connection. fred completes SUBSCRIBE when it is written, not when Redis confirms it; a
    /// PING behind it on the same connection is answered only after it, so that a request is
    /// published only once its response channel is really subscribed.
    async fn confirm(&self) -> Result<(), Error> {
        let _: fred::types::Value = self
            .subscriber
            .ping(None)
            .await
            .map_err(redis("confirming a subscription"))?;
        Ok(())
    }

    /// Waits until no handler of this node runs, at most `deadline`; whether none does.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let all = u32::try_from(self.state.options.concurrency.max(1)).unwrap_or(u32::MAX);
        tokio::time::timeout(deadline, self.state.running.acquire_many(all))
            .await
            .is_ok_and(|places| places.is_ok())
    }

    /// Leaves the health registry (when it joined), stops listening and closes both
    /// connections. Handlers already running keep going, but can no longer reply: see
    /// [`Node::drain`]. Calling it again does nothing.
    pub async fn shutdown(&self) {
        // Unsubscribes each channel and pattern, services before slots and the health channel
        // last, as the Go engine does, before leaving the registry.
        let services: Vec<Arc<Service>> = locked(&self.state.services).drain(..).collect();
        let slots: Vec<Arc<Slot>> = locked(&self.state.slots).drain(..).collect();
        let is_health = |channel: &str| channel.starts_with("gilmour.health.");
        let mut leaving: Vec<(String, bool)> = Vec::new();
        let in_order = services
            .iter()
            .filter(|s| !is_health(&s.channel))
            .map(|s| (s.channel.clone(), false))
            .chain(
                slots
                    .iter()
                    .filter(|s| !s.pattern)
                    .map(|s| (s.channel.clone(), false)),
            )
            .chain(
                slots
                    .iter()
                    .filter(|s| s.pattern)
                    .map(|s| (s.channel.clone(), true)),
            )
            .chain(
                self.state
                    .responses
                    .iter()
                    .map(|id| (protocol::shared_response_pattern(id), true)),
            )
            .chain(
                services
                    .iter()
                    .filter(|s| is_health(&s.channel))
                    .map(|s| (s.channel.clone(), false)),
            );
        for subscription in in_order {
            if !leaving.contains(&subscription) {
                leaving.push(subscription);
            }
        }
        for (channel, pattern) in leaving {
            let _ = self.unlisten(channel, pattern).await;
        }
        // Its unsubscriptions are done before the registry is left on the other connection.
        let _ = self.confirm().await;
        let ident = locked(&self.state.ident).take();
        if let Some(ident) = ident {
            let left: Result<i64, _> = self.commands.hdel(protocol::HEALTH_HASH, ident).await;
            if let Err(error) = left {
                tracing::warn!(%error, "could not leave the health registry");
            }
        }
        self.dispatch.abort();
        self.resubscribe.abort();
        let _ = tokio::time::timeout(CONNECT_DEADLINE, self.subscriber.quit()).await;
        let _ = tokio::time::timeout(CONNECT_DEADLINE, self.commands.quit()).await;
    }
}

impl Runner<Lambda> for Node {
    fn request<'a>(
        &'a self,
        topic: &'a str,
        data: Value,
        timeout: Duration,
    ) -> BoxFuture<'a, Step> {
        Box::pin(async move { step_of(Node::request(self, topic, data, timeout).await) })
    }

    fn lambda<'a>(&'a self, lambda: &'a Lambda, data: Value) -> BoxFuture<'a, Step> {
        Box::pin(async move {
            match tokio::spawn(lambda(data)).await {
                Ok(Ok(data)) => Step {
                    data,
                    code: protocol::OK,
                },
                Ok(Err(error)) => Step {
                    data: Value::from(error),
                    code: protocol::HANDLER_FAILED,
                },
                Err(panic) => Step {
                    data: Value::from(format!("the lambda panicked: {panic}")),
                    code: protocol::HANDLER_FAILED,
                },
            }
        })
    }
}

/// A request's outcome as a composition's step: the reply, or a failure to send it as a 500.
pub fn step_of(outcome: Result<Envelope, Error>) -> Step {
    match outcome {
        Ok(reply) => Step {
            code: reply.code(),
            data: reply.data,
        },
        Err(error) => Step {
            data: Value::from(error.to_string()),
            code: protocol::HANDLER_FAILED,
        },
    }
}

fn served_topics(state: &State) -> Vec<String> {
    let mut topics: Vec<String> = locked(&state.services)
        .iter()
        .filter(|s| s.channel.starts_with("gilmour.request."))
        .map(|s| protocol::topic_of(&s.channel).to_owned())
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

/// Hands each message to its requester, its services or its slots; never stops on bad input.
async fn dispatch(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    commands: Client,
    state: Arc<State>,
) {
    loop {
        let message = match messages.recv().await {
            Ok(message) => message,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "the subscriber fell behind; messages were lost");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let channel = message.channel.to_string();
        let envelope = Envelope::decode(message.value.as_bytes().unwrap_or_default());
        if channel.starts_with("gilmour.response.") {
            let waiting = locked(&state.pending).remove(&channel);
            if let Some(waiting) = waiting {
                let _ = waiting.send(envelope);
            }
            continue;
        }
        if channel.starts_with("gilmour.slot.") {
            // A pattern's delivery goes to the pattern slots it matches, a channel's to the
            // slots of that channel: Redis delivers once for each way a node subscribed.
            let by_pattern = matches!(message.kind, fred::types::MessageKind::PMessage);
            let slots: Vec<Arc<Slot>> = locked(&state.slots)
                .iter()
                .filter(|slot| {
                    slot.pattern == by_pattern
                        && if by_pattern {
                            protocol::glob_match(&slot.channel, &channel)
                        } else {
                            slot.channel == channel
                        }
                })
                .cloned()
                .collect();
            for slot in slots {
                tokio::spawn(run_slot(
                    commands.clone(),
                    state.running.clone(),
                    slot,
                    channel.clone(),
                    envelope.clone(),
                ));
            }
            continue;
        }
        let services: Vec<Arc<Service>> = locked(&state.services)
            .iter()
            .filter(|s| s.channel == channel)
            .cloned()
            .collect();
        for service in services {
            tokio::spawn(serve(
                commands.clone(),
                state.clone(),
                service,
                envelope.clone(),
            ));
        }
    }
}

/// Takes the lock of `group` for the message from `sender`: whether this node runs it.
async fn lock(commands: &Client, sender: &str, group: &str) -> bool {
    let key = protocol::lock_key(sender, group);
    // Word for word the engines' `SET <key> <key> NX EX 600` (fred's `set` orders the
    // options `EX 600 NX`, the same to Redis but not the same command on the wire).
    let set =
        fred::types::CustomCommand::new_static("SET", fred::types::ClusterHash::FirstKey, false);
    let won: Result<Option<String>, _> = commands
        .custom(
            set,
            vec![
                key.clone(),
                key,
                "NX".to_owned(),
                "EX".to_owned(),
                protocol::LOCK_SECONDS.to_string(),
            ],
        )
        .await;
    match won {
        Ok(won) => won.is_some(),
        Err(error) => {
            tracing::warn!(%error, "could not take the group's lock; leaving the message to others");
            false
        }
    }
}

/// Runs a slot for one signal, once there is room, after its group's lock when it has a group.
async fn run_slot(
    commands: Client,
    running: Arc<Semaphore>,
    slot: Arc<Slot>,
    channel: String,
    signal: Envelope,
) {
    let Ok(_place) = running.acquire_owned().await else {
        return;
    };
    if let Some(group) = &slot.group {
        if signal.sender.is_empty() {
            tracing::warn!("dropped a signal without a sender: its group cannot lock it");
            return;
        }
        if !lock(&commands, &signal.sender, group).await {
            return;
        }
    }
    let incoming = Incoming {
        topic: protocol::topic_of(&channel).to_owned(),
        sender: signal.sender,
        data: signal.data,
    };
    if let Err(panic) = tokio::spawn((slot.handler)(incoming)).await {
        tracing::warn!(%panic, channel = %channel, "a slot's handler panicked");
    }
}

/// Takes the group's lock for one request once there is room and, when this node wins it,
/// answers; a failing answer is also published as an error record.
async fn serve(commands: Client, state: Arc<State>, service: Arc<Service>, request: Envelope) {
    if request.sender.is_empty() {
        tracing::warn!("dropped a request without a sender: nobody to answer");
        return;
    }
    let Ok(_place) = state.running.clone().acquire_owned().await else {
        return;
    };
    if !lock(&commands, &request.sender, &service.group).await {
        return;
    }
    let topic = protocol::topic_of(&service.channel).to_owned();
    let handler = (service.handler)(Incoming {
        topic: topic.clone(),
        sender: request.sender.clone(),
        data: request.data.clone(),
    });
    // A handler past its timeout is stopped, not left running unseen.
    let task = tokio::spawn(handler);
    let abort = task.abort_handle();
    let reply = match tokio::time::timeout(service.timeout, task).await {
        Ok(Ok(reply)) => Envelope::reply(reply.data, reply.code, &request.sender),
        Ok(Err(panic)) => Envelope::reply(
            Value::from(format!("the handler panicked: {panic}")),
            protocol::HANDLER_FAILED,
            &request.sender,
        ),
        Err(_) => {
            abort.abort();
            Envelope::timed_out(&request.sender)
        }
    };
    let published: Result<i64, _> = commands
        .publish(protocol::response_channel(&request.sender), reply.encode())
        .await;
    if let Err(error) = published {
        tracing::warn!(%error, "could not publish a reply");
    }
    if reply.failed() && !service.channel.starts_with("gilmour.health.") {
        report(&commands, &state.options, &topic, &request, &reply).await;
    }
}

/// Publishes the error record of a failing reply on `gilmour.error` (and the mirror and the
/// list when the options say so).
async fn report(
    commands: &Client,
    options: &NodeOptions,
    topic: &str,
    request: &Envelope,
    reply: &Envelope,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let record = ErrorRecord::of(topic, request, reply, now);
    let payload = record.envelope().encode();
    let mut channels = vec![protocol::ERROR_CHANNEL];
    if options.mirror_errors {
        channels.push(protocol::GO_ERROR_CHANNEL);
    }
    for channel in channels {
        let published: Result<i64, _> = commands.publish(channel, payload.clone()).await;
        if let Err(error) = published {
            tracing::warn!(%error, "could not publish an error record");
        }
    }
    if let Some(queue) = &options.error_queue {
        let pushed: Result<i64, _> = commands.lpush(queue.as_str(), payload).await;
        let trimmed: Result<(), _> = commands.ltrim(queue.as_str(), 0, 9_999).await;
        if let Err(error) = pushed.map(drop).and(trimmed) {
            tracing::warn!(%error, "could not queue an error record");
        }
    }
}
