//! Gilmour over Redis: request/reply and signals/slots, wire-compatible with the Go and Ruby
//! engines. No HTTP here: the proxy that lets other languages join is `rylm-gilmour-proxy`.
//!
//! **The protocol.** Gilmour is request/reply and signals/slots on Redis pub/sub. This crate
//! speaks it on the wire as the engines do: the channels and JSON envelope, a response channel
//! per request subscribed before the request is published, the subscriber-count check that
//! answers 404 when nobody listens, exclusion groups through a Redis lock key, wildcard slots,
//! health pings answered with the node's subscriptions, error records, deadlines and handler
//! timeouts. A [`node::Node`] offers `reply_to`, `slot`, `request`, `signal` and the
//! compositions (`pipe`, `andand`, `oror`, `batch`, `parallel`).
//!
//! **Layout.** The protocol logic (envelopes, lock keys, topic names, senders, composition
//! semantics) is plain data, tested in memory ([`protocol`], [`compose`]); the Redis I/O is on
//! `fred` ([`node`]), tested against a real Redis, a Sentinel-watched pair and a three-primary
//! cluster. A recorded trace of the Go engine is replayed against rylm under Redis's `MONITOR`:
//! the same commands, the same payloads.
//!
//! **What a node keeps.** Everything in flight has an owner: a request that is cancelled
//! (dropped before its answer) frees its pending entry and its subscription; handlers are bounded
//! twice, by how many run and by how many wait; the health registration and every subscription
//! are made again after Redis comes back; a dropped node stops.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rylm_gilmour::Error> {
//! use std::time::Duration;
//! use rylm_gilmour::node::Node;
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
#![warn(missing_docs)]

pub mod compose;
pub mod node;
pub mod protocol;
mod sentinel;
mod serve;

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
    /// Redis refused or failed a step.
    #[error("Redis, {what}: {message}")]
    Redis {
        /// The step.
        what: &'static str,
        /// What Redis or the connection said.
        message: String,
    },
}
