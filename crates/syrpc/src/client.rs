//! The client: put a request, get its result by id, from any process.
//!
//! Results for many ids share a result queue (a bucket). While callers of this client wait on a
//! bucket, one reader task consumes it on a channel of its own:
//!
//! - a result some caller waits for is acknowledged and handed over;
//! - a result nobody here waits for is **held**, unacknowledged, so that a caller of this client
//!   who asks for it a moment later gets it at once; after `hold_foreign_for` it is handed back
//!   to the broker (one `nack` with requeue), where another process can take it;
//! - when no caller waits any more, the reader closes its channel, which hands every held result
//!   back to the broker and leaves no consumer behind.
//!
//! So a result meant for someone else is never lost and never bounced back and forth thousands
//! of times a second, as the published clients' reject-requeue loop does.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::Acker;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::link::{Link, Outgoing};
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
    /// broker has confirmed the request when this returns.
    pub async fn put_request(&self, type_: &str, data: &impl Serialize) -> Result<ResultId, Error> {
        let data = serde_json::to_value(data).map_err(|e| Error::Encode(e.to_string()))?;
        let result_id = ResultId::new();
        let body = protocol::encode_request(&result_id, type_, &data)?;
        let settings = &self.inner.link.settings;
        let exchange = settings.request_exchange();
        self.inner
            .link
            .publish(Outgoing {
                what: "request",
                exchange: &exchange,
                routing_key: &exchange,
                body: &body,
                expiration: settings.request_ttl,
                bucket: None,
            })
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

    /// `put_request` then `get_result`.
    pub async fn call(
        &self,
        type_: &str,
        data: &impl Serialize,
        deadline: Option<Duration>,
    ) -> Result<Value, Error> {
        let result_id = self.put_request(type_, data).await?;
        self.get_result(&result_id, deadline).await
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

struct Reader {
    bucket: u32,
    waiters: HashMap<ResultId, Vec<Reply>>,
    held: HashMap<ResultId, Held>,
}

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

    async fn on_wait(&mut self, inner: &Inner, result_id: ResultId, reply: Reply) {
        if let Some(held) = self.held.remove(&result_id) {
            let _ = held.acker.ack(BasicAckOptions::default()).await;
            inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
            let _ = reply.send(Ok(held.data));
        } else {
            self.waiters.entry(result_id).or_default().push(reply);
        }
    }

    async fn on_result(&mut self, inner: &Inner, delivery: lapin::message::Delivery) {
        let body = match protocol::decode_result(&delivery.data) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(bucket = self.bucket, %error, "dropping a malformed message from a result queue");
                inner.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                return;
            }
        };
        match self.waiters.remove(&body.result_id) {
            Some(replies) => {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                inner.stats.delivered.fetch_add(1, Ordering::Relaxed);
                for reply in replies {
                    let _ = reply.send(Ok(body.data.clone()));
                }
            }
            None => {
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
        }
    }

    /// Hands results held longer than `hold` back to the broker, for other processes.
    async fn release_stale(&mut self, inner: &Inner, hold: Duration) {
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
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

async fn open_consumer(link: &Link, bucket: u32) -> Result<(Channel, lapin::Consumer), Error> {
    let (channel, generation) = link.channel().await?;
    channel
        .basic_qos(READER_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(Error::amqp("basic.qos"))?;
    link.ensure_bucket(&channel, generation, bucket).await?;
    let consumer = channel
        .basic_consume(
            link.settings.result_queue(bucket).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("basic.consume (result)"))?;
    Ok((channel, consumer))
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
    };
    let mut idle_since: Option<Instant> = None;
    'connection: loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let hold = strong.link.settings.hold_foreign_for;
        let tick = (hold / 2).clamp(Duration::from_millis(20), Duration::from_millis(250));
        let (channel, mut consumer) = match open_consumer(&strong.link, bucket).await {
            Ok(opened) => opened,
            Err(error) => {
                // Nothing more can be done for the callers: tell them why.
                for (_, replies) in reader.waiters.drain() {
                    for reply in replies {
                        let _ = reply.send(Err(Error::Unreachable {
                            url: protocol::redact(&strong.link.settings.url),
                            tried_for: strong.link.settings.reconnect_for,
                            reason: error.to_string(),
                        }));
                    }
                }
                strong
                    .readers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&bucket);
                return;
            }
        };
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
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => reader.on_result(&strong, delivery).await,
                    Some(Err(error)) => {
                        tracing::warn!(bucket, %error, "result consumer failed; reopening");
                        reader.held.clear(); // the broker requeues them with the channel
                        continue 'connection;
                    }
                    None => {
                        tracing::warn!(bucket, "result consumer ended; reopening");
                        reader.held.clear();
                        continue 'connection;
                    }
                },
                _ = ticker.tick() => {
                    reader.drop_abandoned();
                    reader.release_stale(&strong, hold).await;
                }
                _ = sleep_until_or_never(linger_until) => leave = true,
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
