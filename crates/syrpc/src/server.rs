//! The server: take requests, publish results; and a handler loop on top.

use rylm_message::stats::{ErrorKind, Outcome};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore, mpsc};

use crate::Error;
use crate::link::{Link, Outgoing, close_channel, set_up};
use crate::protocol::{self, AckMode, ResultId, Settings};

/// The first pause before consuming requests again after a failure; it doubles up to
/// `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the request consumer checks that its channel and connection are still the live
/// ones.
const CONNECTION_CHECK: Duration = Duration::from_millis(500);
/// While retrying, at most one warning per this long.
const RETRY_WARN_EVERY: Duration = Duration::from_secs(30);
/// [`Handlers::run`]'s limit: the settings' default `handler_timeout`.
const DEFAULT_HANDLER_LIMIT: Duration = Duration::from_secs(300);

/// One request taken from the request queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The request type: which function to run.
    pub type_: String,
    /// Where the result goes.
    pub result_id: ResultId,
    /// The argument.
    pub data: Value,
    /// The caller's W3C trace context (the AMQP header `traceparent`), when it sent one.
    pub traceparent: Option<String>,
}

/// A request still to acknowledge, and the connection it came on.
struct Pending {
    acker: Acker,
    generation: u64,
    /// Whether the request came persistent: its result goes the same way.
    persistent: bool,
}

struct Incoming {
    request: Request,
    acker: Acker,
    generation: u64,
    persistent: bool,
}

/// What a server has done, since it connected.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Requests taken from the queue.
    pub taken: AtomicU64,
    /// Results published (the broker confirmed them).
    pub answered: AtomicU64,
    /// Of those, `exception` results: an unknown type, a handler's error, panic or overrun.
    pub exceptions: AtomicU64,
    /// Results that could not be published (the request goes back to the queue).
    pub publish_failed: AtomicU64,
    /// Results published again on a new channel because the broker's confirm did not come
    /// within `confirm_timeout` (each may have left a second copy with the broker).
    pub unconfirmed_retried: AtomicU64,
    /// Requests rejected because they did not decode.
    pub malformed: AtomicU64,
    /// Times the request consumer was opened again (after a loss or the broker ending it).
    pub consumer_restarts: AtomicU64,
    /// 1 while the request consumer is open.
    pub consuming: std::sync::atomic::AtomicBool,
    /// Requests answered by [`Server::serve`], by type (an unknown type under `_unknown`):
    /// calls, errors by kind, latency.
    pub types: rylm_message::stats::CallTable,
}

/// A SyRPC server. Cheap to clone; clones share the connection and the request stream.
#[derive(Clone)]
pub struct Server {
    link: Arc<Link>,
    counters: Arc<ServerCounters>,
    incoming: Arc<Mutex<mpsc::Receiver<Incoming>>>,
    /// Requests taken and not yet answered, by result id; a list, since two requests may
    /// (wrongly) share an id, and each must still be acknowledged.
    pending: Arc<std::sync::Mutex<HashMap<ResultId, VecDeque<Pending>>>>,
    consumer_task: Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("app_name", &self.link.settings.app_name)
            .finish()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The last clone stops the consumer; its channel closes and unacked requests go back.
        if Arc::strong_count(&self.consumer_task) == 1 {
            self.consumer_task.abort();
        }
    }
}

impl Server {
    /// Connects, declares the topology and starts consuming requests, at most `prefetch`
    /// unacknowledged at a time.
    pub async fn connect(settings: Settings) -> Result<Server, Error> {
        let link = Link::connect(settings).await?;
        let (sender, receiver) = mpsc::channel(usize::from(link.settings.prefetch));
        let counters = Arc::new(ServerCounters::default());
        let consumer_task = tokio::spawn(consume_requests(link.clone(), sender, counters.clone()));
        Ok(Server {
            link,
            counters,
            incoming: Arc::new(Mutex::new(receiver)),
            pending: Arc::new(std::sync::Mutex::new(HashMap::new())),
            consumer_task: Arc::new(consumer_task),
        })
    }

    /// What it has done, and whether it is consuming now.
    pub fn counters(&self) -> Arc<ServerCounters> {
        self.counters.clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.link.settings
    }

    /// The next request, waiting up to `deadline` (forever with `None`). With
    /// [`AckMode::AfterResult`] the request is acknowledged by [`Server::put_result`].
    pub async fn get_request(&self, deadline: Option<Duration>) -> Result<Request, Error> {
        let next = async { self.incoming.lock().await.recv().await };
        let incoming = match deadline {
            Some(limit) => tokio::time::timeout(limit, next)
                .await
                .map_err(|_| Error::NoRequest(limit))?,
            None => next.await,
        }
        .ok_or(Error::Closed("server"))?;
        match self.link.settings.ack_mode {
            AckMode::OnReceipt => {
                let _ = incoming.acker.ack(BasicAckOptions::default()).await;
            }
            AckMode::AfterResult => {
                let pending = Pending {
                    acker: incoming.acker,
                    generation: incoming.generation,
                    persistent: incoming.persistent,
                };
                let mut taken = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let same_id = taken.entry(incoming.request.result_id.clone()).or_default();
                if !same_id.is_empty() {
                    tracing::warn!(result_id = %incoming.request.result_id, "two requests share a result id (a call published again after its caller reconnected, or a clash of ids); both are answered, and both results go to the one id");
                }
                same_id.push_back(pending);
            }
        }
        Ok(incoming.request)
    }

    /// Publishes the result of `result_id` (the broker has confirmed it when this returns),
    /// persistent unless its request came transient, then acknowledges the request. While the
    /// broker is unreachable it keeps trying (up to the settings' `reconnect_for`). If the
    /// result cannot be published, the request goes back to the queue (it will be taken again)
    /// and the error is returned.
    ///
    /// A result that can never be published (it cannot be encoded, the broker refuses it) is
    /// replaced by an `exception` result that says why, so that the caller learns it at once
    /// and the request is not run again and again; the error is still returned.
    pub async fn put_result(
        &self,
        result_id: &ResultId,
        data: &impl Serialize,
    ) -> Result<(), Error> {
        let persistent = self.result_persistent(result_id);
        let mut published = self.publish_result(result_id, data, persistent).await;
        // Whether the caller has a result: this one, or an exception in its place.
        let mut answered = published.is_ok();
        if let Err(error) = &published
            && !error.is_connection_loss()
        {
            tracing::error!(%result_id, %error, "cannot publish a result; publishing an exception in its place");
            let replaced = self
                .publish_result(
                    result_id,
                    &protocol::exception(format!(
                        "the server could not publish the result: {error}"
                    )),
                    persistent,
                )
                .await;
            match replaced {
                Ok(()) => answered = true,
                Err(error) => published = Err(error),
            }
        }
        self.settle(result_id, answered).await;
        published
    }

    /// Settles the oldest request taken with `result_id`: acknowledged once its caller is
    /// answered, else handed back to the queue (it will be taken again).
    async fn settle(&self, result_id: &ResultId, answered: bool) {
        let Some(pending) = self.take_pending(result_id) else {
            return;
        };
        // After a reconnect the old channel is gone and the broker has requeued the request;
        // it will come again (at-least-once), so there is nothing to settle.
        if pending.generation != self.link.generation() {
            return;
        }
        let settled = if answered {
            pending.acker.ack(BasicAckOptions::default()).await
        } else {
            pending
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        };
        if let Err(error) = settled {
            tracing::debug!(%result_id, %error, "could not settle a request (its channel is gone; the broker requeues it)");
        }
    }

    /// Publishes the result of `result_id`, persistent or transient.
    async fn publish_result(
        &self,
        result_id: &ResultId,
        data: &impl Serialize,
        persistent: bool,
    ) -> Result<(), Error> {
        let data = serde_json::to_value(data).map_err(|e| Error::Encode(e.to_string()))?;
        let body = protocol::encode_result(result_id, &data)?;
        let settings = &self.link.settings;
        let bucket = settings.bucket(result_id.as_str());
        let routing_key = bucket.to_string();
        self.link
            .publish(
                Outgoing {
                    what: "result",
                    exchange: &settings.result_exchange(),
                    routing_key: &routing_key,
                    body: &body,
                    expiration: None,
                    bucket: Some(bucket),
                    forward: false,
                    persistent,
                    traceparent: None,
                },
                None,
                &self.counters.unconfirmed_retried,
            )
            .await
            .map(|_| ())
    }

    /// Whether the result of `result_id` goes persistent: as its request came (persistent
    /// when the request is not held here, as with `AckMode::OnReceipt`).
    fn result_persistent(&self, result_id: &ResultId) -> bool {
        let taken = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        taken
            .get(result_id)
            .and_then(|same_id| same_id.front())
            .is_none_or(|pending| pending.persistent)
    }

    /// The oldest request taken with `result_id` and not yet settled.
    fn take_pending(&self, result_id: &ResultId) -> Option<Pending> {
        let mut taken = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let same_id = taken.get_mut(result_id)?;
        let pending = same_id.pop_front();
        if same_id.is_empty() {
            taken.remove(result_id);
        }
        pending
    }

    /// Serves requests with `handlers` until `shutdown` completes, running up to `prefetch`
    /// handlers at once; then stops taking requests and waits for the running ones to finish.
    ///
    /// An unknown type, a handler error and a handler panic each answer the caller with an
    /// `exception` result; the loop goes on.
    pub async fn serve(
        &self,
        handlers: Handlers,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let handlers = Arc::new(handlers);
        let slots = Arc::new(Semaphore::new(usize::from(self.link.settings.prefetch)));
        let mut running = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => permit.map_err(|_| Error::Closed("server"))?,
            };
            let request = tokio::select! {
                _ = &mut shutdown => break,
                request = self.get_request(None) => request?,
            };
            let server = self.clone();
            let handlers = handlers.clone();
            let limit = self.link.settings.handler_timeout;
            // A traced request is answered under a span of this server, named after its type,
            // when spans are recorded here.
            let span = request
                .traceparent
                .as_deref()
                .and_then(rylm_message::trace::Hop::continue_if_recorded)
                .map_or_else(tracing::Span::none, |hop| hop.span(&request.type_));
            running.spawn(tracing::Instrument::instrument(async move {
                let started = std::time::Instant::now();
                let (answer, outcome) = handlers.run_counted(&request, limit).await;
                let counters = &server.counters;
                let type_ = if handlers.map.contains_key(&request.type_) {
                    request.type_.as_str()
                } else {
                    UNKNOWN_TYPE
                };
                counters.types.record(type_, started.elapsed(), outcome);
                match server.put_result(&request.result_id, &answer).await {
                    Ok(()) => {
                        counters.answered.fetch_add(1, Ordering::Relaxed);
                        if protocol::exception_of(&answer).is_some() {
                            counters.exceptions.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(error) => {
                        counters.publish_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(result_id = %request.result_id, %error, "could not publish a result");
                    }
                }
                drop(permit);
            }, span));
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// Closes the connection; requests taken and not answered go back to the queue.
    pub async fn close(self) {
        self.consumer_task.abort();
        self.link.close().await;
    }
}

/// The type that requests of unregistered types count under.
pub const UNKNOWN_TYPE: &str = "_unknown";

/// The `traceparent` AMQP header of a delivery, when it has one as text.
fn traceparent_of(properties: &lapin::BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(rylm_message::trace::TRACEPARENT)? {
        lapin::types::AMQPValue::LongString(text) => Some(text.to_string()),
        lapin::types::AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// Consumes the request queue, reconnecting after a loss (for as long as the settings allow)
/// and opening the consumer again whenever the broker ends it, and forwards well-formed
/// requests.
async fn consume_requests(
    link: Arc<Link>,
    sender: mpsc::Sender<Incoming>,
    counters: Arc<ServerCounters>,
) {
    let mut backoff = RETRY_FIRST;
    let mut opened_before = false;
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let opened = async {
            // Waits for a connection as long as the settings allow; each step after it is a
            // broker round trip on a live connection, bounded by `connect_timeout`.
            let (channel, generation) = link.channel().await?;
            let steps = async {
                link.declare_topology(&channel).await?;
                channel
                    .basic_qos(link.settings.prefetch, BasicQosOptions::default())
                    .await
                    .map_err(Error::amqp("basic.qos"))?;
                channel
                    .basic_consume(
                        link.settings.request_exchange().as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(Error::amqp("basic.consume (request)"))
            };
            let limit = link.settings.connect_timeout;
            let consumer = set_up(&channel, limit, "consuming the request queue", steps).await?;
            Ok::<_, Error>((channel, consumer, generation))
        };
        let (channel, mut consumer, generation) = match opened.await {
            Ok(opened) => {
                backoff = RETRY_FIRST;
                opened
            }
            Err(error @ (Error::Unreachable { .. } | Error::AccessRefused { .. })) => {
                // The link gave up (a `reconnect_for` was set and passed), or we are refused.
                tracing::error!(%error, "cannot consume requests; the server stops taking them");
                return;
            }
            Err(error) => {
                if warned.is_none_or(|at| at.elapsed() >= RETRY_WARN_EVERY) {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(%error, "cannot consume requests yet; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                if sender.is_closed() {
                    return;
                }
                continue;
            }
        };
        tracing::info!(generation, "consuming requests");
        if std::mem::replace(&mut opened_before, true) {
            counters.consumer_restarts.fetch_add(1, Ordering::Relaxed);
        }
        counters.consuming.store(true, Ordering::Relaxed);
        let mut watch = tokio::time::interval(CONNECTION_CHECK);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = watch.tick() => {
                    if !link.is_current(&channel, generation) {
                        tracing::warn!("the request channel is gone; consuming again");
                        break;
                    }
                    continue;
                }
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(%error, "request consumer failed; reconnecting");
                    break;
                }
                None => break,
            };
            match protocol::decode_request(&delivery.data) {
                Ok(body) => {
                    counters.taken.fetch_add(1, Ordering::Relaxed);
                    let incoming = Incoming {
                        request: Request {
                            type_: body.type_.trim().to_owned(),
                            result_id: body.result_id,
                            data: body.data,
                            traceparent: traceparent_of(&delivery.properties),
                        },
                        acker: delivery.acker,
                        generation,
                        // Transient only when the caller said so (rylm's `call`, which
                        // publishes again whatever a broker restart loses while it waits).
                        persistent: delivery.properties.delivery_mode() != &Some(1),
                    };
                    if sender.send(incoming).await.is_err() {
                        close_channel(&channel, "server dropped", link.settings.connect_timeout)
                            .await;
                        return;
                    }
                }
                Err(error) => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    // Not requeued: it would only come back malformed.
                    tracing::warn!(%error, body = %String::from_utf8_lossy(&delivery.data), "rejecting a malformed request");
                    let _ = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await;
                }
            }
        }
        counters.consuming.store(false, Ordering::Relaxed);
        // Requests taken on it and not settled go back to the queue with it.
        close_channel(&channel, "consuming again", link.settings.connect_timeout).await;
        if sender.is_closed() {
            return;
        }
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;
type Handler = Arc<dyn Fn(Value) -> HandlerFuture + Send + Sync>;

/// Functions by request type, for [`Server::serve`].
///
/// ```
/// use rylm_syrpc::Handlers;
/// let handlers = Handlers::new()
///     .on("echo", |data| async move { Ok::<_, String>(data) })
///     .on("len", |data| async move {
///         let text = data.as_str().ok_or("expected a string")?;
///         Ok::<_, &str>(serde_json::json!(text.chars().count()))
///     });
/// assert!(handlers.types().any(|t| t == "echo"));
/// ```
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Handler>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Handlers {
    /// No handlers.
    pub fn new() -> Self {
        Handlers::default()
    }

    /// Serves `type_` with `handler`; an `Err` is answered as an `exception` result.
    pub fn on<F, Fut, E>(mut self, type_: &str, handler: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let handler = Arc::new(handler);
        self.map.insert(
            type_.trim().to_owned(),
            Arc::new(move |data| {
                let handler = handler.clone();
                Box::pin(async move { handler(data).await.map_err(|e| e.to_string()) })
            }),
        );
        self
    }

    /// The registered types.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The result data for `request`: the handler's value, or an `exception` for an unknown
    /// type, an error, a panic, or a handler that ran past the default limit of 5 minutes.
    pub async fn run(&self, request: &Request) -> Value {
        self.run_within(request, DEFAULT_HANDLER_LIMIT).await
    }

    /// [`Handlers::run`], the handler stopped and answered with an `exception` after `limit`.
    pub async fn run_within(&self, request: &Request, limit: Duration) -> Value {
        self.run_counted(request, limit).await.0
    }

    /// [`Handlers::run_within`], and how the call ended, for the counters.
    async fn run_counted(&self, request: &Request, limit: Duration) -> (Value, Outcome) {
        let Some(handler) = self.map.get(&request.type_) else {
            let mut known: Vec<&str> = self.types().collect();
            known.sort_unstable();
            let exception = protocol::exception(format!(
                "unknown request type {:?} (this server knows {})",
                request.type_,
                known.join(", ")
            ));
            return (exception, Outcome::Error(ErrorKind::Unknown));
        };
        // A panic is caught and answered instead of killing the loop; no task of its own (the
        // caller already runs in one), so no hop between threads.
        let run = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(handler(
            request.data.clone(),
        )));
        let joined = match tokio::time::timeout(limit, run).await {
            Ok(joined) => joined,
            Err(_) => {
                tracing::warn!(type_ = %request.type_, ?limit, "a SyRPC handler ran past its limit; stopped");
                let exception = protocol::exception(format!(
                    "the handler of {:?} ran past its limit of {limit:?}",
                    request.type_
                ));
                return (exception, Outcome::Error(ErrorKind::TimedOut));
            }
        };
        match joined {
            Ok(Ok(value)) => (value, Outcome::Ok),
            Ok(Err(message)) => (
                protocol::exception(message),
                Outcome::Error(ErrorKind::Failed),
            ),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                tracing::error!(type_ = %request.type_, %message, "a SyRPC handler panicked");
                let exception = protocol::exception(format!(
                    "the handler of {:?} panicked: {message}",
                    request.type_
                ));
                (exception, Outcome::Error(ErrorKind::Panicked))
            }
        }
    }
}
