//! ZeroMQ parts and the pylm-style servers built from them.
//!
//! **Parts** ([`parts`]). For each ZeroMQ pattern a component of a `rylm-core-router` router,
//! bound (a *service*) or connected (a *connection*) through an [`Endpoint`]: PULL and SUB
//! inbound ([`Listen`]), REP inbound ([`Answer`], blocking), ROUTER inbound ([`RouterIn`],
//! blocking, many requests at once), PUSH and PUB outbound ([`Emit`]), REQ outbound ([`Ask`],
//! blocking), DEALER outbound ([`DealerOut`], blocking, many at once). Every part reads and
//! writes with a [`rylm_message::Codec`], so the wire format is a choice.
//!
//! **The cache** ([`CacheStore`]) is a bypass part: a key-value store on REP beside the router,
//! answering `set`, `get` and `delete`, with a clear answer for a missing key. Servers preset it
//! with their name and addresses, so that a client needs the cache's address alone.
//!
//! **Functions** ([`Functions`]) are plain async or blocking Rust functions by name; a message
//! whose function is a list of stages runs them in turn. An unknown function, a failure and a
//! panic come back as an error reply (headers [`ERROR_KIND`] and [`ERROR_MESSAGE`]), and the
//! server goes on.
//!
//! **Servers.** [`Server`] runs functions itself: callers connect a DEALER to its ROUTER and get
//! each answer back over that connection ([`callers`]), a bounded number at once (beyond it,
//! `busy`); results bound for another server's stage go down its stream to that stage by name,
//! pushing back when it is slow; with [`Server::pipeline`] and [`Server::sink`] its input is the stream of previous
//! servers. The [`Master`] farms work out to [`Worker`]s by credit through its worker pool:
//! credits capped, heartbeats both ways, a deadline carried by every message and kept per
//! dispatch, a dead worker's messages sent to another once (unless a function must not run
//! twice), the first answer taken and late ones dropped, a silent worker readmitted when it
//! speaks again; with `scatter`, `gather` and `handle_stream` hooks, and as a Hub when fed by a
//! previous server. A [`MuxWorker`] yields many results per message. The [`Client`] finds a
//! server from its cache and offers `eval`, `eval_stages`, `eval_all`, `job` (a stream with a
//! bounded number in flight), sessions and the cache; a client of a pipeline also connects to
//! its last server and makes a round trip through the whole pipeline first. Every wait has a
//! deadline. Each server has pylm's layout and wire format as an option.
//!
//! ```no_run
//! # async fn example() -> Result<(), rylm_components::Error> {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use rylm_components::{Client, Functions, Server};
//!
//! let server = Server::builder("text")
//!     .functions(Functions::new().add("upper", |p: Bytes| async move { Ok::<_, String>(Bytes::from(p.to_ascii_uppercase())) }))
//!     .start()
//!     .await?;
//! let client = Client::connect(server.db_address(), Duration::from_secs(5)).await?;
//! assert_eq!(&client.eval("upper", "hi").await?[..], b"HI");
//! # Ok(()) }
//! ```
//!
//! Sockets come from `rylm-transport` (safe defaults, reconnect, CURVE; see [`Transport`]).
//! A worker announces itself again when its master comes back; a client's pending calls fail
//! with [`Error::ServerGone`] when its server goes away, and its later calls go through once
//! the server is back. It depends on `rylm-message`, `rylm-core-router` and `rylm-transport`;
//! HTTP lives in `rylm-gateway`.
#![warn(missing_docs)]

mod cache;
pub mod callers;
mod client;
mod discovery;
mod error;
mod functions;
mod master;
pub mod parts;
mod pool;
mod server;
pub mod stats;
mod worker;

pub use cache::{CacheLimits, CacheStore, MISSING};
pub use callers::{ResultCounters, STATUS_FUNCTION, SYNC_THROUGH, StatusReport};
pub use client::{Client, ClientOptions};
pub use discovery::{advertised, beside};
pub use error::Error;
pub use functions::{DEADLINE, Functions, MORE, NONE, PIPELINED, SYNC_FUNCTION, deadline_of};
pub use master::{Master, MasterBuilder, default_topic};
pub use parts::{Answer, Ask, DealerOut, Emit, Endpoint, Listen, PartSocket, RouterIn, Transport};
pub use pool::{
    Admission, BATCH, BATCH_BYTES, CANCEL, CANCEL_FUNCTION, CREDITS, FUNCTIONS, HEARTBEAT_FUNCTION,
    HOLDING, Heartbeat, Hook, MAX_BATCH, ONCE, PoolCounters, PoolStatus, READY_FUNCTION,
    ResultSink, StreamHook, WITHDRAW_FUNCTION, WorkerPool,
};
pub use rylm_transport;
pub use server::{Server, ServerBuilder};
pub use worker::{Worker, WorkerBuilder};

/// pylm's MuxWorker: a [`Worker`] whose [`Functions`] include mux functions
/// ([`Functions::add_mux`]), each yielding any number of results per message.
pub type MuxWorker = Worker;

/// The header of an error reply that says what kind of failure it is: `unknown-function`,
/// `failed`, `panicked`, `malformed`.
pub const ERROR_KIND: &str = "rylm-error";
/// The header of an error reply that describes the failure.
pub const ERROR_MESSAGE: &str = "rylm-error-message";
