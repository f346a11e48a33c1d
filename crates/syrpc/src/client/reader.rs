//! A bucket's reader: the task that takes the results of one bucket while callers of this
//! client wait on it.
//!
//! The wire fixes where a result goes: the result exchange routes it by its bucket number
//! (`0..num_queues`, a hash of its id) to that bucket's queue, which every client of the app
//! that waits for a result in the bucket consumes. Several waiting clients, in one process or
//! many, compete for one queue, and each of them takes messages meant for the others. The
//! published clients reject and requeue those in a hot loop; holding them and handing them
//! back (rylm's first design) still let two clients hold each other's results until they
//! expired. So, while callers of this client wait on a bucket, its reader task does this:
//!
//! - It consumes the bucket's queue. A result some caller here waits for is acknowledged and
//!   handed over.
//! - A result nobody here waits for is **held** for a moment (`LOCAL_GRACE`), unacknowledged:
//!   a caller here who asks for it a moment later gets it at once (put now, get a moment later
//!   is the common case). Then it is **forwarded**: published, `mandatory` and confirmed, to
//!   rylm's own direct exchange `{app}_rylm_by_id` with its result id as the routing key, and
//!   only then acknowledged. The client that waits for it has bound its **private queue**
//!   (exclusive, deleted with its channel) to that exchange under the id, so the copy reaches
//!   it and nobody else: one more publish, not a broadcast.
//! - A waiter binds its id only once it has waited `BIND_AFTER` (10 ms) on a bucket where
//!   other clients' results were seen in the last 10 s, or `BIND_AFTER_ALONE` (250 ms) on
//!   one where none were: a result that comes straight to its own reader costs no binding (a
//!   binding and its removal are two broker round trips). A forward finding no binding yet
//!   (the broker returns it) is tried again at doubling intervals.
//! - A result still unclaimed after `hold_foreign_for` is handed back to the broker (one
//!   `nack` with requeue), for a client of the published packages or a later fetcher.
//! - When no caller waits any more, the reader closes its channel: the private queue and its
//!   bindings go, and every held result goes back to the broker.
//!
//! A result is therefore delivered to its waiting rylm caller within about `LOCAL_GRACE` plus
//! `BIND_AFTER` plus one tick of its arrival, whoever took it; it may be delivered more than
//! once (to two callers of one id in different processes, or again after a reconnect):
//! results are at-least-once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Command, Inner, Reply};
use crate::Error;
use crate::link::{Link, Outgoing, close_channel, forward_exchange, publish_on, set_up, within};
use crate::protocol::{self, ResultId};

/// How many unacknowledged results one bucket reader may hold.
const READER_PREFETCH: u16 = 512;
/// How long an idle reader lingers before it closes, so that back-to-back calls reuse it.
const READER_LINGER: Duration = Duration::from_secs(1);

/// A result held for a moment because nobody here waited for it.
struct Held {
    acker: Acker,
    data: Value,
    /// The message as it came, to forward.
    body: Vec<u8>,
    since: Instant,
    /// When to try forwarding it (again): after `LOCAL_GRACE`, then at doubling intervals.
    next_try: Instant,
    tries: u32,
}

/// Callers of this client waiting for one result id.
struct Waiting {
    replies: Vec<Reply>,
    since: Instant,
    /// Whether the private queue is bound to the forward exchange under this id.
    bound: bool,
}

impl Waiting {
    fn new(replies: Vec<Reply>) -> Waiting {
        Waiting {
            replies,
            since: Instant::now(),
            bound: false,
        }
    }
}

/// Which queue a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The bucket's queue, shared with every other client of the app.
    Bucket,
    /// This reader's private queue: results other clients forwarded here.
    Private,
}

/// How long a result nobody here waits for is held before it is forwarded.
const LOCAL_GRACE: Duration = Duration::from_millis(20);
/// How long a caller waits before its reader binds the id, so that others can forward, on a
/// bucket where results of other clients were seen lately (`SHARED_FOR`).
const BIND_AFTER: Duration = Duration::from_millis(10);
/// The same on a bucket where no other client's result was seen lately: a binding costs two
/// broker round trips, which a result that comes straight here does not need.
const BIND_AFTER_ALONE: Duration = Duration::from_millis(250);
/// How long a result of another client makes a bucket count as shared.
const SHARED_FOR: Duration = Duration::from_secs(10);
/// How often a reader forwards, binds and hands back.
const TICK: Duration = Duration::from_millis(20);
/// The most bindings, and the most forwards, one tick makes (each is a broker round trip):
/// the reader takes its deliveries between ticks, so that a crowd of callers waiting at once
/// (after an outage) cannot keep it from its queue for long.
const PER_TICK: usize = 32;
/// How many delivered ids a reader remembers at most (each for twice the message TTL).
const REMEMBERED: usize = 100_000;

/// The ids a reader delivered lately, oldest first: a second copy of one is dropped. Bounded by
/// count and by age; forgetting early only means a second copy is handled as a foreign result.
#[derive(Default)]
struct Delivered {
    ids: std::collections::HashSet<ResultId>,
    order: std::collections::VecDeque<(Instant, ResultId)>,
}

impl Delivered {
    fn contains(&self, id: &ResultId) -> bool {
        self.ids.contains(id)
    }

    fn remember(&mut self, id: ResultId) {
        if self.ids.contains(&id) {
            return;
        }
        if self.ids.len() >= REMEMBERED
            && let Some((_, oldest)) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id.clone());
        self.order.push_back((Instant::now(), id));
    }

    fn forget_older_than(&mut self, age: Duration) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < age {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }
}

struct Reader {
    bucket: u32,
    /// The private queue of the current channel.
    private: String,
    waiters: HashMap<ResultId, Waiting>,
    held: HashMap<ResultId, Held>,
    /// Results delivered here lately (a second copy may still come by).
    delivered: Delivered,
    /// When a result nobody here waited for came last: other clients wait on this bucket.
    foreign_seen: Option<Instant>,
}

impl Reader {
    /// Whether a caller has waited long enough to bind its id, or a result is due to be
    /// forwarded: what the private queue is for.
    fn needs_private(&self) -> bool {
        let bind_after = self.bind_after();
        self.waiters
            .values()
            .any(|w| w.since.elapsed() >= bind_after)
            || self.held.values().any(|h| h.next_try <= Instant::now())
    }

    /// How long a caller waits before its id is bound: short when the bucket is shared.
    fn bind_after(&self) -> Duration {
        match self.foreign_seen {
            Some(seen) if seen.elapsed() < SHARED_FOR => BIND_AFTER,
            _ => BIND_AFTER_ALONE,
        }
    }

    fn has_waiters(&self) -> bool {
        self.waiters
            .values()
            .any(|waiting| waiting.replies.iter().any(|r| !r.is_closed()))
    }

    /// Forgets callers that gave up; their ids are unbound.
    fn drop_abandoned(&mut self, channel: &Channel, inner: &Inner) {
        let mut unbind = Vec::new();
        self.waiters.retain(|id, waiting| {
            waiting.replies.retain(|r| !r.is_closed());
            let keep = !waiting.replies.is_empty();
            if !keep && waiting.bound {
                unbind.push(id.clone());
            }
            keep
        });
        for id in unbind {
            spawn_unbind(channel, inner, &self.private, id);
        }
    }

    fn deliver(
        &mut self,
        channel: &Channel,
        inner: &Inner,
        result_id: ResultId,
        waiting: Waiting,
        data: Value,
    ) {
        inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
        for reply in waiting.replies {
            let _ = reply.send(Ok(data.clone()));
        }
        if waiting.bound {
            spawn_unbind(channel, inner, &self.private, result_id.clone());
        }
        self.delivered.remember(result_id);
    }

    async fn on_wait(
        &mut self,
        channel: &Channel,
        inner: &Inner,
        result_id: ResultId,
        reply: Reply,
    ) {
        if let Some(held) = self.held.remove(&result_id) {
            let _ = held.acker.ack(BasicAckOptions::default()).await;
            self.deliver(
                channel,
                inner,
                result_id,
                Waiting::new(vec![reply]),
                held.data,
            );
        } else {
            self.add_waiter(result_id, reply);
        }
    }

    /// Counts `reply` among the callers waiting for `result_id`.
    fn add_waiter(&mut self, result_id: ResultId, reply: Reply) {
        self.waiters
            .entry(result_id)
            .or_insert_with(|| Waiting::new(Vec::new()))
            .replies
            .push(reply);
    }

    async fn on_result(
        &mut self,
        channel: &Channel,
        inner: &Inner,
        source: Source,
        delivery: lapin::message::Delivery,
    ) {
        let body = match protocol::decode_result(&delivery.data) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(bucket = self.bucket, %error, "dropping a malformed message from a result queue");
                inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                return;
            }
        };
        if let Some(waiting) = self.waiters.remove(&body.result_id) {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            self.deliver(channel, inner, body.result_id, waiting, body.data);
            return;
        }
        if source == Source::Private || self.delivered.contains(&body.result_id) {
            // A second copy of a result delivered here already, or a forwarded one whose
            // caller has given up.
            if self.delivered.contains(&body.result_id) {
                inner
                    .stats
                    .duplicates_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        self.foreign_seen = Some(Instant::now());
        let held = Held {
            acker: delivery.acker,
            data: body.data,
            body: delivery.data,
            since: Instant::now(),
            next_try: Instant::now() + LOCAL_GRACE,
            tries: 0,
        };
        // A duplicate (at-least-once delivery): keep the newer, hand the older back.
        if let Some(older) = self.held.insert(body.result_id, held) {
            let _ = older.acker.nack(requeue()).await;
            inner.stats.handed_back.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Binds the ids waited for long enough, forwards results held past the local grace, and
    /// hands back those nobody claimed within `hold`.
    async fn tick(&mut self, channel: &Channel, inner: &Inner, hold: Duration) {
        let settings = &inner.link.settings;
        let exchange = forward_exchange(settings);
        let bind_after = self.bind_after();
        let due_to_bind = self
            .waiters
            .iter_mut()
            .filter(|(_, waiting)| !waiting.bound && waiting.since.elapsed() >= bind_after)
            .take(PER_TICK);
        for (id, waiting) in due_to_bind {
            let bind = channel.queue_bind(
                self.private.as_str().into(),
                exchange.as_str().into(),
                id.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            );
            let bound = within(settings.confirm_timeout, "queue.bind (forward)", async {
                bind.await.map_err(Error::amqp("queue.bind (forward)"))
            })
            .await;
            match bound {
                Ok(()) => waiting.bound = true,
                Err(error) => {
                    tracing::debug!(bucket = self.bucket, %error, "could not bind a waited-for id");
                    break;
                }
            }
        }
        let due: Vec<ResultId> = self
            .held
            .iter()
            .filter(|(_, held)| held.next_try <= Instant::now())
            .map(|(id, _)| id.clone())
            .take(PER_TICK)
            .collect();
        for id in due {
            let Some(mut held) = self.held.remove(&id) else {
                continue;
            };
            // On the reader's own channel: what the broker returns there is a forward's.
            let forwarded = publish_on(
                channel,
                &Outgoing {
                    what: "result",
                    exchange: &exchange,
                    routing_key: id.as_str(),
                    body: &held.body,
                    expiration: Some(settings.msg_ttl),
                    bucket: None,
                    forward: true,
                    // To a private, transient queue; the original stays where it was until
                    // the copy is confirmed.
                    persistent: false,
                    traceparent: None,
                },
                settings.confirm_timeout,
            )
            .await;
            match forwarded {
                Ok(()) => {
                    // The waiting client has its copy: the original is done.
                    let _ = held.acker.ack(BasicAckOptions::default()).await;
                    inner.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) if held.since.elapsed() >= hold => {
                    // Nobody waits for it, as far as rylm clients go: back to the broker.
                    let _ = held.acker.nack(requeue()).await;
                    inner.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    // No binding yet (its caller may not have asked yet): try again later.
                    held.tries += 1;
                    held.next_try = Instant::now() + LOCAL_GRACE * 2u32.pow(held.tries.min(6));
                    self.held.insert(id, held);
                }
            }
        }
        self.delivered.forget_older_than(settings.msg_ttl * 2);
    }

    /// Fails every caller waiting here, and every command not yet read, with `error`.
    fn fail_all(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        error: impl Fn() -> Error,
    ) {
        for (_, waiting) in self.waiters.drain() {
            for reply in waiting.replies {
                let _ = reply.send(Err(error()));
            }
        }
        while let Ok(command) = commands.try_recv() {
            if let Command::Wait { reply, .. } = command {
                let _ = reply.send(Err(error()));
            }
        }
    }
}

/// Unbinds a waited-for id from the private queue, off the reader's loop (the binding goes
/// with the queue anyway when the reader closes).
fn spawn_unbind(channel: &Channel, inner: &Inner, private: &str, id: ResultId) {
    let (channel, exchange) = (channel.clone(), forward_exchange(&inner.link.settings));
    let private = private.to_owned();
    tokio::spawn(async move {
        let _ = channel
            .queue_unbind(
                private.as_str().into(),
                exchange.as_str().into(),
                id.as_str().into(),
                FieldTable::default(),
            )
            .await;
    });
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

/// A bucket's reader channel and its consumer of the shared queue.
struct Consumers {
    channel: Channel,
    bucket: lapin::Consumer,
    /// The link's connection generation the channel belongs to.
    generation: u64,
}

/// Opens the reader's channel and consumes the bucket's queue; the queue is declared again
/// when `redeclare` (a reopening: the queue may be what went away) or when not declared on
/// this connection lately.
async fn open_consumers(link: &Link, bucket: u32, redeclare: bool) -> Result<Consumers, Error> {
    // Waits for a connection as long as the settings allow; each step after it is a broker
    // round trip on a live connection, bounded by `connect_timeout`.
    let (channel, generation) = link.channel().await?;
    let steps = async {
        channel
            .basic_qos(READER_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(Error::amqp("basic.qos"))?;
        if redeclare {
            link.forget_bucket(bucket);
        }
        link.ensure_bucket(&channel, generation, bucket).await?;
        channel
            .basic_consume(
                link.settings.result_queue(bucket).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::amqp("basic.consume (result)"))
    };
    let limit = link.settings.connect_timeout;
    let shared = set_up(&channel, limit, "consuming a result queue", steps).await?;
    Ok(Consumers {
        channel,
        bucket: shared,
        generation,
    })
}

/// The reader's private queue, opened when first needed (a caller who waited `BIND_AFTER`,
/// or a result to forward): puts the channel in confirm mode (for forwards), declares the
/// forward exchange and the queue, and consumes it. Returns the queue's name and consumer.
async fn open_private(channel: &Channel, link: &Link) -> Result<(String, lapin::Consumer), Error> {
    let settings = &link.settings;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(Error::amqp("confirm.select"))?;
    channel
        .exchange_declare(
            forward_exchange(settings).as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("exchange.declare (forward)"))?;
    let mut arguments = FieldTable::default();
    let (_, message_ttl) = settings.result_queue_arguments();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(message_ttl));
    let private = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(Error::amqp("queue.declare (private)"))?;
    let name = private.name().as_str().to_owned();
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("basic.consume (private)"))?;
    Ok((name, consumer))
}

/// The next delivery of `consumer`, or never without one.
async fn next_or_never(
    consumer: &mut Option<lapin::Consumer>,
) -> Option<Result<lapin::message::Delivery, lapin::Error>> {
    match consumer {
        Some(consumer) => consumer.next().await,
        None => std::future::pending().await,
    }
}

/// Whether a failure to open a reader's consumers is final for its callers (the link gave
/// up reconnecting, or the broker refuses us); others are retried.
fn is_final(error: &Error) -> bool {
    matches!(
        error,
        Error::Unreachable { .. } | Error::AccessRefused { .. } | Error::InvalidSettings(_)
    )
}

pub(super) async fn run_reader(
    inner: std::sync::Weak<Inner>,
    bucket: u32,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut reader = Reader {
        bucket,
        private: String::new(),
        waiters: HashMap::new(),
        held: HashMap::new(),
        delivered: Delivered::default(),
        foreign_seen: None,
    };
    let mut idle_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut opened_before = false;
    'connection: loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let hold = strong.link.settings.hold_foreign_for;
        let opening = open_consumers(&strong.link, bucket, opened_before);
        // Reconnecting may take as long as the settings allow; opening on a live connection
        // takes a few round trips.
        let limit = strong
            .link
            .settings
            .reconnect_for
            .unwrap_or(Duration::MAX / 4)
            .saturating_add(strong.link.settings.connect_timeout);
        let consumers = match within(limit, "opening a result consumer", opening).await {
            Ok(opened) => opened,
            Err(error) => {
                // Read what came meanwhile, so that a caller who asked is counted.
                while let Ok(command) = commands.try_recv() {
                    match command {
                        Command::Wait { result_id, reply } => reader.add_waiter(result_id, reply),
                        Command::GaveUp => {}
                    }
                }
                for waiting in reader.waiters.values_mut() {
                    waiting.replies.retain(|r| !r.is_closed());
                    // The channel (and the bindings) went with the failure.
                    waiting.bound = false;
                }
                reader
                    .waiters
                    .retain(|_, waiting| !waiting.replies.is_empty());
                if is_final(&error) || !reader.has_waiters() {
                    // Leave under the map's lock, so that no command is sent to a reader that
                    // is going away; whoever waits gets the reason.
                    let _removed = strong
                        .readers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&bucket);
                    reader.fail_all(&mut commands, || Error::Unreachable {
                        url: protocol::redact(&strong.link.settings.url),
                        tried_for: strong.link.settings.reconnect_for.unwrap_or_default(),
                        reason: error.to_string(),
                    });
                    return;
                }
                // A queue deleted under us, a channel error: try again while callers wait
                // (each has its own deadline).
                tracing::warn!(bucket, %error, "cannot consume the result queue; retrying in {backoff:?}");
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue 'connection;
            }
        };
        if opened_before {
            strong.stats.reopened.fetch_add(1, Ordering::Relaxed);
        }
        opened_before = true;
        backoff = Duration::from_millis(100);
        let Consumers {
            channel,
            bucket: mut shared,
            generation,
        } = consumers;
        // The private queue (and its bindings) of an old channel went with it.
        let mut private: Option<lapin::Consumer> = None;
        reader.private.clear();
        for waiting in reader.waiters.values_mut() {
            waiting.bound = false;
        }
        let close_within = strong.link.settings.connect_timeout;
        drop(strong);
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(strong) = inner.upgrade() else {
                close_channel(&channel, "client dropped", close_within).await;
                return;
            };
            let linger_until =
                idle_since.map(|since| tokio::time::Instant::from_std(since + READER_LINGER));
            let mut leave = false;
            let mut lost: Option<String> = None;
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Wait { result_id, reply }) => {
                        idle_since = None;
                        reader.on_wait(&channel, &strong, result_id, reply).await;
                    }
                    Some(Command::GaveUp) => reader.drop_abandoned(&channel, &strong),
                    None => {
                        close_channel(&channel, "client closed", close_within).await;
                        return;
                    }
                },
                delivery = shared.next() => match delivery {
                    Some(Ok(delivery)) => reader.on_result(&channel, &strong, Source::Bucket, delivery).await,
                    Some(Err(error)) => lost = Some(error.to_string()),
                    None => lost = Some("the broker cancelled the consumer (was the queue deleted?)".into()),
                },
                delivery = next_or_never(&mut private) => match delivery {
                    Some(Ok(delivery)) => reader.on_result(&channel, &strong, Source::Private, delivery).await,
                    Some(Err(error)) => lost = Some(error.to_string()),
                    None => lost = Some("the broker cancelled the private consumer".into()),
                },
                _ = ticker.tick() => {
                    if strong.link.is_current(&channel, generation) {
                        reader.drop_abandoned(&channel, &strong);
                    } else {
                        lost = Some("the result channel is closed, or its connection replaced".into());
                    }
                    if lost.is_none() && private.is_none() && reader.needs_private() {
                        let opening = open_private(&channel, &strong.link);
                        let limit = strong.link.settings.connect_timeout;
                        match within(limit, "opening a private queue", opening).await {
                            Ok((name, consumer)) => {
                                reader.private = name;
                                private = Some(consumer);
                            }
                            Err(error) => lost = Some(error.to_string()),
                        }
                    }
                    if lost.is_none() && private.is_some() {
                        reader.tick(&channel, &strong, hold).await;
                    }
                }
                _ = sleep_until_or_never(linger_until) => leave = true,
            }
            if let Some(reason) = lost {
                tracing::warn!(bucket, %reason, "result consumer stopped; opening it again");
                // Held results go back to the broker with the channel.
                reader.held.clear();
                close_channel(&channel, "reopening", close_within).await;
                continue 'connection;
            }
            if reader.has_waiters() {
                idle_since = None;
            } else if idle_since.is_none() {
                idle_since = Some(Instant::now());
            }
            if !leave {
                continue;
            }
            // Leave under the map's lock, so that no command is sent to a reader that is going
            // away; a command that slipped in first keeps it here.
            let late_command = {
                let mut readers = strong.readers.lock().unwrap_or_else(|e| e.into_inner());
                let late = commands.try_recv().ok();
                if late.is_none() {
                    readers.remove(&bucket);
                }
                late
            };
            match late_command {
                Some(Command::Wait { result_id, reply }) => {
                    idle_since = None;
                    reader.on_wait(&channel, &strong, result_id, reply).await;
                }
                Some(Command::GaveUp) => idle_since = Some(Instant::now()),
                None => {
                    // Closing the channel hands every held result back at once.
                    let handed_back = reader.held.len() as u64;
                    strong
                        .stats
                        .handed_back
                        .fetch_add(handed_back, Ordering::Relaxed);
                    close_channel(&channel, "no more waiters", close_within).await;
                    return;
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_ids_are_bounded_by_count_and_forgotten_by_age() {
        let mut delivered = Delivered::default();
        for n in 0..REMEMBERED + 10 {
            delivered.remember(ResultId::from(n.to_string()));
        }
        // The oldest went first, once the count was reached.
        assert_eq!(delivered.ids.len(), REMEMBERED);
        assert_eq!(delivered.order.len(), REMEMBERED);
        assert!(!delivered.contains(&ResultId::from("0")));
        assert!(!delivered.contains(&ResultId::from("9")));
        assert!(delivered.contains(&ResultId::from("10")));
        // Remembering an id twice keeps one entry.
        delivered.remember(ResultId::from("10"));
        assert_eq!(delivered.order.len(), REMEMBERED);
        // Everything is older than no time at all.
        delivered.forget_older_than(Duration::ZERO);
        assert!(delivered.ids.is_empty() && delivered.order.is_empty());
    }
}
