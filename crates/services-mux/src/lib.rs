//! Services addressed by path and METHOD over ZeroMQ: the Brubeck services design in Rust.
//!
//! A **service** ([`Service`]) listens for requests from other processes and routes each by its
//! path (regular-expression routes whose captured groups reach the handler) and its METHOD
//! (`get`, `post`, `put`, `delete`, `options`, `connect`, `response`, `request`) to a handler,
//! which sets a status code and message, adds to the payload, and returns the response. An
//! unknown path is answered 404, a method the route does not serve 405, a handler that panics
//! 500; the service goes on.
//!
//! A **caller** ([`ServiceClient`]), usable from any code (a hyper handler, a gateway),
//! registers a service by name, instance addresses and shared secret (again is a no-op), and
//! calls it **synchronously** ([`ServiceClient::call`]: awaits the response within a deadline,
//! and gets what the registered response handler returned too) or **asynchronously**
//! ([`ServiceClient::send`]: returns at once; the response handler registered for the path gets
//! the response). Many calls are in flight on one connection, correlated by id. Several
//! instances of a service are load-balanced (the live one with the fewest calls in flight);
//! heartbeats find a dead instance, whose calls fail at once instead of at their deadline.
//! [`ServiceClient::discover`] lists a service's routes.
//!
//! ```no_run
//! # async fn example() -> Result<(), rylm_services_mux::Error> {
//! use std::time::Duration;
//! use rylm_services_mux::{Call, Method, Service, ServiceClient, ServiceResponse};
//!
//! let service = Service::new("echo", "my_shared_secret")
//!     .route(r"^/echo/(?P<word>\w+)$", Method::Get, |request| async move {
//!         let word = request.named.get("word").cloned().unwrap_or_default();
//!         ServiceResponse::new(200, "OK").with("word", word)
//!     })?
//!     .serve("tcp://127.0.0.1:0")
//!     .await?;
//!
//! let client = ServiceClient::new();
//! client.register("echo", &[service.address()], "my_shared_secret");
//! let reply = client.call("echo", Call::new("/echo/hi").method(Method::Get), Some(Duration::from_secs(5))).await?;
//! assert_eq!(reply.response.payload["word"], "hi");
//! # Ok(()) }
//! ```
//!
//! # Security
//!
//! The shared secret never travels. Every frame carries an HMAC-SHA256 keyed by it, checked in
//! constant time, and every request an id and a timestamp, so a replayed or stale request is
//! refused. A wrong secret gets an explicit 401 and a log line on the service, never silence.
//! The payloads are not encrypted: run the transport inside a trusted network or a tunnel.
//!
//! # Wire formats
//!
//! The native protocol ([`protocol`]) is MessagePack bodies in one-frame ZeroMQ messages (a
//! marker, the kind, the body, its MAC) over DEALER (caller) and ROUTER (service). [`brubeck`] reads and writes Brubeck 0.1.4's text
//! framing for peers that still speak it. The protocol logic is plain data, apart from the
//! socket I/O in the service and the client.
#![warn(missing_docs)]

pub mod brubeck;
mod brubeck_io;
mod client;
mod error;
pub mod protocol;
mod service;

pub use brubeck_io::BrubeckCaller;
pub use client::{Call, ClientConfig, Reply, ServiceClient};
pub use error::Error;
pub use protocol::{Method, RouteInfo};
pub use service::{BUSY, Service, ServiceCounters, ServiceHandle, ServiceRequest, ServiceResponse};
