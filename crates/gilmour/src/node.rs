//! A Gilmour node on Redis: services that answer requests, slots that hear signals, requests,
//! signals and compositions. One subscriber connection carries every channel the node listens
//! on, responses included (the protocol allows it, and it saves the Go engine's
//! subscribe-per-request connections); one command connection publishes, counts subscribers and
//! takes locks. Both reconnect on their own, and the subscriber subscribes again to everything
//! it had.

use rylm_message::trace::Hop;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tracing::Instrument;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Error;
use crate::compose::{BoxFuture, Composition, Runner};
use crate::protocol::{self, Composed, Envelope, Step};
use crate::serve::{self, Service, Slot, State, locked};

pub use crate::serve::NodeCounters;

/// A request or signal as a handler gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The concrete topic it was sent on (for a wildcard slot, the topic that matched).
    pub topic: String,
    /// The sender's id: the request's response channel is `gilmour.response.<sender>`.
    pub sender: String,
    /// The data.
    pub data: Value,
    /// W3C trace context of this handler's span, when the request or signal was traced (to
    /// pass on to what the handler calls).
    pub traceparent: Option<String>,
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

/// How a node behaves.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// At most this many handlers (services and slots together) run at once; the others wait
    /// for a place before they even try their group's lock, so another node of the group can
    /// take the work. Default 64.
    pub concurrency: usize,
    /// At most this many handlers wait for a place to run; past that a request is answered
    /// `503 busy` (counted in [`Node::counters`]) and a signal waits. Default 1024.
    pub max_queued: usize,
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
    /// One pattern subscription, `gilmour.response.<prefix>-*`, made once, receives the
    /// replies to every request of this node, whose senders are the node's prefix and a random
    /// rest, shaped as uuids (see [`protocol::shared_sender`]); a request then
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
            max_queued: 1024,
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
    /// Answer 404 at once when nobody subscribes to the topic (default): the subscribers are
    /// counted first (`PUBSUB NUMSUB`, on every primary of a cluster), or, with shared responses
    /// on one server, the count PUBLISH returns says it. Off, a request nobody hears waits out
    /// its deadline.
    pub confirm_subscriber: bool,
    /// The caller's W3C trace context, continued by the request's span; a new trace when
    /// `None` (default).
    pub traceparent: Option<String>,
}

impl From<Duration> for RequestOptions {
    fn from(deadline: Duration) -> Self {
        RequestOptions {
            deadline,
            confirm_subscriber: true,
            traceparent: None,
        }
    }
}

/// A Gilmour node. Dropping it stops it as [`Node::shutdown`] does, in the background.
pub struct Node {
    commands: Client,
    subscriber: SubscriberClient,
    state: Arc<State>,
    /// The dispatcher, the refuser, the resubscriber and the health keeper.
    tasks: Vec<tokio::task::AbortHandle>,
    stopped: AtomicBool,
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
        let sentinels = match &config.server {
            fred::types::config::ServerConfig::Sentinel {
                hosts,
                service_name,
                ..
            } => Some((hosts.clone(), service_name.clone())),
            _ => None,
        };
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
            .then(|| protocol::node_prefix(&uuid::Uuid::new_v4().to_string()));
        let state = Arc::new(State {
            pending: std::sync::Mutex::default(),
            services: std::sync::Mutex::default(),
            slots: std::sync::Mutex::default(),
            ident: std::sync::Mutex::default(),
            next_id: AtomicU64::new(1),
            responses,
            running: Arc::new(Semaphore::new(options.concurrency.max(1))),
            queued: Arc::new(Semaphore::new(options.max_queued.max(1))),
            turn: AtomicUsize::new(0),
            changes: tokio::sync::Mutex::new(()),
            counters: NodeCounters::default(),
            options,
        });
        let (refusals, refused) = mpsc::channel(state.options.max_queued.max(1));
        let dispatch = tokio::spawn(serve::dispatch(
            subscriber.message_rx(),
            commands.clone(),
            state.clone(),
            refusals,
        ));
        let refuse = tokio::spawn(serve::refuse(refused, commands.clone(), state.clone()));
        let health = tokio::spawn(keep_health(commands.clone(), state.clone()));
        let mut tasks = vec![
            dispatch.abort_handle(),
            refuse.abort_handle(),
            resubscribe.abort_handle(),
            health.abort_handle(),
        ];
        if let Some((hosts, service)) = sentinels {
            let follow = tokio::spawn(crate::sentinel::follow(
                hosts,
                service,
                commands.clone(),
                subscriber.clone(),
                state.options.reconnect_delay,
            ));
            tasks.push(follow.abort_handle());
        }
        let node = Node {
            commands,
            subscriber,
            state,
            tasks,
            stopped: AtomicBool::new(false),
        };
        if let Some(prefix) = &node.state.responses {
            let pattern = protocol::shared_response_pattern(prefix);
            if let Err(error) = node.listen(pattern, true).await {
                node.shutdown().await;
                return Err(error);
            }
        }
        Ok(node)
    }

    /// Answers requests on `topic` in exclusion group `group` (one node of a group answers each
    /// request), each within `timeout` (a reply of 499 after it). The handler's `Ok` is a 200,
    /// its `Err` a 500 with the text as data, a panic a 500 too. Several handlers of this node
    /// in one group take turns, behind one lock: what a proxy's HTTP nodes need.
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
        let _changing = self.state.changes.lock().await;
        let first = {
            let mut services = locked(&self.state.services);
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
        let _changing = self.state.changes.lock().await;
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
        let _changing = self.state.changes.lock().await;
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
                // Gone from Redis's count when this returns; still there when it fails.
                let left = self.unlisten(service.channel.clone(), false).await;
                if let Err(error) = left.and(self.confirm().await) {
                    locked(&self.state.services).push(service);
                    return Err(error);
                }
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
            let left = self.unlisten(slot.channel.clone(), slot.pattern).await;
            if let Err(error) = left.and(self.confirm().await) {
                locked(&self.state.slots).push(slot);
                return Err(error);
            }
        }
        Ok(true)
    }

    /// The topics this node serves (not its health channel), sorted, once each.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = locked(&self.state.services)
            .iter()
            .filter(|s| s.channel.starts_with("gilmour.request."))
            .map(|s| protocol::topic_of(&s.channel).to_owned())
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// The full channel names this node listens on for requests and signals, sorted: what it
    /// answers a health ping with, as the engines do (`["gilmour.request.echo",
    /// "gilmour.slot.events.*"]`).
    pub fn channels(&self) -> Vec<String> {
        serve::channels(&self.state)
    }

    /// What this node has refused or dropped since it started.
    pub fn counters(&self) -> &NodeCounters {
        &self.state.counters
    }

    /// The nodes in the health registry (`gilmour.known_host.health`): each ident and its
    /// value (`true` from Go and rylm, `active` from Ruby), sorted by ident. Ping one with a
    /// request to [`protocol::health_channel`], as the engines' monitors do.
    pub async fn known_nodes(&self) -> Result<Vec<(String, String)>, Error> {
        let known: std::collections::HashMap<String, String> = self
            .commands
            .hgetall(protocol::HEALTH_HASH)
            .await
            .map_err(redis("reading the health registry"))?;
        let mut known: Vec<(String, String)> = known.into_iter().collect();
        known.sort();
        Ok(known)
    }

    /// Whether both of the node's Redis connections are up now.
    pub fn is_connected(&self) -> bool {
        self.commands.is_connected() && self.subscriber.is_connected()
    }

    /// Requests of this node waiting for their reply, now.
    pub fn pending(&self) -> usize {
        locked(&self.state.pending).len()
    }

    /// Handlers waiting for a place to run, now.
    pub fn queued(&self) -> usize {
        self.state.options.max_queued.max(1) - self.state.queued.available_permits()
    }

    /// Joins the health registry: `HSET gilmour.known_host.health <ident> true`, and answers
    /// pings on `gilmour.health.<ident>` with the full channel names of its services and slots
    /// ([`Node::channels`]). The registration is made again whenever the command connection
    /// reconnects (a Redis restarted without its data has forgotten it). Leaves it on
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
        let state = Arc::downgrade(&self.state);
        self.reply_to(
            &protocol::health_channel(&ident),
            protocol::HEALTH_GROUP,
            CONNECT_DEADLINE,
            move |_| {
                let channels = state
                    .upgrade()
                    .map(|state| serve::channels(&state))
                    .unwrap_or_default();
                async move { Ok(Value::from(channels)) }
            },
        )
        .await?;
        *locked(&self.state.ident) = Some(ident.clone());
        let _: i64 = self
            .commands
            .hset(protocol::HEALTH_HASH, (ident.as_str(), "true"))
            .await
            .map_err(redis("joining the health registry"))?;
        Ok(ident)
    }

    /// Publishes a signal on `topic`; nothing replies. Returns how many subscriptions received
    /// it: 0 means no slot heard it.
    pub async fn signal(&self, topic: &str, data: Value) -> Result<usize, Error> {
        self.signal_traced(topic, data, None).await
    }

    /// [`Node::signal`] continuing the caller's W3C trace context `traceparent` (a new trace
    /// when `None`) under a span `rylm.gilmour.signal`.
    pub async fn signal_traced(
        &self,
        topic: &str,
        data: Value,
        traceparent: Option<&str>,
    ) -> Result<usize, Error> {
        let channel = protocol::slot_channel(protocol::service_topic(topic)?);
        let sender = uuid::Uuid::new_v4().to_string();
        let hop = Hop::continue_from(traceparent);
        let envelope = Envelope {
            traceparent: Some(hop.traceparent()),
            ..Envelope::request(data, sender)
        };
        let receivers: i64 = self
            .commands
            .publish(channel, envelope.encode())
            .instrument(hop.span("rylm.gilmour.signal"))
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
        let hop = Hop::continue_from(options.traceparent.as_deref());
        self.request_now(topic, data, options, hop)
            .instrument(hop.span("rylm.gilmour.request"))
            .await
    }

    async fn request_now(
        &self,
        topic: &str,
        data: Value,
        options: RequestOptions,
        hop: Hop,
    ) -> Result<Envelope, Error> {
        let channel = protocol::request_channel(protocol::service_topic(topic)?);
        let nobody = || Envelope {
            data: Value::from(format!("no subscriber for {topic}")),
            code: Some(protocol::NOT_FOUND),
            sender: String::new(),
            traceparent: None,
        };
        // With shared responses on one server, PUBLISH's own count of receivers says whether
        // anybody listens, a round trip fewer; otherwise the subscribers are counted first, as
        // the engines do (and, on a cluster, on every primary).
        let counted_by_publish = self.state.responses.is_some() && !self.commands.is_clustered();
        if options.confirm_subscriber
            && !counted_by_publish
            && self.subscribers(&channel).await? == 0
        {
            return Ok(nobody());
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        let shared = self.state.responses.as_deref();
        let sender = match shared {
            Some(prefix) => protocol::shared_sender(prefix, &fresh),
            None => fresh,
        };
        let response = protocol::response_channel(&sender);
        let (tx, rx) = oneshot::channel();
        // Frees the pending entry (and the response subscription) however this ends: answered,
        // timed out, failed, or dropped by a caller that stopped waiting.
        let mut waiting = Waiting {
            node: self,
            response: response.clone(),
            subscribed: shared.is_none(),
            done: false,
        };
        locked(&self.state.pending).insert(response.clone(), tx);
        let outcome = async {
            if shared.is_none() {
                // Confirmed: the reply must not be published before Redis holds it.
                self.listen(response.clone(), false).await?;
            }
            let envelope = Envelope {
                traceparent: Some(hop.traceparent()),
                ..Envelope::request(data, sender.clone())
            };
            let receivers: i64 = self
                .commands
                .publish(channel, envelope.encode())
                .await
                .map_err(redis("publishing"))?;
            if options.confirm_subscriber && counted_by_publish && receivers == 0 {
                return Ok(nobody());
            }
            Ok::<_, Error>(
                tokio::time::timeout(options.deadline, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| Envelope::timed_out(&sender)),
            )
        }
        .await;
        waiting.finish().await;
        outcome
    }

    /// How many subscribers `channel` has. On a cluster, Redis counts those of the node asked
    /// only, so every primary is asked and the counts added.
    async fn subscribers(&self, channel: &str) -> Result<i64, Error> {
        let count = |counts: Vec<(String, i64)>| counts.iter().map(|(_, n)| *n).sum::<i64>();
        if !self.commands.is_clustered() {
            let counts: Vec<(String, i64)> = self
                .commands
                .pubsub_numsub(channel)
                .await
                .map_err(redis("counting subscribers"))?;
            return Ok(count(counts));
        }
        let primaries = self
            .commands
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        let mut total = 0;
        for primary in primaries {
            let counts: Vec<(String, i64)> = self
                .commands
                .with_cluster_node(primary)
                .pubsub_numsub(channel)
                .await
                .map_err(redis("counting subscribers"))?;
            total += count(counts);
        }
        Ok(total)
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
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
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
                    .map(|prefix| (protocol::shared_response_pattern(prefix), true)),
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
        self.stopped.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
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

impl Drop for Node {
    /// Stops the node's tasks and, in the background, leaves the health registry and closes
    /// both connections (Redis then forgets every subscription of the node).
    fn drop(&mut self) {
        if self.stopped.swap(true, Ordering::Relaxed) {
            return;
        }
        for task in &self.tasks {
            task.abort();
        }
        let ident = locked(&self.state.ident).take();
        let commands = self.commands.clone();
        let subscriber = self.subscriber.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some(ident) = ident {
                    let _ = tokio::time::timeout(
                        CONNECT_DEADLINE,
                        commands.hdel::<i64, _, _>(protocol::HEALTH_HASH, ident),
                    )
                    .await;
                }
                let _ = tokio::time::timeout(CONNECT_DEADLINE, subscriber.quit()).await;
                let _ = tokio::time::timeout(CONNECT_DEADLINE, commands.quit()).await;
            });
        }
    }
}

/// A request's pending entry (and, without shared responses, its response subscription):
/// freed by [`Waiting::finish`], or on drop when the request is cancelled.
struct Waiting<'a> {
    node: &'a Node,
    response: String,
    subscribed: bool,
    done: bool,
}

impl Waiting<'_> {
    async fn finish(&mut self) {
        self.done = true;
        locked(&self.node.state.pending).remove(&self.response);
        if self.subscribed {
            let _ = self.node.unlisten(self.response.clone(), false).await;
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        locked(&self.node.state.pending).remove(&self.response);
        if self.subscribed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let subscriber = self.node.subscriber.clone();
            let response = std::mem::take(&mut self.response);
            runtime.spawn(async move {
                let _ = subscriber.unsubscribe(response).await;
            });
        }
    }
}

/// Joins the health registry again after every reconnect of the command connection, once the
/// node has joined it.
async fn keep_health(commands: Client, state: Arc<State>) {
    let mut reconnects = commands.reconnect_rx();
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
        let ident = locked(&state.ident).clone();
        if let Some(ident) = ident {
            let joined: Result<i64, _> = commands
                .hset(protocol::HEALTH_HASH, (ident.as_str(), "true"))
                .await;
            match joined {
                Ok(_) => {
                    tracing::info!(%ident, "joined the health registry again after a reconnect")
                }
                Err(error) => tracing::warn!(%error, "could not join the health registry again"),
            }
        }
    }
}
