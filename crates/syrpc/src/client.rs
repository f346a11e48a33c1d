//! The client: put a request, get its result by id, from any process.
//!
//! While callers wait, a reader task per bucket takes the results (`client/reader.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rylm_message::trace::Hop;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::Error;
use crate::link::{Link, Outgoing};
use crate::protocol::{self, ResultId, Settings};

mod reader;

use reader::run_reader;

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
    /// Results nobody here waited for, forwarded to the client that waits for them.
    pub forwarded: AtomicU64,
    /// Second copies of results already delivered here, acknowledged and dropped.
    pub duplicates_dropped: AtomicU64,
    /// Times a bucket's reader had to open its consumers again (a lost connection, a queue
    /// deleted under it, a consumer cancelled by the broker).
    pub reopened: AtomicU64,
    /// Transient requests of `call` published again because the connection was replaced
    /// while their callers waited.
    pub republished: AtomicU64,
    /// Requests published again on a new channel because the broker's confirm did not come
    /// within `confirm_timeout` (each may have left a second copy with the broker).
    pub unconfirmed_retried: AtomicU64,
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
        let (result_id, body) = request_body(type_, data)?;
        let hop = Hop::continue_from(None);
        self.publish_request(&body, deadline, &hop.traceparent(), true)
            .instrument(hop.span("rylm.syrpc.put_request"))
            .await?;
        Ok(result_id)
    }

    /// Publishes a request; returns the generation of the connection that confirmed it.
    async fn publish_request(
        &self,
        body: &[u8],
        deadline: Option<Duration>,
        traceparent: &str,
        persistent: bool,
    ) -> Result<u64, Error> {
        let settings = &self.inner.link.settings;
        let exchange = settings.request_exchange();
        self.inner
            .link
            .publish(
                Outgoing {
                    what: "request",
                    exchange: &exchange,
                    routing_key: &exchange,
                    body,
                    expiration: settings.request_ttl,
                    bucket: None,
                    forward: false,
                    persistent,
                    traceparent: Some(traceparent),
                },
                deadline,
                &self.inner.stats.unconfirmed_retried,
            )
            .await
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
        let answer = self.wait_for(result_id);
        self.answer(result_id, answer, deadline).await
    }

    /// `put_request` then `get_result`, both within `deadline` (or the settings' `timeout`).
    ///
    /// The wait starts before the request is published, and the result is taken as soon as
    /// it comes, even before the broker's confirm of the request (a result proves that the
    /// request arrived): one call costs one round trip through the server, not two confirms.
    ///
    /// Unless the settings ask for `persistent_calls`, the request (and so its result) is
    /// transient: the broker keeps it in memory, not on disk, and this call publishes it again
    /// whenever its connection is replaced before the result came, which covers what a broker
    /// restart loses. A handler may then run twice for one call (at-least-once, as always).
    pub async fn call(
        &self,
        type_: &str,
        data: &impl Serialize,
        deadline: Option<Duration>,
    ) -> Result<Value, Error> {
        let hop = Hop::continue_from(None);
        self.call_now(type_, data, deadline, &hop.traceparent())
            .instrument(hop.span("rylm.syrpc.call"))
            .await
    }

    async fn call_now(
        &self,
        type_: &str,
        data: &impl Serialize,
        deadline: Option<Duration>,
        traceparent: &str,
    ) -> Result<Value, Error> {
        let settings = &self.inner.link.settings;
        let deadline = deadline.or(settings.timeout);
        let persistent = settings.persistent_calls;
        let started = tokio::time::Instant::now();
        let (result_id, body) = request_body(type_, data)?;
        let mut generations = self.inner.link.watch_generation();
        let answer = self.wait_for(&result_id);
        let publish = self.publish_request(&body, deadline, traceparent, persistent);
        let answer = self.answer(&result_id, answer, deadline);
        tokio::pin!(publish, answer);
        // The generation of the connection that confirmed the request, once it did.
        let mut confirmed_on: Option<u64> = None;
        loop {
            tokio::select! {
                sent = &mut publish, if confirmed_on.is_none() => match sent {
                    Ok(generation) => {
                        confirmed_on = Some(generation);
                        // A replacement that came meanwhile is acted on below.
                        generations.mark_changed();
                    }
                    Err(error) => {
                        self.tell_reader_gave_up(settings.bucket(result_id.as_str()));
                        return Err(error);
                    }
                },
                outcome = &mut answer => return outcome,
                // The sender lives with the link, which this client holds: no error here.
                Ok(()) = generations.changed(), if !persistent && confirmed_on.is_some() => {
                    let live = *generations.borrow_and_update();
                    if confirmed_on != Some(live) {
                        // The connection that confirmed the transient request is gone, and
                        // the request or its result may have gone with the broker.
                        self.inner.stats.republished.fetch_add(1, Ordering::Relaxed);
                        let left = deadline.map(|limit| limit.saturating_sub(started.elapsed()));
                        confirmed_on = None;
                        publish.set(self.publish_request(&body, left, traceparent, persistent));
                    }
                }
            }
        }
    }

    /// Registers a wait for `result_id` with its bucket's reader.
    fn wait_for(&self, result_id: &ResultId) -> oneshot::Receiver<Result<Value, Error>> {
        let (reply, answer) = oneshot::channel();
        self.send_to_reader(
            self.inner.link.settings.bucket(result_id.as_str()),
            Command::Wait {
                result_id: result_id.clone(),
                reply,
            },
        );
        answer
    }

    /// The result `answer` brings, within `deadline`.
    async fn answer(
        &self,
        result_id: &ResultId,
        answer: oneshot::Receiver<Result<Value, Error>>,
        deadline: Option<Duration>,
    ) -> Result<Value, Error> {
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

/// A fresh result id and the request's body.
fn request_body(type_: &str, data: &impl Serialize) -> Result<(ResultId, Vec<u8>), Error> {
    let data = serde_json::to_value(data).map_err(|e| Error::Encode(e.to_string()))?;
    let result_id = ResultId::new();
    let body = protocol::encode_request(&result_id, type_, &data)?;
    Ok((result_id, body))
}
