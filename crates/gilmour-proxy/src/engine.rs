//! A Gilmour node on Redis: services that answer requests, and requests to them. One
//! subscriber connection carries every channel the node listens on, responses included (the
//! protocol allows it, and it saves the Go engine's subscribe-per-request connections); one
//! command connection publishes, counts subscribers and takes locks.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::Error;
use crate::protocol::{self, Envelope};

/// What a service's handler returns: the reply's data, or an error answered with code 500.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;
type Handler = Arc<dyn Fn(Value) -> HandlerFuture + Send + Sync>;

struct Service {
    group: String,
    timeout: Duration,
    handler: Handler,
}

#[derive(Default)]
struct State {
    /// Waiting requesters, by response channel.
    pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    /// Services, by request channel.
    services: Mutex<HashMap<String, Arc<Service>>>,
    /// Slots: by channel, or by pattern for the ones with a wildcard.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// This node's ident, once health is on.
    ident: Mutex<Option<String>>,
}

/// What a slot's handler gets: the concrete topic the signal came on, and its data.
pub type SlotFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type SlotHandler = Arc<dyn Fn(String, Value) -> SlotFuture + Send + Sync>;

struct Slot {
    /// The channel, or the pattern.
    channel: String,
    pattern: bool,
    group: Option<String>,
    handler: SlotHandler,
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
    /// Connects to the Redis at `url` (`redis://host:port/db`), within 10 s.
    pub async fn connect(url: &str) -> Result<Node, Error> {
        let config = Config::from_url(url).map_err(redis("reading the Redis URL"))?;
        let builder = Builder::from_config(config);
        let commands = builder.build().map_err(redis("building a client"))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(redis("building a subscriber"))?;
        let late = || Error::Redis {
            what: "connecting",
            message: format!("no answer from {url} within {CONNECT_DEADLINE:?}"),
        };
        tokio::time::timeout(CONNECT_DEADLINE, commands.init())
            .await
            .map_err(|_| late())?
            .map_err(redis("connecting"))?;
        tokio::time::timeout(CONNECT_DEADLINE, subscriber.init())
            .await
            .map_err(|_| late())?
            .map_err(redis("connecting"))?;
        // Resubscribes every channel after a reconnect.
        let resubscribe = subscriber.manage_subscriptions();
        let state = Arc::new(State::default());
        let dispatch = tokio::spawn(dispatch(
            subscriber.message_rx(),
            commands.clone(),
            state.clone(),
        ));
        Ok(Node {
            commands,
            subscriber,
            state,
            dispatch,
            resubscribe,
        })
    }

    /// Answers requests on `topic` in exclusion group `group` (one node of a group answers each
    /// request), each within `timeout` (a reply of 499 after it).
    pub async fn reply_to<F, Fut>(
        &self,
        topic: &str,
        group: &str,
        timeout: Duration,
        handler: F,
    ) -> Result<(), Error>
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        let channel = protocol::request_channel(protocol::service_topic(topic)?);
        let service = Arc::new(Service {
            group: group.to_owned(),
            timeout,
            handler: Arc::new(move |data| Box::pin(handler(data))),
        });
        {
            let mut services = self
                .state
                .services
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if services.contains_key(&channel) {
                return Err(Error::AlreadyServed(topic.to_owned()));
            }
            services.insert(channel.clone(), service);
        }
        self.subscriber
            .subscribe(channel)
            .await
            .map_err(redis("subscribing"))
    }

    /// Runs `handler` for every signal on `topic`, a Redis glob pattern when it has a wildcard
    /// (`evt.*`). Without a group the slot runs in every node that has it; with one, the
    /// group's lock lets one node of the group run each signal.
    pub async fn slot<F, Fut>(
        &self,
        topic: &str,
        group: Option<&str>,
        handler: F,
    ) -> Result<(), Error>
    where
        F: Fn(String, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let channel = protocol::slot_channel(protocol::slot_topic(topic)?);
        let pattern = protocol::is_pattern(&channel);
        let slot = Arc::new(Slot {
            channel: channel.clone(),
            pattern,
            group: group.map(str::to_owned),
            handler: Arc::new(move |topic, data| Box::pin(handler(topic, data))),
        });
        self.state
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot);
        let subscribed = if pattern {
            self.subscriber.psubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await
        };
        subscribed.map_err(redis("subscribing"))
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
                let state = state.clone();
                async move {
                    let mut topics: Vec<String> = state
                        .services
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .keys()
                        .filter(|c| c.starts_with("gilmour.request."))
                        .map(|c| protocol::topic_of(c).to_owned())
                        .collect();
                    topics.sort();
                    Ok(Value::from(topics))
                }
            },
        )
        .await?;
        let _: i64 = self
            .commands
            .hset(protocol::HEALTH_HASH, (ident.as_str(), "true"))
            .await
            .map_err(redis("joining the health registry"))?;
        *self.state.ident.lock().unwrap_or_else(|e| e.into_inner()) = Some(ident.clone());
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

    /// Sends `data` to `topic` and waits for the reply, at most `deadline` (then code 499).
    /// Nobody subscribed to the topic is code 404 at once.
    pub async fn request(
        &self,
        topic: &str,
        data: Value,
        deadline: Duration,
    ) -> Result<Envelope, Error> {
        let channel = protocol::request_channel(protocol::service_topic(topic)?);
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
        let sender = uuid::Uuid::new_v4().to_string();
        let response = protocol::response_channel(&sender);
        let (tx, rx) = oneshot::channel();
        self.state
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(response.clone(), tx);
        let outcome = async {
            self.subscriber
                .subscribe(response.clone())
                .await
                .map_err(redis("subscribing"))?;
            let _: i64 = self
                .commands
                .publish(channel, Envelope::request(data, sender.clone()).encode())
                .await
                .map_err(redis("publishing"))?;
            Ok::<_, Error>(
                tokio::time::timeout(deadline, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| Envelope::timed_out(&sender)),
            )
        }
        .await;
        self.state
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&response);
        let _ = self.subscriber.unsubscribe(response).await;
        outcome
    }

    /// Leaves the health registry (when it joined), stops listening and closes both
    /// connections.
    pub async fn shutdown(self) {
        let ident = self
            .state
            .ident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(ident) = ident {
            let left: Result<i64, _> = self.commands.hdel(protocol::HEALTH_HASH, ident).await;
            if let Err(error) = left {
                tracing::warn!(%error, "could not leave the health registry");
            }
        }
        self.dispatch.abort();
        self.resubscribe.abort();
        let _ = self.subscriber.quit().await;
        let _ = self.commands.quit().await;
    }
}

/// Hands each message to its requester or its service; never stops on bad input.
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
            let waiting = state
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&channel);
            if let Some(waiting) = waiting {
                let _ = waiting.send(envelope);
            }
            continue;
        }
        if channel.starts_with("gilmour.slot.") {
            // A pattern's delivery goes to the pattern slots it matches, a channel's to the
            // slots of that channel: Redis delivers once for each way a node subscribed.
            let by_pattern = matches!(message.kind, fred::types::MessageKind::PMessage);
            let slots: Vec<Arc<Slot>> = state
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
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
                    slot,
                    channel.clone(),
                    envelope.clone(),
                ));
            }
            continue;
        }
        let service = state
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&channel)
            .cloned();
        if let Some(service) = service {
            tokio::spawn(serve(commands.clone(), service, envelope));
        }
    }
}

/// Takes the lock of `group` for the message from `sender`: whether this node runs it.
async fn lock(commands: &Client, sender: &str, group: &str) -> bool {
    let key = protocol::lock_key(sender, group);
    let won: Result<Option<String>, _> = commands
        .set(
            &key,
            key.as_str(),
            Some(Expiration::EX(protocol::LOCK_SECONDS as i64)),
            Some(SetOptions::NX),
            false,
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

/// Runs a slot for one signal, after its group's lock when it has a group.
async fn run_slot(commands: Client, slot: Arc<Slot>, channel: String, signal: Envelope) {
    if let Some(group) = &slot.group {
        if signal.sender.is_empty() {
            tracing::warn!("dropped a signal without a sender: its group cannot lock it");
            return;
        }
        if !lock(&commands, &signal.sender, group).await {
            return;
        }
    }
    let topic = protocol::topic_of(&channel).to_owned();
    if let Err(panic) = tokio::spawn((slot.handler)(topic, signal.data)).await {
        tracing::warn!(%panic, channel = %channel, "a slot's handler panicked");
    }
}

/// Takes the group's lock for one request and, when this node wins it, answers.
async fn serve(commands: Client, service: Arc<Service>, request: Envelope) {
    if request.sender.is_empty() {
        tracing::warn!("dropped a request without a sender: nobody to answer");
        return;
    }
    if !lock(&commands, &request.sender, &service.group).await {
        return;
    }
    let handler = (service.handler)(request.data);
    let reply = match tokio::time::timeout(service.timeout, tokio::spawn(handler)).await {
        Ok(Ok(Ok(data))) => Envelope::reply(data, protocol::OK, &request.sender),
        Ok(Ok(Err(error))) => Envelope::reply(
            Value::from(error),
            protocol::HANDLER_FAILED,
            &request.sender,
        ),
        Ok(Err(panic)) => Envelope::reply(
            Value::from(format!("the handler panicked: {panic}")),
            protocol::HANDLER_FAILED,
            &request.sender,
        ),
        Err(_) => Envelope::timed_out(&request.sender),
    };
    let published: Result<i64, _> = commands
        .publish(protocol::response_channel(&request.sender), reply.encode())
        .await;
    if let Err(error) = published {
        tracing::warn!(%error, "could not publish a reply");
    }
}
