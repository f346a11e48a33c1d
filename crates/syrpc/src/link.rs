//! The connection to the broker: connecting, reconnecting after a loss, declaring the topology
//! the peers expect, and publishing with confirms.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::Error;
use crate::protocol::{CONTENT_ENCODING, CONTENT_TYPE, QueueType, Settings, redact};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// While reconnecting, at most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// A result queue is declared again when its last declaration is this old (and at most a
/// quarter of its `x-expires`), so that a queue the broker deleted while we were not looking
/// comes back before results are routed nowhere.
const REDECLARE_EVERY: Duration = Duration::from_secs(60);
/// How often an unroutable result is declared-for and published again before it is an error.
const UNROUTABLE_RETRIES: u32 = 3;
/// How often a publish whose confirm did not come within `confirm_timeout` is made again on
/// a new channel before it is an error. A quorum queue whose leader died may never confirm
/// what it was handed then; a broker under an alarm confirms nothing until the alarm ends, and
/// every retry leaves one more copy behind, hence a small bound.
const UNCONFIRMED_RETRIES: u32 = 1;

/// One message to publish.
pub(crate) struct Outgoing<'a> {
    /// What it is, for errors and logs: "request" or "result".
    pub(crate) what: &'static str,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) body: &'a [u8],
    /// A per-message time to live.
    pub(crate) expiration: Option<Duration>,
    /// The result queue to declare first, for results (which are then published `mandatory`:
    /// a result the broker cannot route comes back, and its queue is declared again).
    pub(crate) bucket: Option<u32>,
    /// A result a client forwards to the client that waits for it (see the client's module
    /// documentation): published `mandatory` and transient, to the private queue of whoever
    /// bound its id, and never retried when nobody did.
    pub(crate) forward: bool,
    /// Persistent (delivery mode 2: written to disk, survives a broker restart) or transient
    /// (mode 1: kept in memory; whoever waits for it publishes again after a reconnection).
    pub(crate) persistent: bool,
    /// W3C trace context, sent as the AMQP header `traceparent` (the Python and JavaScript
    /// packages ignore headers they do not know).
    pub(crate) traceparent: Option<&'a str>,
}

/// `{app}_rylm_by_id`: the direct exchange through which a client forwards a result it took
/// from a shared result queue to the client that waits for it (bound by result id). rylm's
/// own; the published peers neither declare nor use it.
pub(crate) fn forward_exchange(settings: &Settings) -> String {
    format!("{}_rylm_by_id", settings.app_name)
}

/// One live connection and the channel made on it for publishing.
struct Live {
    connection: Arc<Connection>,
    /// A channel in confirm mode for publishing.
    publisher: Channel,
    /// Bumped on every new connection; channels of older generations are dead.
    generation: u64,
}

/// The shared connection of a client or server.
pub(crate) struct Link {
    pub(crate) settings: Arc<Settings>,
    live: Mutex<Option<Live>>,
    /// Result queues declared on the current connection, and when.
    declared_buckets: std::sync::Mutex<(u64, HashMap<u32, Instant>)>,
    /// The node (of `Settings::urls`) to try first: the last one that answered.
    preferred: std::sync::atomic::AtomicUsize,
    /// The generation of the newest connection, bumped on every new one: channels of older
    /// generations are dead, and whoever must act when a connection is replaced watches it.
    generations: tokio::sync::watch::Sender<u64>,
}

impl Link {
    /// Connects, or fails after `connect_timeout` with [`Error::Unreachable`] or at once with
    /// [`Error::AccessRefused`].
    pub(crate) async fn connect(settings: Settings) -> Result<Arc<Link>, Error> {
        settings.validate()?;
        let link = Arc::new(Link {
            settings: Arc::new(settings),
            live: Mutex::new(None),
            declared_buckets: std::sync::Mutex::new((0, HashMap::new())),
            preferred: std::sync::atomic::AtomicUsize::new(0),
            generations: tokio::sync::watch::Sender::new(0),
        });
        let within = link.settings.connect_timeout;
        link.live_connection(Some(within)).await?;
        Ok(link)
    }

    /// The current connection, its publishing channel and its generation: a new channel when
    /// only the channel was closed (a channel error), a new connection (for up to `give_up_after`,
    /// `None`: as long as it takes) when the connection was lost.
    async fn live_connection(
        &self,
        give_up_after: Option<Duration>,
    ) -> Result<(Arc<Connection>, Channel, u64), Error> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_mut() {
            if current.connection.status().connected() {
                if current.publisher.status().connected() {
                    return Ok((
                        current.connection.clone(),
                        current.publisher.clone(),
                        current.generation,
                    ));
                }
                // A channel error closes the channel, not the connection: a new channel on
                // the same connection, whose consumers go on.
                tracing::info!("the AMQP publishing channel was closed; opening another");
                let reopening = publishing_channel(&current.connection);
                match within(self.settings.connect_timeout, "channel.open", reopening).await {
                    Ok(publisher) => {
                        current.publisher = publisher;
                        return Ok((
                            current.connection.clone(),
                            current.publisher.clone(),
                            current.generation,
                        ));
                    }
                    Err(error) => tracing::warn!(%error, "cannot open a channel; reconnecting"),
                }
            }
            tracing::warn!(url = %redact(&self.settings.url), "AMQP connection lost; reconnecting");
        }
        *live = None;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut warned: Option<Instant> = None;
        let mut failures = 0u64;
        loop {
            match self.open().await {
                Ok(fresh) => {
                    if failures > 0 {
                        tracing::info!(after = ?started.elapsed(), failures, "reconnected to the AMQP broker");
                    }
                    let result = (
                        fresh.connection.clone(),
                        fresh.publisher.clone(),
                        fresh.generation,
                    );
                    *live = Some(fresh);
                    return Ok(result);
                }
                Err(error @ Error::AccessRefused { .. })
                | Err(error @ Error::InvalidSettings(_)) => return Err(error),
                Err(error) => {
                    failures += 1;
                    if give_up_after.is_some_and(|limit| started.elapsed() + backoff > limit) {
                        let reason = match error {
                            Error::Unreachable { reason, .. } => reason,
                            other => other.to_string(),
                        };
                        return Err(Error::Unreachable {
                            url: redact(&self.settings.url),
                            tried_for: started.elapsed(),
                            reason,
                        });
                    }
                    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        warned = Some(Instant::now());
                        tracing::warn!(%error, down_for = ?started.elapsed(), failures, "the AMQP broker is unreachable; still trying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Connects to the first node that answers, starting with the preferred one.
    async fn open(&self) -> Result<Live, Error> {
        let urls: Vec<&str> = self.settings.urls().collect();
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % urls.len();
        let mut last_error = None;
        for offset in 0..urls.len() {
            let index = (first + offset) % urls.len();
            match self.open_at(urls[index]).await {
                Ok(live) => {
                    self.preferred
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    return Ok(live);
                }
                Err(error @ Error::AccessRefused { .. }) => return Err(error),
                Err(error) => {
                    if urls.len() > 1 {
                        tracing::debug!(url = %redact(urls[index]), %error, "AMQP node unreachable; trying the next");
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::InvalidSettings("no broker URL".into())))
    }

    async fn open_at(&self, url: &str) -> Result<Live, Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("rylm-syrpc {}", self.settings.app_name).into());
        let attempt = tokio::time::timeout(
            self.settings.connect_timeout,
            Connection::connect(url, properties),
        );
        let connection = match attempt.await {
            Err(_) => {
                return Err(Error::Unreachable {
                    url: redact(url),
                    tried_for: self.settings.connect_timeout,
                    reason: "the connection attempt did not finish".into(),
                });
            }
            Ok(Err(error)) => return Err(classify_connect_error(url, error)),
            Ok(Ok(connection)) => Arc::new(connection),
        };
        let setup = async {
            let publisher = publishing_channel(&connection).await?;
            declare_topology(&publisher, &self.settings).await?;
            Ok(publisher)
        };
        let publisher = match within(
            self.settings.connect_timeout,
            "declaring the topology",
            setup,
        )
        .await
        {
            Ok(publisher) => publisher,
            Err(error) => {
                // Not left open behind us: a half-set-up connection is closed, within a bound.
                let limit = self.settings.connect_timeout;
                tokio::spawn(
                    async move { close_connection(&connection, "setup failed", limit).await },
                );
                return Err(error);
            }
        };
        let mut generation = 0;
        self.generations.send_modify(|newest| {
            *newest += 1;
            generation = *newest;
        });
        tracing::info!(url = %redact(url), generation, "connected to the AMQP broker");
        Ok(Live {
            connection,
            publisher,
            generation,
        })
    }

    /// A new channel on the live connection, and the connection's generation.
    pub(crate) async fn channel(&self) -> Result<(Channel, u64), Error> {
        let (connection, _, generation) = self.live_connection(self.settings.reconnect_for).await?;
        let channel = within(self.settings.connect_timeout, "channel.open", async {
            connection
                .create_channel()
                .await
                .map_err(Error::amqp("channel.open"))
        })
        .await?;
        Ok((channel, generation))
    }

    /// Declares the request exchange, queue and binding and the result exchange again (one may
    /// have been deleted under a long-lived connection).
    pub(crate) async fn declare_topology(&self, channel: &Channel) -> Result<(), Error> {
        declare_topology(channel, &self.settings).await
    }

    /// The generation of the live connection, without reconnecting.
    pub(crate) fn generation(&self) -> u64 {
        *self.generations.borrow()
    }

    /// Whether `channel`, opened on the connection of `generation`, is still open on the live
    /// connection: a consumer on a connection that is gone may never say so itself.
    pub(crate) fn is_current(&self, channel: &Channel, generation: u64) -> bool {
        channel.status().connected() && self.generation() == generation
    }

    /// Follows the generation of the live connection: it changes when a new connection
    /// replaces a lost one.
    pub(crate) fn watch_generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generations.subscribe()
    }

    /// Declares result queue `bucket` on `channel`, unless it was declared on this connection
    /// a short while ago.
    pub(crate) async fn ensure_bucket(
        &self,
        channel: &Channel,
        generation: u64,
        bucket: u32,
    ) -> Result<(), Error> {
        let fresh_for = REDECLARE_EVERY.min(self.settings.ttl / 4);
        {
            let declared = self
                .declared_buckets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if declared.0 == generation
                && declared
                    .1
                    .get(&bucket)
                    .is_some_and(|at| at.elapsed() < fresh_for)
            {
                return Ok(());
            }
        }
        declare_bucket(channel, &self.settings, bucket).await?;
        let mut declared = self
            .declared_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if declared.0 != generation {
            *declared = (generation, HashMap::new());
        }
        declared.1.insert(bucket, Instant::now());
        Ok(())
    }

    /// Forgets that `bucket` was declared (it was found missing).
    pub(crate) fn forget_bucket(&self, bucket: u32) {
        self.declared_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&bucket);
    }

    /// Publishes one JSON message and waits for the broker's confirm, reconnecting and
    /// retrying while the connection is down, for up to `deadline` (and `reconnect_for`).
    /// Returns the generation of the connection that confirmed it. A publish made again for
    /// want of a confirm is counted in `unconfirmed_retried` (the publisher's own counters).
    pub(crate) async fn publish(
        &self,
        message: Outgoing<'_>,
        deadline: Option<Duration>,
        unconfirmed_retried: &std::sync::atomic::AtomicU64,
    ) -> Result<u64, Error> {
        let started = Instant::now();
        let attempt = async {
            let mut backoff = FIRST_BACKOFF;
            let mut unroutable = 0;
            let mut unconfirmed = 0;
            loop {
                match self.publish_once(&message).await {
                    Err(Error::Unroutable { .. })
                        if message.bucket.is_some() && unroutable < UNROUTABLE_RETRIES =>
                    {
                        // The result queue is gone (expired, or deleted by hand): declare it
                        // again and publish again, rather than confirm a result routed nowhere.
                        unroutable += 1;
                        if let Some(bucket) = message.bucket {
                            tracing::warn!(
                                bucket,
                                "a result could not be routed; declaring its queue again"
                            );
                            self.forget_bucket(bucket);
                        }
                    }
                    Err(error) if error.is_not_found() && unroutable < UNROUTABLE_RETRIES => {
                        // An exchange is gone: declare everything again, on a new channel (the
                        // error closed the old one).
                        unroutable += 1;
                        tracing::warn!(%error, "publishing the {} found an exchange missing; declaring the topology again", message.what);
                        let (_, publisher, _) =
                            self.live_connection(self.settings.reconnect_for).await?;
                        declare_topology(&publisher, &self.settings).await?;
                        self.declared_buckets
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .1
                            .clear();
                    }
                    Err(error @ Error::NotConfirmed { .. })
                        if self
                            .settings
                            .reconnect_for
                            .is_none_or(|limit| started.elapsed() < limit) =>
                    {
                        // A negative confirm: a quorum queue between two leaders refuses for a
                        // moment, and a channel that published to it then may go on refusing
                        // after the new leader is there. Publish again on a new channel.
                        tracing::debug!(%error, "the broker refused the {}; retrying on a new channel", message.what);
                        self.discard_publisher().await;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(error @ Error::PublishTimeout { .. })
                        if unconfirmed < UNCONFIRMED_RETRIES =>
                    {
                        // No confirm, neither positive nor negative: the broker may or may not
                        // have the message. Publish it again on a new channel; the message may
                        // then arrive twice, which at-least-once delivery allows.
                        unconfirmed += 1;
                        unconfirmed_retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(%error, "publishing the {} again on a new channel; it may arrive twice", message.what);
                        self.discard_publisher().await;
                    }
                    Err(error)
                        if error.is_connection_loss()
                            && self
                                .settings
                                .reconnect_for
                                .is_none_or(|limit| started.elapsed() < limit) =>
                    {
                        tracing::debug!(%error, "publishing the {} failed; retrying after reconnecting", message.what);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    other => return other,
                }
            }
        };
        match deadline {
            None => attempt.await,
            Some(limit) => {
                tokio::time::timeout(limit, attempt)
                    .await
                    .map_err(|_| Error::PublishTimeout {
                        what: message.what,
                        waited: limit,
                    })?
            }
        }
    }

    async fn publish_once(&self, message: &Outgoing<'_>) -> Result<u64, Error> {
        let (_, publisher, generation) = self.live_connection(self.settings.reconnect_for).await?;
        if let Some(bucket) = message.bucket {
            self.ensure_bucket(&publisher, generation, bucket).await?;
        }
        publish_on(&publisher, message, self.settings.confirm_timeout).await?;
        Ok(generation)
    }

    /// Closes the publishing channel, so that the next publish opens another.
    async fn discard_publisher(&self) {
        let live = self.live.lock().await;
        if let Some(current) = live.as_ref() {
            let limit = self.settings.connect_timeout;
            close_channel(&current.publisher, "refused a publish", limit).await;
        }
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        if let Some(live) = self.live.lock().await.take() {
            close_connection(&live.connection, "closing", self.settings.connect_timeout).await;
        }
    }
}

/// `operation` within `limit`, or [`Error::BrokerTimeout`].
pub(crate) async fn within<T>(
    limit: Duration,
    operation: &'static str,
    run: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| Error::BrokerTimeout {
            operation,
            waited: limit,
        })?
}

/// Closes `channel`, waiting up to `limit` for the broker's close-ok (a dead connection may
/// never send it).
pub(crate) async fn close_channel(channel: &Channel, reason: &str, limit: Duration) {
    let _ = tokio::time::timeout(limit, channel.close(200, reason.into())).await;
}

/// Closes `connection`, waiting up to `limit` for the broker's close-ok.
async fn close_connection(connection: &Connection, reason: &str, limit: Duration) {
    let _ = tokio::time::timeout(limit, connection.close(200, reason.into())).await;
}

/// Runs `steps` (broker round trips setting up `channel`) within `limit`; on failure the
/// channel is closed (within the same bound), not left half set up.
pub(crate) async fn set_up<T>(
    channel: &Channel,
    limit: Duration,
    operation: &'static str,
    steps: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let outcome = within(limit, operation, steps).await;
    if outcome.is_err() {
        close_channel(channel, "cannot set up", limit).await;
    }
    outcome
}

/// Publishes `message` on `channel` (in confirm mode) and waits up to `limit` for the
/// broker's confirm.
pub(crate) async fn publish_on(
    channel: &Channel,
    message: &Outgoing<'_>,
    limit: Duration,
) -> Result<(), Error> {
    let mut properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_content_encoding(CONTENT_ENCODING.into())
        .with_delivery_mode(if message.persistent { 2 } else { 1 });
    if let Some(ttl) = message.expiration {
        properties = properties.with_expiration(ttl.as_millis().to_string().into());
    }
    if let Some(traceparent) = message.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            rylm_message::trace::TRACEPARENT.into(),
            AMQPValue::LongString(traceparent.into()),
        );
        properties = properties.with_headers(headers);
    }
    let mandatory = message.bucket.is_some() || message.forward;
    let confirm = channel
        .basic_publish(
            message.exchange.into(),
            message.routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            message.body,
            properties,
        )
        .await
        .map_err(Error::amqp("basic.publish"))?;
    let confirm = tokio::time::timeout(limit, confirm)
        .await
        .map_err(|_| Error::PublishTimeout {
            what: message.what,
            waited: limit,
        })?
        .map_err(Error::amqp("publisher confirm"))?;
    match confirm {
        Confirmation::Ack(Some(_)) if mandatory => Err(Error::Unroutable {
            what: message.what,
            exchange: message.exchange.to_owned(),
            routing_key: message.routing_key.to_owned(),
        }),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(Error::NotConfirmed { what: message.what }),
    }
}

/// A channel in confirm mode.
pub(crate) async fn publishing_channel(connection: &Connection) -> Result<Channel, Error> {
    let publisher = connection
        .create_channel()
        .await
        .map_err(Error::amqp("channel.open"))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(Error::amqp("confirm.select"))?;
    Ok(publisher)
}

fn classify_connect_error(url: &str, error: lapin::Error) -> Error {
    let text = error.to_string();
    let refused = matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
    ) || text.contains("ACCESS_REFUSED")
        || text.contains("NOT_ALLOWED")
        || text.to_ascii_lowercase().contains("auth");
    if refused {
        Error::AccessRefused {
            url: redact(url),
            reason: text,
        }
    } else {
        Error::Unreachable {
            url: redact(url),
            tried_for: Duration::ZERO,
            reason: text,
        }
    }
}

/// `x-queue-type` for quorum queues; nothing for classic ones (as the peers declare them).
fn queue_type_arguments(settings: &Settings) -> FieldTable {
    let mut arguments = FieldTable::default();
    if settings.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(QueueType::Quorum.as_str().into()),
        );
    }
    arguments
}

/// The request exchange, queue and binding, and the result exchange, as the peers declare them.
async fn declare_topology(channel: &Channel, settings: &Settings) -> Result<(), Error> {
    let request = settings.request_exchange();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            request.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("exchange.declare (request)"))?;
    channel
        .queue_declare(
            request.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            queue_type_arguments(settings),
        )
        .await
        .map_err(Error::amqp("queue.declare (request)"))?;
    channel
        .queue_bind(
            request.as_str().into(),
            request.as_str().into(),
            request.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("queue.bind (request)"))?;
    channel
        .exchange_declare(
            settings.result_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("exchange.declare (result)"))?;
    Ok(())
}

/// Result queue `bucket` with the peers' exact arguments, bound to the result exchange.
async fn declare_bucket(channel: &Channel, settings: &Settings, bucket: u32) -> Result<(), Error> {
    let queue = settings.result_queue(bucket);
    let (expires, message_ttl) = settings.result_queue_arguments();
    let mut arguments = queue_type_arguments(settings);
    arguments.insert("x-expires".into(), AMQPValue::LongInt(expires));
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(message_ttl));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(Error::amqp("queue.declare (result)"))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            settings.result_exchange().as_str().into(),
            bucket.to_string().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::amqp("queue.bind (result)"))?;
    Ok(())
}
