//! The router at the heart of every rylm server.
//!
//! pylm pictured a server as a switch: an inbound side and an outbound side, a routing table
//! between them keyed by component name, and components plugged in on either side like network
//! cards. This crate keeps that picture and runs it as tokio tasks joined by bounded channels:
//!
//! - **Inbound components** take messages from outside (a PULL or SUB socket, an HTTP request)
//!   and hand them to the router; **outbound components** take messages from the router and
//!   send them on (a PUSH or PUB socket, a worker pool).
//! - Every component is registered with its **route**: the outbound component its messages go
//!   to. A **blocking** outbound component waits for the answer to each message and hands it
//!   back as **feedback**, which the table may route on to another component, to any depth the
//!   table allows; a table with a route loop is refused when it is built.
//! - Unlike pylm's router, which serves one message at a time, many messages are in flight at
//!   once, queues are bounded so that a slow component pushes back instead of stalling everyone,
//!   and a blocking component waiting for its feedback holds up nobody else.
//! - Shutdown is graceful: stop accepting, drain what was accepted, then stop.
//!
//! Inside one process nothing is serialised: messages are [`rylm_message::Message`] values moved
//! through channels. Sockets face the outside only, and live in `rylm-components`.
//!
//! This crate is being built: the routing table, the component traits and the router task
//! arrive with the router issue. It already fixes the dependency structure: it depends on
//! `rylm-message` alone, and knows nothing of ZeroMQ, HTTP, Redis or AMQP.
#![warn(missing_docs)]
