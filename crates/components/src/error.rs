//! The one error type of this crate.

use std::time::Duration;

/// Everything a part, a server or a client can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport refused or failed (a send timeout, a closed socket, a bad key).
    #[error(transparent)]
    Transport(#[from] rylm_transport::Error),

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

    /// The connection to the server was lost while the call was pending. The call may or may
    /// not have run; later calls go through once the server is back.
    #[error("the server at {address} went away while the call was pending")]
    ServerGone {
        /// The server's address.
        address: String,
    },

    /// An address cannot be used as it is.
    #[error("the address {address} cannot be used: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },

    /// The client or server was closed.
    #[error("closed")]
    Closed,
}
