//! Services addressed by path and METHOD over ZeroMQ: the Brubeck services design in Rust.
//!
//! A **service** listens for requests from other instances and routes each by its path (regex
//! routes whose captured groups reach the handler) and its METHOD (`get`, `post`, `put`,
//! `delete`, `options`, `connect`, `response`, `request`) to a handler, which sets a status code
//! and message, adds to the payload and renders a response. An unknown path is a 404 and an
//! unsupported method a 405.
//!
//! A **client**, usable from any code (a hyper handler, a gateway), registers a service by
//! address and shared secret and calls it **synchronously** (await the response, with a
//! deadline) or **asynchronously** (return at once; the response handler registered for the
//! path gets the response later). Many calls are in flight on one connection, correlated by id;
//! several instances of a service are load-balanced, and heartbeats find a dead instance so
//! that its calls fail at once.
//!
//! The shared secret never travels: every request and response carries a MAC keyed by it, with
//! a timestamp and an id so that a replayed frame is refused.
//!
//! This crate is being built: the service, the client and the `brubeck` text codec arrive with
//! their own issue. The protocol logic (framing, MAC checks, routing) will stay apart from the
//! socket I/O.
#![warn(missing_docs)]
