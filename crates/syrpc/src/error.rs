//! The one error type of this crate.

use std::time::Duration;

use serde_json::Value;

use crate::ResultId;

/// Everything a SyRPC client or server can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings cannot work.
    #[error("invalid SyRPC settings: {0}")]
    InvalidSettings(String),

    /// The broker could not be reached within the allowed time.
    #[error("cannot reach the AMQP broker at {url} (tried for {tried_for:?}): {reason}")]
    Unreachable {
        /// The broker's URL, password redacted.
        url: String,
        /// How long connecting was tried.
        tried_for: Duration,
        /// The last failure.
        reason: String,
    },

    /// The broker refused the credentials or the virtual host.
    #[error("the AMQP broker at {url} refused the login: {reason}")]
    AccessRefused {
        /// The broker's URL, password redacted.
        url: String,
        /// What the broker said.
        reason: String,
    },

    /// An AMQP operation failed.
    #[error("AMQP operation {operation} failed: {source}")]
    Amqp {
        /// What was being done.
        operation: &'static str,
        /// The client library's error.
        #[source]
        source: lapin::Error,
    },

    /// The broker did not confirm a published message.
    #[error("the broker did not accept the {what} (negative confirm)")]
    NotConfirmed {
        /// What was published.
        what: &'static str,
    },

    /// The broker did not confirm a publish in time (a memory or disk alarm blocks
    /// publishers), or the publish could not be done within its deadline.
    #[error("the broker did not confirm the {what} within {waited:?}")]
    PublishTimeout {
        /// What was published.
        what: &'static str,
        /// The deadline that passed.
        waited: Duration,
    },

    /// The broker did not answer an operation in time.
    #[error("the AMQP broker did not answer {operation} within {waited:?}")]
    BrokerTimeout {
        /// What was being done.
        operation: &'static str,
        /// The deadline that passed.
        waited: Duration,
    },

    /// The broker could not route a message (published `mandatory`) to any queue, even after
    /// its queue was declared again.
    #[error(
        "the broker could not route the {what} (exchange {exchange}, routing key {routing_key})"
    )]
    Unroutable {
        /// What was published.
        what: &'static str,
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },

    /// A message on the wire is not valid SyRPC.
    #[error("malformed SyRPC {what}: {reason}")]
    Malformed {
        /// A request or a result.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A value could not be encoded as JSON.
    #[error("cannot encode the data as JSON: {0}")]
    Encode(String),

    /// No result came before the deadline.
    #[error("no result for {result_id} within {waited:?}")]
    Timeout {
        /// The result waited for.
        result_id: ResultId,
        /// The deadline that passed.
        waited: Duration,
    },

    /// No request came before the deadline (server side).
    #[error("no request within {0:?}")]
    NoRequest(Duration),

    /// The server answered with an exception.
    #[error("the server reported an error for {result_id}: {exception}")]
    Remote {
        /// The request it answers.
        result_id: ResultId,
        /// The `exception` member of the result's data.
        exception: Value,
    },

    /// The client or server was shut down while the call was waiting.
    #[error("the SyRPC {0} was shut down")]
    Closed(&'static str),
}

impl Error {
    pub(crate) fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> Error {
        move |source| Error::Amqp { operation, source }
    }

    /// True when the broker said NOT_FOUND: an exchange or queue we count on is gone.
    pub(crate) fn is_not_found(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        match self {
            Error::Amqp { source, .. } => matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(e)
                    if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
            ),
            _ => false,
        }
    }

    /// True for failures that a new connection may cure: I/O and connection failures, and a
    /// hard (connection-level) AMQP error, such as the broker closing every connection when it
    /// stops (CONNECTION_FORCED); not a soft (channel-level) refusal of one operation.
    pub(crate) fn is_connection_loss(&self) -> bool {
        use lapin::protocol::AMQPErrorKind;
        match self {
            Error::Amqp { source, .. } => match source.kind() {
                lapin::ErrorKind::ProtocolError(e) => matches!(e.kind(), AMQPErrorKind::Hard(_)),
                _ => true,
            },
            Error::Unreachable { .. } => true,
            _ => false,
        }
    }
}
