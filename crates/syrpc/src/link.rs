//! The connection to the broker: connecting, reconnecting after a loss, declaring the topology
//! the peers expect, and publishing with confirms.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::Error;
use crate::protocol::{CONTENT_ENCODING, CONTENT_TYPE, Settings, redact};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One message to publish.
pub(crate) struct Outgoing<'a> {
    /// What it is, for errors and logs: "request" or "result".
    pub(crate) what: &'static str,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) body: &'a [u8],
    /// A per-message time to live.
    pub(crate) expiration: Option<Duration>,
    /// The result queue to declare first, for results.
    pub(crate) bucket: Option<u32>,
}

/// One live connection and the channels made on it.
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
    generation: std::sync::atomic::AtomicU64,
    /// Result queues declared on the current connection.
    declared_buckets: std::sync::Mutex<(u64, HashSet<u32>)>,
}

impl Link {
    /// Connects, or fails after `connect_timeout` with [`Error::Unreachable`] or at once with
    /// [`Error::AccessRefused`].
    pub(crate) async fn connect(settings: Settings) -> Result<Arc<Link>, Error> {
        settings.validate()?;
        let link = Arc::new(Link {
            settings: Arc::new(settings),
            live: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            declared_buckets: std::sync::Mutex::new((0, HashSet::new())),
        });
        let within = link.settings.connect_timeout;
        link.live_connection(within).await?;
        Ok(link)
    }

    /// The current connection and its generation, reconnecting (for up to `within`) when it
    /// was lost.
    async fn live_connection(
        &self,
        within: Duration,
    ) -> Result<(Arc<Connection>, Channel, u64), Error> {
        let mut live = self.live.lock().await;
        if let Some(current) = live.as_ref() {
            if current.connection.status().connected() && current.publisher.status().connected() {
                return Ok((
                    current.connection.clone(),
                    current.publisher.clone(),
                    current.generation,
                ));
            }
            tracing::warn!(url = %redact(&self.settings.url), "AMQP connection lost; reconnecting");
        }
        *live = None;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.open().await {
                Ok(fresh) => {
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
                    if started.elapsed() + backoff > within {
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
                    tracing::debug!(%error, "AMQP connect failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn open(&self) -> Result<Live, Error> {
        let url = &self.settings.url;
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
        let publisher = connection
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Error::amqp("confirm.select"))?;
        declare_topology(&publisher, &self.settings).await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
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
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::amqp("channel.open"))?;
        Ok((channel, generation))
    }

    /// The generation of the live connection, without reconnecting.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Declares result queue `bucket` (once per connection) on `channel`.
    pub(crate) async fn ensure_bucket(
        &self,
        channel: &Channel,
        generation: u64,
        bucket: u32,
    ) -> Result<(), Error> {
        {
            let declared = self
                .declared_buckets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if declared.0 == generation && declared.1.contains(&bucket) {
                return Ok(());
            }
        }
        declare_bucket(channel, &self.settings, bucket).await?;
        let mut declared = self
            .declared_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if declared.0 != generation {
            *declared = (generation, HashSet::new());
        }
        declared.1.insert(bucket);
        Ok(())
    }

    /// Publishes one JSON message and waits for the broker's confirm, reconnecting and
    /// retrying while the connection is down (for up to `reconnect_for`).
    pub(crate) async fn publish(&self, message: Outgoing<'_>) -> Result<(), Error> {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.publish_once(&message).await {
                Err(error)
                    if error.is_connection_loss()
                        && started.elapsed() < self.settings.reconnect_for =>
                {
                    tracing::warn!(%error, "publishing the {} failed; retrying after reconnecting", message.what);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                other => return other,
            }
        }
    }

    async fn publish_once(&self, message: &Outgoing<'_>) -> Result<(), Error> {
        let (_, publisher, generation) = self.live_connection(self.settings.reconnect_for).await?;
        if let Some(bucket) = message.bucket {
            self.ensure_bucket(&publisher, generation, bucket).await?;
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding(CONTENT_ENCODING.into())
            .with_delivery_mode(2);
        if let Some(ttl) = message.expiration {
            properties = properties.with_expiration(ttl.as_millis().to_string().into());
        }
        let confirm = publisher
            .basic_publish(
                message.exchange.into(),
                message.routing_key.into(),
                BasicPublishOptions::default(),
                message.body,
                properties,
            )
            .await
            .map_err(Error::amqp("basic.publish"))?
            .await
            .map_err(Error::amqp("publisher confirm"))?;
        if confirm.is_nack() {
            return Err(Error::NotConfirmed { what: message.what });
        }
        Ok(())
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        if let Some(live) = self.live.lock().await.take() {
            let _ = live.connection.close(200, "closing".into()).await;
        }
    }
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
            FieldTable::default(),
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
    let mut arguments = FieldTable::default();
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
