//! A rylm master as an HTTP microservice.
//!
//! `HttpGateway` serves HTTP/1.1 (with keep-alive) on hyper. Each request becomes a
//! [`rylm_message::Message`] that enters the router through the `GatewayRouter` inbound
//! component, goes out to the workers, and comes back through the `GatewayDealer` outbound
//! component to the HTTP request that waits for it, matched by the message's client field.
//!
//! - `GET` or `POST /function` calls the worker function `function`; the body is the payload
//!   and the reply's payload is the response body. Query parameters and headers reach the
//!   function as message headers.
//! - Failures are HTTP answers, fast and clear, never a hang: an unknown function is a 404, a
//!   failed function a 500, no worker a 503, a worker too slow a 504, a body too large a 413.
//! - HTTP concerns (timeouts, concurrency limits and load shedding, body limits, tracing) are
//!   tower layers around the service, not code inside it.
//!
//! Unlike pylm's gateway (a thread per connection), it is asynchronous and holds thousands of
//! concurrent keep-alive connections.
//!
//! This crate is being built: the gateway arrives with its own issue. Nothing below this crate
//! knows HTTP.
#![warn(missing_docs)]
