//! The one error type of this crate.

use std::time::Duration;

/// Everything a service or a caller can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A route's path pattern is not a valid regular expression.
    #[error("invalid route pattern {pattern:?}: {reason}")]
    InvalidRoute {
        /// The pattern.
        pattern: String,
        /// What the regex parser said.
        reason: String,
    },

    /// A method name that is none of the eight.
    #[error(
        "unknown method {0:?} (expected get, post, put, delete, options, connect, response or request)"
    )]
    UnknownMethod(String),

    /// A ZeroMQ socket failed (bind, connect, send, a bad key).
    #[error(transparent)]
    Transport(#[from] rylm_transport::Error),

    /// A frame could not be read.
    #[error("malformed frame: {0}")]
    Malformed(String),

    /// A frame's MAC does not match: the peer uses another secret, or the frame was altered.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),

    /// The request was seen before, or its timestamp is outside the accepted window.
    #[error("replayed or stale request: {0}")]
    Replayed(String),

    /// No service is registered under this name.
    #[error("no service is registered as {0:?}")]
    UnknownService(String),

    /// No instance of the service answered heartbeats before the deadline.
    #[error("no live instance of service {service:?} within {waited:?}")]
    NoLiveInstance {
        /// The service.
        service: String,
        /// How long the call waited for one.
        waited: Duration,
    },

    /// The instance that had the call stopped answering heartbeats.
    #[error(
        "the instance at {address} stopped answering (no heartbeat for {silent_for:?}); the call failed"
    )]
    InstanceDead {
        /// The instance's address.
        address: String,
        /// How long it had been silent.
        silent_for: Duration,
    },

    /// Every live instance answered that it is at capacity (`503 busy`): retry later, or add
    /// instances. Unlike [`Error::InstanceDead`], the instances are alive.
    #[error("every live instance of {service} is busy (503); the call did not run")]
    Busy {
        /// The service.
        service: String,
    },

    /// The service refused the caller's credentials (wrong shared secret).
    #[error("the service at {address} refused the call: 401 {reason}")]
    Refused {
        /// The instance's address.
        address: String,
        /// The service's explanation.
        reason: String,
    },

    /// No response came before the deadline.
    #[error("no response to {path} within {waited:?}")]
    Timeout {
        /// The request's path.
        path: String,
        /// The deadline that passed.
        waited: Duration,
    },

    /// The client was shut down while the call waited.
    #[error("the service client was shut down")]
    Closed,
}
