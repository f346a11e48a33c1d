//! A rylm master as an HTTP microservice.
//!
//! [`HttpGateway`] serves HTTP/1.1 with keep-alive on hyper, asynchronously: thousands of
//! connections cost tasks, not threads. Each request becomes a [`rylm_message::Message`] that
//! enters a router through the [`GatewayRouter`] inbound component, goes to the workers (a
//! master's worker pool: workers connect as to a Master, `rylm worker` included), and comes
//! back through the [`GatewayDealer`] outbound component to the HTTP request that waits for it,
//! matched by the message's `client` field. Every component keeps its route, so the result
//! stream can be routed elsewhere too.
//!
//! - `GET` or `POST /function` calls the worker function `function` (`/server.function` passes
//!   as is); the body is the payload and the result's payload is the response body. Query
//!   parameters reach the function as headers `query.<name>`, HTTP headers as `header.<name>`,
//!   and the method as `http.method`.
//! - Failures are HTTP answers, at once, never a hang: no such function **404**; the function
//!   failed **500** with the error; no worker connected **503**; too busy (load shedding)
//!   **503**; the worker did not answer within the deadline **504**; a body above the limit
//!   **413**; a malformed request **400**; another method **405**. `/` lists the functions the
//!   workers announced, as JSON.
//! - HTTP concerns are tower layers around the service (tracing, load shedding over a
//!   concurrency limit, a timeout, a body limit), not code inside it.
//!
//! pylm's other HTTP parts are here too, as router components: [`HttpService`] (inbound: an
//! HTTP server whose requests are submitted to the router) and [`HttpConnection`] (outbound:
//! each message POSTed to an HTTP worker, its response the feedback).
//!
//! ```no_run
//! # async fn example() -> Result<(), rylm_gateway::Error> {
//! use rylm_gateway::{GatewayConfig, HttpGateway};
//! let gateway = HttpGateway::start(GatewayConfig::default()).await?;
//! println!("HTTP on {}, workers connect to {}", gateway.local_addr(), gateway.worker_address());
//! // curl -d hello http://<addr>/upper
//! gateway.shutdown().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod error;
mod handler;
mod http;
mod parts;
pub mod request;

pub use error::Error;
pub use http::{GatewayConfig, GatewayDealer, GatewayRouter, HttpGateway};
pub use parts::{HttpConnection, HttpService};
