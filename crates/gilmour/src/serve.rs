//! How a node handles what its subscriber connection receives: replies go to their waiting
//! requesters, requests to one service per exclusion group, signals to their slots. Work is
//! bounded twice: at most `concurrency` handlers run, at most `max_queued` wait for a place.
//! Past that a request is answered `503 busy` (after its group's lock, so that it is never
//! answered twice) by the refusing task, and a signal waits for a place. Either way the
//! dispatcher waits when the refusals queue is full too: messages then stay in the subscriber
//! connection's buffer (`message_buffer`), and only past that are they lost, counted as
//! `lagged`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use fred::clients::Client;
use fred::prelude::*;
use fred::types::Message;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::compose::BoxFuture;
use crate::node::{Incoming, NodeOptions, Reply};
use crate::protocol::{self, Envelope, ErrorRecord};

pub(crate) type ServiceHandler = Arc<dyn Fn(Incoming) -> BoxFuture<'static, Reply> + Send + Sync>;
pub(crate) type SlotHandler = Arc<dyn Fn(Incoming) -> BoxFuture<'static, ()> + Send + Sync>;

pub(crate) struct Service {
    pub(crate) id: u64,
    pub(crate) channel: String,
    pub(crate) group: String,
    pub(crate) timeout: Duration,
    pub(crate) handler: ServiceHandler,
}

pub(crate) struct Slot {
    pub(crate) id: u64,
    /// The channel, or the pattern.
    pub(crate) channel: String,
    pub(crate) pattern: bool,
    pub(crate) group: Option<String>,
    pub(crate) handler: SlotHandler,
}

/// What a node has dropped or refused, since it started.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Requests answered `503 busy` because every queue place was taken.
    pub busy: AtomicU64,
    /// Requests and grouped signals dropped because they carried no sender (nobody to answer,
    /// no lock to take).
    pub dropped: AtomicU64,
    /// Messages lost because the subscriber connection's buffer overflowed.
    pub lagged: AtomicU64,
}

pub(crate) struct State {
    /// Waiting requesters, by response channel.
    pub(crate) pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    pub(crate) services: Mutex<Vec<Arc<Service>>>,
    pub(crate) slots: Mutex<Vec<Arc<Slot>>>,
    /// This node's ident, once health is on.
    pub(crate) ident: Mutex<Option<String>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) running: Arc<Semaphore>,
    pub(crate) queued: Arc<Semaphore>,
    pub(crate) turn: AtomicUsize,
    /// Held while a subscription is added or removed, so that the decision to (un)subscribe a
    /// channel and the command agree with the lists.
    pub(crate) changes: tokio::sync::Mutex<()>,
    pub(crate) counters: NodeCounters,
    pub(crate) options: NodeOptions,
    /// With shared responses: the node's sender prefix.
    pub(crate) responses: Option<String>,
}

pub(crate) fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The full channel names this node listens on for requests and signals, as the engines
/// answer a health ping: services (not the health channel) and slots, sorted, once each.
pub(crate) fn channels(state: &State) -> Vec<String> {
    let mut channels: Vec<String> = locked(&state.services)
        .iter()
        .filter(|s| s.channel.starts_with("gilmour.request."))
        .map(|s| s.channel.clone())
        .chain(locked(&state.slots).iter().map(|s| s.channel.clone()))
        .collect();
    channels.sort();
    channels.dedup();
    channels
}

/// Logs the first of a kind of loss and then every power of two, with the count so far.
fn throttled(counter: &AtomicU64, what: &str) {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(total = n, "{what}");
    }
}

/// A request refused for want of room, to be answered busy.
pub(crate) struct Refusal {
    group: String,
    request: Envelope,
}

/// Hands each message to its requester, its services or its slots; never stops on bad input.
pub(crate) async fn dispatch(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    commands: Client,
    state: Arc<State>,
    refusals: mpsc::Sender<Refusal>,
) {
    loop {
        let message = match messages.recv().await {
            Ok(message) => message,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                state.counters.lagged.fetch_add(n, Ordering::Relaxed);
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
            let by_pattern = matches!(message.kind, fred::types::MessageKind::PMessage);
            for slot in slots_for(&state, &channel, by_pattern) {
                // A signal cannot be refused: it waits for a place.
                let Ok(queued) = state.queued.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(run_slot(
                    commands.clone(),
                    state.clone(),
                    queued,
                    slot,
                    channel.clone(),
                    envelope.clone(),
                ));
            }
            continue;
        }
        if envelope.sender.is_empty() {
            throttled(
                &state.counters.dropped,
                "requests dropped without a sender: nobody to answer",
            );
            continue;
        }
        for service in services_for(&state, &channel) {
            match room(&state) {
                Some(queued) => {
                    tokio::spawn(serve(
                        commands.clone(),
                        state.clone(),
                        queued,
                        service,
                        envelope.clone(),
                    ));
                }
                None => {
                    let refusal = Refusal {
                        group: service.group.clone(),
                        request: envelope.clone(),
                    };
                    if refusals.send(refusal).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A queue place, when there is one.
fn room(state: &State) -> Option<OwnedSemaphorePermit> {
    state.queued.clone().try_acquire_owned().ok()
}

/// One service per exclusion group listening on `channel`: with several (a proxy's nodes),
/// they take turns, and the group's lock is taken once.
fn services_for(state: &State, channel: &str) -> Vec<Arc<Service>> {
    let services = locked(&state.services);
    let mut groups: Vec<(&str, Vec<&Arc<Service>>)> = Vec::new();
    for service in services.iter().filter(|s| s.channel == channel) {
        match groups.iter_mut().find(|(g, _)| *g == service.group) {
            Some((_, members)) => members.push(service),
            None => groups.push((&service.group, vec![service])),
        }
    }
    groups
        .into_iter()
        .map(|(_, members)| {
            let turn = state.turn.fetch_add(1, Ordering::Relaxed);
            members[turn % members.len()].clone()
        })
        .collect()
}

/// The slots a delivery goes to: a pattern's delivery to the pattern slots it matches, a
/// channel's to the slots of that channel (Redis delivers once for each way a node
/// subscribed); every slot without a group, and one per group, in turns.
fn slots_for(state: &State, channel: &str, by_pattern: bool) -> Vec<Arc<Slot>> {
    let slots = locked(&state.slots);
    let mut out: Vec<Arc<Slot>> = Vec::new();
    let mut groups: Vec<(&str, Vec<&Arc<Slot>>)> = Vec::new();
    let hearing = slots.iter().filter(|slot| {
        slot.pattern == by_pattern
            && if by_pattern {
                protocol::glob_match(&slot.channel, channel)
            } else {
                slot.channel == channel
            }
    });
    for slot in hearing {
        match &slot.group {
            None => out.push(slot.clone()),
            Some(group) => match groups.iter_mut().find(|(g, _)| g == group) {
                Some((_, members)) => members.push(slot),
                None => groups.push((group, vec![slot])),
            },
        }
    }
    for (_, members) in groups {
        let turn = state.turn.fetch_add(1, Ordering::Relaxed);
        out.push(members[turn % members.len()].clone());
    }
    out
}

/// Takes the lock of `group` for the message from `sender`: whether this node runs it.
pub(crate) async fn lock(commands: &Client, sender: &str, group: &str) -> bool {
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
    state: Arc<State>,
    queued: OwnedSemaphorePermit,
    slot: Arc<Slot>,
    channel: String,
    signal: Envelope,
) {
    let Ok(_place) = state.running.clone().acquire_owned().await else {
        return;
    };
    drop(queued);
    if let Some(group) = &slot.group {
        if signal.sender.is_empty() {
            throttled(
                &state.counters.dropped,
                "signals dropped without a sender: their group cannot lock them",
            );
            return;
        }
        if !lock(&commands, &signal.sender, group).await {
            return;
        }
    }
    let topic = protocol::topic_of(&channel).to_owned();
    let (span, traceparent) = traced(signal.traceparent.as_deref(), &topic);
    let incoming = Incoming {
        topic,
        sender: signal.sender,
        data: signal.data,
        traceparent,
    };
    if let Err(panic) = tokio::spawn((slot.handler)(incoming).instrument(span)).await {
        tracing::warn!(%panic, channel = %channel, "a slot's handler panicked");
    }
}

/// Takes the group's lock for one request once there is room and, when this node wins it,
/// answers; a failing answer is also published as an error record.
async fn serve(
    commands: Client,
    state: Arc<State>,
    queued: OwnedSemaphorePermit,
    service: Arc<Service>,
    request: Envelope,
) {
    let Ok(_place) = state.running.clone().acquire_owned().await else {
        return;
    };
    drop(queued);
    if !lock(&commands, &request.sender, &service.group).await {
        return;
    }
    let topic = protocol::topic_of(&service.channel).to_owned();
    let (span, traceparent) = traced(request.traceparent.as_deref(), &topic);
    let handler = (service.handler)(Incoming {
        topic: topic.clone(),
        sender: request.sender.clone(),
        data: request.data.clone(),
        traceparent,
    });
    // A handler past its timeout is stopped, not left running unseen.
    let task = tokio::spawn(handler.instrument(span));
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

/// The span of a handler run for a traced request or signal (named after its topic) when spans
/// are recorded here, and the trace context the handler passes on; nothing for an untraced one
/// (a Go or Ruby sender's).
fn traced(incoming: Option<&str>, topic: &str) -> (tracing::Span, Option<String>) {
    let Some(incoming) = incoming else {
        return (tracing::Span::none(), None);
    };
    match rylm_message::trace::Hop::continue_if_recorded(incoming) {
        Some(hop) => (hop.span(topic), Some(hop.traceparent())),
        // Spans not recorded here: the handler passes the sender's context on as it came.
        None => (tracing::Span::none(), Some(incoming.to_owned())),
    }
}

/// Refusals answered at once, at most.
const REFUSING: usize = 64;

/// Answers refused requests `503 busy`, up to [`REFUSING`] at once, each after its group's
/// lock (so that a request another node of the group runs is not also refused).
pub(crate) async fn refuse(
    mut refusals: mpsc::Receiver<Refusal>,
    commands: Client,
    state: Arc<State>,
) {
    let mut batch = Vec::with_capacity(REFUSING);
    loop {
        if refusals.recv_many(&mut batch, REFUSING).await == 0 {
            return;
        }
        let mut answering = tokio::task::JoinSet::new();
        for refusal in batch.drain(..) {
            answering.spawn(refuse_one(commands.clone(), state.clone(), refusal));
        }
        while answering.join_next().await.is_some() {}
    }
}

async fn refuse_one(commands: Client, state: Arc<State>, refusal: Refusal) {
    let Refusal { group, request } = refusal;
    if !lock(&commands, &request.sender, &group).await {
        return;
    }
    throttled(
        &state.counters.busy,
        "requests answered busy: every queue place of the node is taken",
    );
    let reply = Envelope::reply(
        Value::from(format!(
            "busy: {} handlers run and {} wait; try again later",
            state.options.concurrency, state.options.max_queued
        )),
        protocol::BUSY,
        &request.sender,
    );
    let published: Result<i64, _> = commands
        .publish(protocol::response_channel(&request.sender), reply.encode())
        .await;
    if let Err(error) = published {
        tracing::warn!(%error, "could not publish a busy reply");
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
