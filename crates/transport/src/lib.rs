//! ZeroMQ sockets with safe defaults: the one place where rylm meets a ZeroMQ implementation.
//!
//! Every other rylm crate that speaks ZeroMQ (the components and servers, the services mux,
//! the gateway, the command line, the benches) creates its sockets here, so that every socket
//! of a rylm process has the same protections, and a change of implementation touches this
//! crate alone. Underneath is `omq-tokio`, a pure-Rust ZeroMQ (ZMTP 3.x, interoperable with
//! libzmq), pinned to one exact version; none of its types appear in this crate's API.
//!
//! # Why a crate of its own
//!
//! rylm first used the `zeromq` 0.7 crate. One TCP peer that sent a greeting and a frame
//! header declaring 2^46 bytes aborted any rylm process that bound a socket (the codec
//! reserved what the peer declared, before any handshake); DEALER, PUSH and REQ sockets never
//! reconnected after their peer restarted; there was no handshake timeout, no high-water mark,
//! no linger, no heartbeat, and NULL security only. None of it could be fixed from outside the
//! crate. The replacement is chosen for those properties, and this crate's tests hold each of
//! them on real sockets, so that a regression of the dependency fails rylm's own CI.
//!
//! # What a socket guarantees ([`Options::default`])
//!
//! - **Size.** A message above `max_message_size` (default: `rylm-message`'s frame limit,
//!   16 MiB) is refused when its frame header arrives: the peer is dropped, nothing of the
//!   frame is buffered, and the drop is counted ([`Socket::stats`]).
//! - **Handshakes.** A connection that does not finish its ZMTP handshake within
//!   `handshake_timeout` (5 s) is closed; at most `max_pending_handshakes` (256) connections
//!   may be in their handshake at once, so silent connections cannot pile up.
//! - **Queues.** Send and receive high-water marks (1000 messages); a send waits at most
//!   `send_timeout` (10 s) for a peer and then fails with [`Error::SendTimeout`].
//! - **Liveness.** ZMTP heartbeats (a PING every 2 s, a silent connection dropped after 10 s),
//!   and reconnect with exponential backoff (100 ms to 2 s) for every connecting socket, for as
//!   long as the socket lives; what was sent meanwhile waits in the queue.
//! - **Clean stops.** [`Socket::close`] flushes what was accepted for up to `linger` (2 s).
//! - **Security.** [`Security::Null`] (what pylm peers speak), [`Security::CurveServer`] with
//!   an optional allow-list of client keys (an unknown client is refused in the handshake,
//!   before any of its messages is read), [`Security::CurveClient`], and PLAIN. [`Keypair`]
//!   and [`PublicKey`] read Z85 keys from certificates, files and environment variables, and
//!   never print a secret.
//! - **Visibility.** [`Socket::events`] streams connection events ([`Event`]); misbehaving
//!   peers are logged at most once per ten seconds per socket.
//! - **Bursts.** Tasks that share a socket can send through an [`Outbox`], which hands their
//!   messages to the socket in bursts (one write for many) and loses none to a task that
//!   gives up.
//!
//! # What it is not
//!
//! It knows no rylm message: frames in, frames out. Protocols (credits, READY, replays,
//! deadlines) live in the crates above.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rylm_transport::Error> {
//! use rylm_transport::{Kind, Options, Socket};
//!
//! let server = Socket::new(Kind::Router, &Options::default())?;
//! let address = server.bind("tcp://127.0.0.1:0").await?;
//! let client = Socket::new(Kind::Dealer, &Options::default())?;
//! client.connect(&address).await?;
//! client.send(vec!["ping".into()]).await?;
//! let request = server.recv().await?; // [identity, "ping"]
//! server.send(vec![request[0].clone(), "pong".into()]).await?;
//! assert_eq!(client.recv().await?, vec![bytes::Bytes::from("pong")]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod error;
mod events;
mod keys;
mod options;
pub mod outbox;
mod socket;

pub use error::Error;
pub use events::{Event, Events, Stats, StatsSnapshot, totals};
pub use keys::{Keypair, PublicKey};
pub use options::{DEFAULT_MAX_MESSAGE_SIZE, Heartbeat, Kind, Options, Security};
pub use outbox::{Outbox, Undelivered};
pub use socket::{Received, Socket, Unsent};

/// How many messages a loop takes from a socket ([`Socket::try_recv_message`]) or a queue,
/// once it has one, before it waits again: what it waits on beside (a timer, a stop signal,
/// other sockets) is looked at once per burst instead of once per message, and at least that
/// often.
pub const BURST: usize = 32;
