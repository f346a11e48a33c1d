//! The one error type of this crate.

use std::time::Duration;

/// Everything a part, a server or a client can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not bind, connect, send or receive.
    #[error("ZeroMQ {operation} on {address} failed: {reason}")]
    Socket {
        /// What was being done.
        operation: &'static str,
        /// The address involved.
        address: String,
        /// The transport's error.
        reason: String,
    },

    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] rylm_message::Error),

    /// The router refused or lost a message.
    #[error(transparent)]
    Router(#[from] rylm_core_router::Error),

    /// The remote function failed; `kind` says how (`unknown-function`, `failed`, `panicked`).
    #[error("{function}: {kind}: {message}")]
    Remote {
        /// The function called.
        function: String,
        /// How it failed.
        kind: String,
        /// The failure's description.
        message: String,
    },

    /// No answer came before the deadline.
    #[error("no answer to {what} within {waited:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The deadline.
        waited: Duration,
    },

    /// The server does not match what the client expected.
    #[error("the server at {address} is not usable: {reason}")]
    Server {
        /// Its cache address.
        address: String,
        /// What is wrong.
        reason: String,
    },

    /// The client or server was closed.
    #[error("closed")]
    Closed,
}

impl Error {
    pub(crate) fn socket(
        operation: &'static str,
        address: &str,
    ) -> impl FnOnce(zeromq::ZmqError) -> Error {
        let address = address.to_owned();
        move |e| Error::Socket {
            operation,
            address,
            reason: e.to_string(),
        }
    }
}
