//! SyRPC: RPC for stateless backends over RabbitMQ.
//!
//! A client puts a request and gets a result id back at once; any process, any client
//! instance, can fetch the result by that id later, within the result's time to live. That is
//! what lets one stateless backend accept a request and another one answer the caller:
//!
//! ```no_run
//! # async fn example() -> Result<(), rylm_syrpc::Error> {
//! use std::time::Duration;
//! use rylm_syrpc::{Client, Handlers, ResultId, Server, Settings};
//!
//! let settings = Settings::new("shop", "amqp://guest:guest@127.0.0.1:5672/%2F");
//!
//! // A server, anywhere:
//! let server = Server::connect(settings.clone()).await?;
//! let handlers = Handlers::new().on("echo", |data| async move { Ok::<_, String>(data) });
//! tokio::spawn(async move { server.serve(handlers, std::future::pending()).await });
//!
//! // Backend 0 puts the request and hands the id to the web client:
//! let backend0 = Client::connect(settings.clone()).await?;
//! let id: ResultId = backend0.put_request("echo", &serde_json::json!({"value": "hello"})).await?;
//!
//! // Backend 1, another process, fetches the result by id:
//! let backend1 = Client::connect(settings).await?;
//! let result = backend1.get_result(&id, Some(Duration::from_secs(5))).await?;
//! # Ok(()) }
//! ```
//!
//! # Wire compatibility
//!
//! The exchanges, queues and their arguments, the SipHash bucket of a result id, the JSON
//! bodies and the message properties are those of the Python and JavaScript packages
//! ([`protocol`] has them as plain data, with the spec's test vectors as tests), so rylm clients
//! and servers mix with theirs on one broker.
//!
//! # Not the published implementations' defects
//!
//! - A server acknowledges a request only after its result is published, so a server that
//!   dies mid-request leaves it to another (**at-least-once**: a handler may run twice after a
//!   crash or a broker restart; make handlers idempotent, or choose [`AckMode::OnReceipt`]).
//! - A server holds at most `prefetch` requests (default 1), so idle servers share the work.
//! - `get_result`'s timeout is a deadline, not an idle timer.
//! - A result meant for another caller is held briefly, then handed back once; it is never
//!   lost, and never bounced back in a reject-requeue loop. A client leaves no consumer behind
//!   once nobody waits.
//! - Requests may carry a time to live ([`Settings::request_ttl`]).
//! - Clients and servers reconnect after a broker restart and carry on.
//! - `put_request` is persistent: its request and result are on the broker's disk before they
//!   are confirmed. `call` is transient by default and stands in for the disk itself: while it
//!   waits, it publishes its request again whenever a new connection replaces the one that
//!   confirmed it ([`Settings::persistent_calls`] makes calls persistent too).
//!
//! This crate knows nothing of ZeroMQ or HTTP; the protocol logic is plain data in
//! [`protocol`], and the AMQP I/O is on `lapin` without a TLS stack.
#![warn(missing_docs)]

mod client;
mod error;
mod link;
pub mod protocol;
mod server;

pub use client::{Client, ClientStats};
pub use error::Error;
pub use protocol::{AckMode, QueueType, ResultId, Settings};
pub use server::{Handlers, Request, Server, ServerCounters};
