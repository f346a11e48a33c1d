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
//! tested in memory ([`protocol`], [`compose`], [`api`]); the Redis I/O is on `fred`
//! ([`engine`]) and the HTTP on `hyper` ([`proxy`]), tested against a real Redis and real HTTP
//! nodes. A recorded trace of the Go engine is replayed against rylm under Redis's `MONITOR`:
//! the same commands, the same payloads.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rylm_gilmour_proxy::Error> {
//! use std::time::Duration;
//! use rylm_gilmour_proxy::engine::Node;
//! use serde_json::{json, Value};
//!
//! let node = Node::connect("redis://127.0.0.1:6379").await?;
//! node.reply_to("echo", "echoers", Duration::from_secs(5), |data: Value| async move {
//!     Ok(json!({ "echo": data }))
//! })
//! .await?;
//! let reply = node.request("echo", json!("hi"), Duration::from_secs(2)).await?;
//! assert_eq!(reply.code(), 200);
//! node.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The proxy runs as `rylm gilmour-proxy` or the crate's own `rylm-gilmour-proxy` binary
//! (feature `bin`, on by default), or in a program through [`proxy::Proxy::start`].
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
