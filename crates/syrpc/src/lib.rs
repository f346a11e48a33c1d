//! SyRPC: RPC for stateless backends over RabbitMQ.
//!
//! A client puts a request and gets a result id back at once; any process, any client
//! instance, can fetch the result by that id later, within the result's time to live. That is
//! what lets one stateless backend accept a request and another one answer the caller. A
//! server takes requests as `(type, result_id, data)` and publishes each result; a handler
//! loop on top dispatches by type.
//!
//! It is wire-compatible with the Python and JavaScript packages (exchanges, queues and their
//! arguments, the SipHash bucket of a result id, bodies and properties), without their defects:
//! acknowledgement only after the result is published, bounded prefetch, deadlines instead of
//! timeouts that leak consumers, and no reject/requeue storm for results nobody waits for. It
//! survives a broker restart (at-least-once delivery).
//!
//! The protocol logic (buckets, names, messages) is plain data; the AMQP I/O is on `lapin`,
//! tested against a real RabbitMQ. This crate is being built: both arrive with the SyRPC issue.
#![warn(missing_docs)]
