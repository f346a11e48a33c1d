//! The one error type of this crate.

use std::time::Duration;

/// Everything a socket, a key or an option can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be created, bound, connected, or could not send or receive.
    #[error("ZeroMQ {operation} on {address} failed: {reason}")]
    Socket {
        /// What was being done (`bind`, `connect`, `send`, `receive`, ...).
        operation: &'static str,
        /// The address involved (the socket's first address when none is more precise).
        address: String,
        /// The transport's own description.
        reason: String,
    },

    /// A send could not be handed to any peer within its deadline (no peer, or every peer's
    /// queue full).
    #[error("ZeroMQ send on {address}: no peer took the message within {waited:?}")]
    SendTimeout {
        /// The socket's address.
        address: String,
        /// How long the send waited.
        waited: Duration,
    },

    /// An outbox refused a message: as many as it holds already wait for the socket, whose
    /// peers take nothing.
    #[error("ZeroMQ send on {address}: {waiting} messages already wait for a peer to take them")]
    Backlog {
        /// The socket's address.
        address: String,
        /// How many wait.
        waiting: usize,
    },

    /// The socket was closed.
    #[error("the socket on {address} is closed")]
    Closed {
        /// The socket's address.
        address: String,
    },

    /// A CURVE key is not 40 Z85 characters of a 32-byte key, or a key file is unreadable.
    #[error("invalid CURVE key ({origin}): {reason}")]
    Key {
        /// Where the key came from (a file name, a variable name; never the key itself).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The options do not fit together (e.g. CURVE client without the server's key).
    #[error("invalid socket options: {0}")]
    Options(String),
}

impl Error {
    pub(crate) fn socket(
        operation: &'static str,
        address: &str,
    ) -> impl FnOnce(omq_tokio::Error) -> Error {
        let address = address.to_owned();
        move |e| match e {
            omq_tokio::Error::Closed => Error::Closed { address },
            other => Error::Socket {
                operation,
                address,
                reason: other.to_string(),
            },
        }
    }

    /// True when the socket is closed for good (a receive loop should stop).
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. })
    }
}
