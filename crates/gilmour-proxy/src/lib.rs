//! The Gilmour proxy: an HTTP server through which a program in any language joins a Gilmour
//! network. A node registers its HTTP endpoints as services and slots, the proxy subscribes
//! for it on Redis and POSTs to those endpoints when requests and signals arrive, lets the node
//! publish requests, compositions and signals of its own, and watches its health.
//!
//! **Cost per node.** Every registered node's subscriptions are made on one Gilmour node of
//! the proxy ([`rylm_gilmour::node::Node`], two Redis connections, whatever the number of
//! nodes): a node costs its handlers, a watchdog task and its idle HTTP connections. Two nodes
//! serving one topic in one group take turns behind one lock, as two Gilmour processes share
//! the work. Everything of a deleted or `dirty` node is freed; a node that registers again from
//! the same host and port replaces its old registration.
//!
//! **Limits.** Connections, header and body time, body size, composition steps and depth,
//! timeouts, nodes, calls per node, and handlers running and waiting all have bounds
//! ([`ProxyConfig`]); past one the caller gets a 4xx or a 503 that says which.
//!
//! **Who may do what.** With an operator token every route but `/healthz` and `/metrics` needs
//! a bearer token: the operator's for everything, an optional registration token for
//! `POST /nodes` only, and each node's own token (given at registration) for that node's
//! routes only. No node may publish on `gilmour.response.*` or `gilmour.health.*`, so that no
//! node can answer in another's place.
//!
//! The HTTP API as plain data is [`api`]; the listener and routes [`server`]; the registry,
//! the watchdog and the calls to nodes are private modules.
//!
//! The proxy runs as `rylm gilmour-proxy` or the crate's own `rylm-gilmour-proxy` binary
//! (feature `bin`, on by default), or in a program through [`Proxy::start`].
#![warn(missing_docs)]

pub mod api;
mod calls;
mod config;
mod memory;
pub mod metrics;
mod registry;
pub mod server;
mod watchdog;

pub use config::{ProxyArgs, ProxyConfig};
pub use memory::without_thread_caches;
pub use server::{Proxy, run_until_stopped};

/// What can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Gilmour (Redis) refused or failed a step.
    #[error(transparent)]
    Gilmour(#[from] rylm_gilmour::Error),
    /// The proxy could not listen.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin listener could not start.
    #[error(transparent)]
    Admin(#[from] rylm_admin::Error),
    /// The options contradict each other.
    #[error("{0}")]
    Config(String),
}
