//! The client: put a request, get its result by id, from any process.
//!
//! # Waiting on a shared bucket
//!
//! The wire fixes where a result goes: the result exchange routes it by its bucket number
//! (`0..num_queues`, a hash of its id) to that bucket's queue, which every client of the app
//! that waits for a result in the bucket consumes. Several waiting clients, in one process or
//! many, compete for one queue, and each of them takes messages meant for the others. The
//! published clients reject and requeue those in a hot loop; holding them and handing them
//! back (rylm's first design) still let two clients hold each other's results until they
//! expired. So, while callers of this client wait on a bucket, its reader task does this:
//!
//! - It binds a **private queue** of its own (exclusive, deleted with its channel) to the
//!   result exchange with the bucket's routing key, so that every result published to the
//!   bucket while it waits is also copied to it: a result published after its caller started
//!   waiting reaches it at once, whoever else waits on the bucket.
//! - It consumes the **bucket queue** too, for results published before anyone waited (the
//!   stateless pattern: put now, get later from elsewhere). A result some caller here waits
//!   for is acknowledged and handed over. A result nobody here waits for is **published again
//!   once**, marked, so that the private queue of whichever client waits for it gets a copy,
//!   and then acknowledged (the new copy is in the bucket queue for later fetchers). A marked
//!   result nobody here waits for is **held** a moment (a caller here may ask for it) and then
//!   handed back to the broker (one `nack` with requeue), never bounced in a loop.
//! - The copy of a result it already delivered (an original after its private copy, or the
//!   other way round) is acknowledged and dropped.
//! - When no caller waits any more, the reader closes its channel: the private queue goes, and
//!   every held result goes back to the broker.
//!
//! A result is therefore delivered to its waiting caller within one publish of its arrival,
//! and a result may be delivered more than once (to two callers of the same id in different
//! processes, or again after a reconnect): results are at-least-once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::Acker;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::link::{FANNED_OUT, Link, Outgoing};
use crate::protocol::{self, ResultId, Settings};

/// How many unacknowledged results one bucket reader may hold.
const READER_PREFETCH: u16 = 512;
/// How long an idle reader lingers before it closes, so that back-to-back calls reuse it.
const READER_LINGER: Duration = Duration::from_millis(100);

type Reply = oneshot::Sender<Result<Value, Error>>;

enum Command {
    Wait {
        result_id: ResultId,
        reply: Reply,
    },
    /// A caller stopped waiting (its deadline passed): forget it now, not at the next tick.
    GaveUp,
}

/// Counters that show what a client did, for monitoring and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Results handed back to the broker because nobody here waited for them.
    pub handed_back: AtomicU64,
    /// Results delivered to callers.
    pub delivered: AtomicU64,
    /// Malformed messages found on result queues, acknowledged and dropped.
    pub malformed: AtomicU64,
    /// Results nobody here waited for, published again once so that their waiting clients
    /// get a copy.
    pub fanned_out: AtomicU64,
    /// Second copies of results already delivered here, acknowledged and dropped.
    pub duplicates_dropped: AtomicU64,
    /// Times a bucket's reader had to open its consumers again (a lost connection, a queue
    /// deleted under it, a consumer cancelled by the broker).
    pub reopened: AtomicU64,
}

struct Inner {
    link: Arc<Link>,
    readers: std::sync::Mutex<HashMap<u32, mpsc::UnboundedSender<Command>>>,
    stats: ClientStats,
}

/// A SyRPC client. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn example() -> Result<(), rylm_syrpc::Error> {
/// use rylm_syrpc::{Client, Settings};
/// use std::time::Duration;
///
/// let client = Client::connect(Settings::new("shop", "amqp://guest:guest@127.0.0.1:5672/%2F")).await?;
/// let id = client.put_request("echo", &serde_json::json!({"value": "hello"})).await?;
/// // ... later, in this or any other process that knows the id:
/// let result = client.get_result(&id, Some(Duration::from_secs(5))).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("app_name", &self.inner.link.settings.app_name)
            .finish()
    }
}

impl Client {
    /// Connects to the broker and declares the request topology.
    pub async fn connect(settings: Settings) -> Result<Client, Error> {
        let link = Link::connect(settings).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                link,
                readers: std::sync::Mutex::new(HashMap::new()),
                stats: ClientStats::default(),
            }),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.link.settings
    }

    /// What this client has done so far.
    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// Publishes a request of `type_` with `data` and returns its result id at once; the
    /// broker has confirmed the request when this returns. While the broker is unreachable it
    /// keeps trying, up to the settings' `timeout` (then [`Error::PublishTimeout`]).
    pub async fn put_request(&self, type_: &str, data: &impl Serialize) -> Result<ResultId, Error> {
        self.put_request_within(type_, data, self.inner.link.settings.timeout)
            .await
    }

    async fn put_request_within(
        &self,
        type_: &str,
        data: &impl Serialize,
        deadline: Option<Duration>,
    ) -> Result<ResultId, Error> {
        let data = serde_json::to_value(data).map_err(|e| Error::Encode(e.to_string()))?;
        let result_id = ResultId::new();
        let body = protocol::encode_request(&result_id, type_, &data)?;
        let settings = &self.inner.link.settings;
        let exchange = settings.request_exchange();
        self.inner
            .link
            .publish(
                Outgoing {
                    what: "request",
                    exchange: &exchange,
                    routing_key: &exchange,
                    body: &body,
                    expiration: settings.request_ttl,
                    bucket: None,
                    fanned_out: false,
                },
                deadline,
            )
            .await?;
        Ok(result_id)
    }

    /// Waits for the result of `result_id` until `deadline` (or the settings' `timeout` when
    /// `None` is given; with neither, until it comes). A result whose data carries an
    /// `exception` is returned as [`Error::Remote`].
    pub async fn get_result(
        &self,
        result_id: &ResultId,
        deadline: Option<Duration>,
    ) -> Result<Value, Error> {
        let deadline = deadline.or(self.inner.link.settings.timeout);
        let (reply, answer) = oneshot::channel();
        self.send_to_reader(
            self.inner.link.settings.bucket(result_id.as_str()),
            Command::Wait {
                result_id: result_id.clone(),
                reply,
            },
        );
        let outcome = match deadline {
            Some(limit) => match tokio::time::timeout(limit, answer).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.tell_reader_gave_up(self.inner.link.settings.bucket(result_id.as_str()));
                    return Err(Error::Timeout {
                        result_id: result_id.clone(),
                        waited: limit,
                    });
                }
            },
            None => answer.await,
        };
        let data = outcome.map_err(|_| Error::Closed("client"))??;
        match protocol::exception_of(&data) {
            Some(exception) => Err(Error::Remote {
                result_id: result_id.clone(),
                exception: exception.clone(),
            }),
            None => Ok(data),
        }
    }

    /// `put_request` then `get_result`, both within `deadline` (or the settings' `timeout`).
    pub async fn call(
        &self,
        type_: &str,
        data: &impl Serialize,
        deadline: Option<Duration>,
    ) -> Result<Value, Error> {
        let deadline = deadline.or(self.inner.link.settings.timeout);
        let started = Instant::now();
        let result_id = self.put_request_within(type_, data, deadline).await?;
        let remaining = deadline.map(|limit| limit.saturating_sub(started.elapsed()));
        self.get_result(&result_id, remaining).await
    }

    /// Closes the connection; calls still waiting fail with [`Error::Closed`].
    pub async fn close(self) {
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.inner.link.close().await;
    }

    fn tell_reader_gave_up(&self, bucket: u32) {
        let readers = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = readers.get(&bucket) {
            let _ = sender.send(Command::GaveUp);
        }
    }

    fn send_to_reader(&self, bucket: u32, command: Command) {
        let mut readers = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        let command = match readers.get(&bucket) {
            Some(sender) => match sender.send(command) {
                Ok(()) => return,
                // The reader is gone (it closed while idle): start another.
                Err(mpsc::error::SendError(command)) => command,
            },
            None => command,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        // A fresh receiver is alive, so this send cannot fail.
        let _ = sender.send(command);
        readers.insert(bucket, sender);
        tokio::spawn(run_reader(Arc::downgrade(&self.inner), bucket, receiver));
    }
}

/// A result held for a moment because nobody here waited for it.
struct Held {
    acker: Acker,
    data: Value,
    since: Instant,
}

/// Which queue a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The bucket's queue, shared with every other client of the app.
    Bucket,
    /// This reader's own copy of what is published to the bucket.
    Private,
}

struct Reader {
    bucket: u32,
    waiters: HashMap<ResultId, Vec<Reply>>,
    held: HashMap<ResultId, Held>,
    /// Results delivered here lately (their other copy may still come by), and when.
    delivered: HashMap<ResultId, Instant>,
}

/// How many delivered ids a reader remembers at most (each for a message TTL).
const REMEMBERED: usize = 100_000;

impl Reader {
    fn has_waiters(&self) -> bool {
        self.waiters
            .values()
            .any(|replies| replies.iter().any(|r| !r.is_closed()))
    }

    fn drop_abandoned(&mut self) {
        self.waiters.retain(|_, replies| {
            replies.retain(|r| !r.is_closed());
            !replies.is_empty()
        });
    }

    fn remember_delivered(&mut self, result_id: ResultId) {
        if self.delivered.len() >= REMEMBERED {
            // Forgetting early only means a second copy is handled as a foreign result.
            let oldest = self
                .delivered
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.delivered.remove(&oldest);
            }
        }
        self.delivered.insert(result_id, Instant::now());
    }

    fn deliver(&mut self, inner: &Inner, result_id: ResultId, replies: Vec<Reply>, data: Value) {
        inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
        for reply in replies {
            let _ = reply.send(Ok(data.clone()));
        }
        self.remember_delivered(result_id);
    }

    async fn on_wait(&mut self, inner: &Inner, result_id: ResultId, reply: Reply) {
        if let Some(held) = self.held.remove(&result_id) {
            let _ = held.acker.ack(BasicAckOptions::default()).await;
            self.deliver(inner, result_id, vec![reply], held.data);
        } else {
            self.waiters.entry(result_id).or_default().push(reply);
        }
    }

    async fn on_result(
        &mut self,
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
        if let Some(replies) = self.waiters.remove(&body.result_id) {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            self.deliver(inner, body.result_id, replies, body.data);
            return;
        }
        if source == Source::Private || self.delivered.contains_key(&body.result_id) {
            // A copy: of a result delivered here already, or (private) of one that nobody here
            // waits for, whose original is in the bucket queue.
            if self.delivered.contains_key(&body.result_id) {
                inner
                    .stats
                    .duplicates_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            return;
        }
        let marked = delivery
            .properties
            .headers()
            .as_ref()
            .is_some_and(|headers| headers.inner().contains_key(FANNED_OUT));
        if !marked && self.fan_out(inner, &delivery.data).await {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            inner.stats.fanned_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let held = Held {
            acker: delivery.acker,
            data: body.data,
            since: Instant::now(),
        };
        // A duplicate (at-least-once delivery): keep the newer, hand the older back.
        if let Some(older) = self.held.insert(body.result_id, held) {
            let _ = older.acker.nack(requeue()).await;
            inner.stats.handed_back.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes a result again, marked, so that every client waiting on the bucket gets a
    /// copy in its private queue; true once the broker confirmed it.
    async fn fan_out(&self, inner: &Inner, body: &[u8]) -> bool {
        let settings = &inner.link.settings;
        let routing_key = self.bucket.to_string();
        let published = inner
            .link
            .publish(
                Outgoing {
                    what: "result",
                    exchange: &settings.result_exchange(),
                    routing_key: &routing_key,
                    body,
                    expiration: None,
                    bucket: Some(self.bucket),
                    fanned_out: true,
                },
                Some(settings.confirm_timeout),
            )
            .await;
        match published {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(bucket = self.bucket, %error, "could not publish a foreign result again; holding it");
                false
            }
        }
    }

    /// Hands results held longer than `hold` back to the broker, for other processes, and
    /// forgets deliveries older than `remember`.
    async fn release_stale(&mut self, inner: &Inner, hold: Duration, remember: Duration) {
        let stale: Vec<ResultId> = self
            .held
            .iter()
            .filter(|(_, held)| held.since.elapsed() >= hold)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(held) = self.held.remove(&id) {
                let _ = held.acker.nack(requeue()).await;
                inner.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.delivered.retain(|_, at| at.elapsed() < remember);
    }

    /// Fails every caller waiting here, and every command not yet read, with `error`.
    fn fail_all(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        error: impl Fn() -> Error,
    ) {
        for (_, replies) in self.waiters.drain() {
            for reply in replies {
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

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

/// A bucket's consumers: its shared queue, and a private queue bound to the same routing key.
struct Consumers {
    channel: Channel,
    bucket: lapin::Consumer,
    private: lapin::Consumer,
}

async fn open_consumers(link: &Link, bucket: u32) -> Result<Consumers, Error> {
    let (channel, generation) = link.channel().await?;
    channel
        .basic_qos(READER_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(Error::amqp("basic.qos"))?;
    // Declared again at every opening: the queue may be what went away.
    link.forget_bucket(bucket);
    link.ensure_bucket(&channel, generation, bucket).await?;
    let settings = &link.settings;
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
        .map_err(Error::amqp("queue.declare (private result copy)"))?;
    channel
        .queue_bind(
            private.name().as_str().into(),
            settings.result_exchange().as_str().into(),
            bucket.to_string().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("queue.bind (private result copy)"))?;
    let private = channel
        .basic_consume(
            private.name().as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("basic.consume (private result copy)"))?;
    let shared = channel
        .basic_consume(
            settings.result_queue(bucket).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("basic.consume (result)"))?;
    Ok(Consumers {
        channel,
        bucket: shared,
        private,
    })
}

/// Whether a failure to open a reader's consumers is final for its callers (the link gave
/// up reconnecting, or the broker refuses us); others are retried.
fn is_final(error: &Error) -> bool {
    matches!(
        error,
        Error::Unreachable { .. } | Error::AccessRefused { .. } | Error::InvalidSettings(_)
    )
}

async fn run_reader(
    inner: std::sync::Weak<Inner>,
    bucket: u32,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut reader = Reader {
        bucket,
        waiters: HashMap::new(),
        held: HashMap::new(),
        delivered: HashMap::new(),
    };
    let mut idle_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut opened_before = false;
    'connection: loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let hold = strong.link.settings.hold_foreign_for;
        let remember = strong.link.settings.msg_ttl * 2;
        let tick = (hold / 2).clamp(Duration::from_millis(20), Duration::from_millis(250));
        let consumers = match open_consumers(&strong.link, bucket).await {
            Ok(opened) => opened,
            Err(error) => {
                // Read what came meanwhile, so that a caller who asked is counted.
                while let Ok(command) = commands.try_recv() {
                    match command {
                        Command::Wait { result_id, reply } => {
                            reader.waiters.entry(result_id).or_default().push(reply);
                        }
                        Command::GaveUp => reader.drop_abandoned(),
                    }
                }
                reader.drop_abandoned();
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
            mut private,
        } = consumers;
        drop(strong);
        let mut ticker = tokio::time::interval(tick);
        loop {
            let Some(strong) = inner.upgrade() else {
                let _ = channel.close(200, "client dropped".into()).await;
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
                        reader.on_wait(&strong, result_id, reply).await;
                    }
                    Some(Command::GaveUp) => reader.drop_abandoned(),
                    None => {
                        let _ = channel.close(200, "client closed".into()).await;
                        return;
                    }
                },
                delivery = shared.next() => match delivery {
                    Some(Ok(delivery)) => reader.on_result(&strong, Source::Bucket, delivery).await,
                    Some(Err(error)) => lost = Some(error.to_string()),
                    None => lost = Some("the broker cancelled the consumer (was the queue deleted?)".into()),
                },
                delivery = private.next() => match delivery {
                    Some(Ok(delivery)) => reader.on_result(&strong, Source::Private, delivery).await,
                    Some(Err(error)) => lost = Some(error.to_string()),
                    None => lost = Some("the broker cancelled the private consumer".into()),
                },
                _ = ticker.tick() => {
                    reader.drop_abandoned();
                    reader.release_stale(&strong, hold, remember).await;
                }
                _ = sleep_until_or_never(linger_until) => leave = true,
            }
            if let Some(reason) = lost {
                tracing::warn!(bucket, %reason, "result consumer stopped; opening it again");
                // Held results go back to the broker with the channel.
                reader.held.clear();
                let _ = channel.close(200, "reopening".into()).await;
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
                    reader.on_wait(&strong, result_id, reply).await;
                }
                Some(Command::GaveUp) => idle_since = Some(Instant::now()),
                None => {
                    // Closing the channel hands every held result back at once.
                    let handed_back = reader.held.len() as u64;
                    strong
                        .stats
                        .handed_back
                        .fetch_add(handed_back, Ordering::Relaxed);
                    let _ = channel.close(200, "no more waiters".into()).await;
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
