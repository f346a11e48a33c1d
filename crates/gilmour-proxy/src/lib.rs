//! Gilmour over Redis, and the HTTP proxy that lets a program in any language join it.
//!
//! **The protocol.** Gilmour is request/reply and signals/slots on Redis pub/sub, spoken by
//! engines in Go and Ruby. This crate speaks it on the wire as they do: the channels and JSON
//! envelope, a response channel per request subscribed before the request is published, the
//! subscriber-count check that answers 404 when nobody listens, exclusion groups through a
//! Redis lock key, wildcard slots, health pings, error records, deadlines and handler timeouts.
//! A Rust node offers `reply_to`, `slot`, `request`, `signal` and the compositions (`pipe`,
//! `andand`, `oror`, `batch`, `parallel`).
//!
//! **The proxy.** An HTTP server through which a node written in any language registers its
//! services and slots, publishes requests and signals, and is called back on its own HTTP
//! endpoints, with a health watchdog that takes an unresponsive node's subscriptions away until
//! it answers again.
//!
//! The protocol logic (envelopes, lock keys, topic names, composition semantics) is plain data,
//! tested in memory; the Redis I/O is on `fred`, tested against a real Redis. This crate is
//! being built: [`protocol`] is here, checked against a recorded trace of the Go engine, and
//! [`engine`] answers and sends requests (exclusion groups, 404, timeouts) and signals slots
//! (wildcard patterns, grouped slots under the lock), and joins the health registry, on a real
//! Redis; error records, compositions and the proxy arrive with the rest of the issue.
#![warn(missing_docs)]

pub mod api;
pub mod compose;
pub mod engine;
pub mod metrics;
pub mod protocol;
pub mod proxy;

/// What can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A topic was empty.
    #[error("a Gilmour topic cannot be empty")]
    EmptyTopic,
    /// A service was registered under a pattern; only slots take patterns.
    #[error("services answer one topic, not a pattern: {0:?} has a wildcard (slots may)")]
    WildcardService(String),
    /// A service without an exclusion group.
    #[error("the service {0:?} needs an exclusion group")]
    NoGroup(String),
    /// A second service for a topic this node already serves.
    #[error("this node already serves {0:?}")]
    AlreadyServed(String),
    /// The proxy could not listen.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Redis refused or failed a step.
    #[error("Redis, {what}: {message}")]
    Redis {
        /// The step.
        what: &'static str,
        /// What Redis or the connection said.
        message: String,
    },
}
