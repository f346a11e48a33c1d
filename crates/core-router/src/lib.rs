//! The router at the heart of every rylm server.
//!
//! pylm pictured a server as a switch: an inbound side and an outbound side, a routing table
//! between them keyed by component name, and components plugged in on either side like network
//! cards. This crate keeps that picture and runs it as tokio tasks joined by bounded channels:
//!
//! - **Inbound components** ([`Inbound`]) take messages from outside (a PULL or SUB socket, an
//!   HTTP request) and [`submit`](InboundLink::submit) them to the router; **outbound
//!   components** ([`Outbound`]) take messages from their [`OutboundQueue`] and send them on
//!   (a PUSH or PUB socket, a pool of workers, a function).
//! - Every component is registered with its **route**: the outbound component its messages go
//!   to. A **blocking** outbound component answers each message with **feedback**, which the
//!   table routes on to the next component, to any depth, or hands back to the inbound component
//!   that submitted the message. The [`Table`] is checked when it is built: unknown routes,
//!   duplicate names and route loops are refused.
//! - A blocking inbound component waits for the feedback of its message; a non-blocking one
//!   returns as soon as the router has taken the message.
//!
//! Unlike pylm's router, which serves one message at a time, any number of messages are in
//! flight; every queue is bounded, so a slow component pushes back on those that feed it instead
//! of stalling everyone; a blocking component waiting for its feedback holds up nobody else; and
//! an outbound component with no live peer blocks only the messages routed to it.
//!
//! [`Router::shutdown`] is graceful: the inbound components are told to stop accepting, the
//! messages they accepted are carried through to the end of their routes, the outbound queues
//! are drained, and then everything stops. Each message is handled inside a `tracing` span
//! carrying its ids.
//!
//! Inside one process nothing is serialised: messages are [`rylm_message::Message`] values
//! moved through channels. This crate knows no sockets; `rylm-components` brings ZeroMQ.
//!
//! ```
//! use rylm_core_router::{Delivery, InboundLink, Mode, OutboundQueue, Router};
//! use rylm_message::Message;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rylm_core_router::Error> {
//! // An outbound component that answers every message with its payload in upper case.
//! let upper = |mut queue: OutboundQueue| async move {
//!     while let Some(delivery) = queue.recv().await {
//!         let (message, responder) = delivery.into_parts();
//!         let payload = message.payload.to_ascii_uppercase();
//!         responder.send(Ok(Some(message.reply(payload))));
//!     }
//!     Ok(())
//! };
//! // An inbound component that submits one message and checks the feedback.
//! let ask = |link: InboundLink| async move {
//!     let feedback = link.submit(Message::call("upper", "hello")).await?;
//!     assert_eq!(&feedback.expect("feedback").payload[..], b"HELLO");
//!     Ok(())
//! };
//! let router = Router::builder()
//!     .outbound("upper", upper, None, Mode::Blocking)
//!     .inbound("ask", ask, "upper", Mode::Blocking)
//!     .start()?;
//! router.shutdown().await
//! # }
//! ```
#![warn(missing_docs)]

mod error;
mod router;
pub mod table;

pub use error::Error;
pub use router::{
    DEFAULT_CAPACITY, Delivery, Inbound, InboundLink, Outbound, OutboundQueue, Responder, Router,
    RouterBuilder,
};
pub use table::{Mode, Table};
