//! A service instance: a ROUTER socket that routes authenticated requests by path and method.

use rylm_message::stats::{ErrorKind, Outcome};
use rylm_message::trace::{Hop, TRACEPARENT};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use futures_lite::FutureExt;
use regex::Regex;
use rylm_transport::{Kind, Options, Socket};
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, watch};

use crate::Error;
use crate::protocol::{
    self, Binding, Decoded, Frame, Method, ReplayGuard, ResponseView, RouteInfo, Secret,
    WireControl, WireRequest, WireResponse, WireRoutes, WithMethod,
};

/// A request as a handler sees it.
#[derive(Clone, Debug)]
pub struct ServiceRequest {
    /// The call's id.
    pub id: String,
    /// The path.
    pub path: String,
    /// The method.
    pub method: Method,
    /// The route's captured groups, by index (0 is the whole match).
    pub captures: Vec<Option<String>>,
    /// The route's named groups.
    pub named: HashMap<String, String>,
    /// The named arguments.
    pub arguments: Map<String, Value>,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
}

impl ServiceRequest {
    /// An argument by name.
    pub fn argument(&self, name: &str) -> Option<&Value> {
        self.arguments.get(name)
    }

    /// A captured group by index.
    pub fn capture(&self, index: usize) -> Option<&str> {
        self.captures.get(index).and_then(|c| c.as_deref())
    }
}

/// A response: an HTTP-like status, a message, headers and a JSON payload.
///
/// ```
/// use rylm_services_mux::ServiceResponse;
/// let response = ServiceResponse::new(200, "Took a while, but I am back.")
///     .with("RETURN_DATA", "I made a round trip");
/// assert_eq!(response.payload["RETURN_DATA"], "I made a round trip");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceResponse {
    /// The status code, as in HTTP (200, 201, 207, 400, 401, 403, 404, 405, 500, 503...).
    pub status: u16,
    /// The status message.
    pub status_msg: String,
    /// Headers; `METHOD` is set to `response` on the way out.
    pub headers: BTreeMap<String, String>,
    /// The payload, a JSON object built with [`ServiceResponse::with`].
    pub payload: Map<String, Value>,
}

impl Default for ServiceResponse {
    /// Brubeck's default: 500 until a handler says otherwise.
    fn default() -> Self {
        ServiceResponse::new(500, "no status was set")
    }
}

impl ServiceResponse {
    /// A response with this status and message and an empty payload.
    pub fn new(status: u16, status_msg: impl Into<String>) -> Self {
        ServiceResponse {
            status,
            status_msg: status_msg.into(),
            headers: BTreeMap::new(),
            payload: Map::new(),
        }
    }

    /// Sets the status.
    pub fn set_status(&mut self, status: u16, status_msg: impl Into<String>) {
        self.status = status;
        self.status_msg = status_msg.into();
    }

    /// Adds a key to the payload (Brubeck's `add_to_payload`).
    pub fn add_to_payload(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.payload.insert(key.into(), value.into());
    }

    /// The same, as a builder.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.add_to_payload(key, value);
        self
    }

    /// Sets a header, as a builder.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub(crate) fn into_wire(mut self, request_id: &str, path: &str) -> WireResponse {
        self.headers
            .insert("METHOD".into(), Method::Response.as_str().into());
        WireResponse {
            id: request_id.to_owned(),
            ts: protocol::now_ms(),
            path: path.to_owned(),
            status: self.status,
            status_msg: self.status_msg,
            headers: self.headers,
            payload: self.payload,
        }
    }

    pub(crate) fn from_wire(wire: WireResponse) -> Self {
        ServiceResponse {
            status: wire.status,
            status_msg: wire.status_msg,
            headers: wire.headers,
            payload: wire.payload,
        }
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = ServiceResponse> + Send>>;
type Handler = Arc<dyn Fn(ServiceRequest) -> HandlerFuture + Send + Sync>;

struct Route {
    pattern: Regex,
    methods: BTreeMap<Method, (Handler, Option<Duration>)>,
}

/// What a service instance has done, since it started: read by `rylm service --admin`.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Calls dispatched to the routes and answered (any status).
    pub answered: AtomicU64,
    /// Of those, answers of status 500 and above (a handler's failure, panic or timeout).
    pub errors: AtomicU64,
    /// Calls answered `503 busy` at once: every handler slot and queue place taken, or
    /// shutting down.
    pub busy: AtomicU64,
    /// Frames refused because their MAC did not match (a wrong secret, another instance).
    pub refused: AtomicU64,
    /// Requests refused as replayed or stale.
    pub replayed: AtomicU64,
    /// Frames dropped because they did not decode.
    pub malformed: AtomicU64,
    /// Calls answered, by route pattern (a path no route matches under `_unmatched`): calls,
    /// errors by kind (a status of 500 `failed` or `panicked`, 504 `timeout`, 503 `busy`,
    /// 404 and 405 `unknown`), latency.
    pub routes: rylm_message::stats::CallTable,
}

/// The route that calls no route matches count under.
pub const UNMATCHED: &str = "_unmatched";

/// The status message of a handler that panicked.
const PANICKED: &str = "the handler panicked";

/// A service definition: its name, its shared secret and its routes.
///
/// ```
/// use rylm_services_mux::{Method, Service, ServiceResponse};
/// let service = Service::new("slow-echo", "my_shared_secret")
///     .route(r"^/service/slow$", Method::Request, |request| async move {
///         let data = request.argument("RETURN_DATA").cloned().unwrap_or("NO DATA".into());
///         ServiceResponse::new(200, "Took a while, but I am back.").with("RETURN_DATA", data)
///     })
///     .expect("a valid pattern");
/// assert_eq!(service.routes()[0].methods, vec!["request"]);
/// ```
pub struct Service {
    name: String,
    counters: Arc<ServiceCounters>,
    /// The secrets accepted: the current one, then (while callers move over) the next.
    pub(crate) secrets: Vec<Secret>,
    routes: Vec<Route>,
    pub(crate) concurrency: usize,
    /// How many requests may wait for a handler slot (beyond them: `busy`).
    pub(crate) queue: usize,
    replay_window: Duration,
    replay_capacity: usize,
    handler_timeout: Duration,
    pub(crate) transport: Options,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("routes", &self.routes())
            .finish()
    }
}

impl Service {
    /// A service with no routes yet.
    pub fn new(name: impl Into<String>, secret: impl AsRef<[u8]>) -> Service {
        Service {
            name: name.into(),
            counters: Arc::default(),
            secrets: vec![Secret::new(secret)],
            routes: Vec::new(),
            concurrency: 64,
            queue: 0,
            transport: Options::default(),
            replay_window: Duration::from_secs(30),
            replay_capacity: 1_000_000,
            handler_timeout: Duration::from_secs(30),
        }
    }

    /// Routes `method` on paths matching `pattern` (a regular expression; anchor it with `^`
    /// and `$` to match whole paths) to `handler`. Routes match in the order they are added;
    /// adding a method to an existing pattern extends that route.
    pub fn route<F, Fut>(self, pattern: &str, method: Method, handler: F) -> Result<Service, Error>
    where
        F: Fn(ServiceRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServiceResponse> + Send + 'static,
    {
        self.route_within(pattern, method, None, handler)
    }

    /// [`Service::route`] with a timeout of its own for this handler (instead of the service's
    /// [`Service::with_handler_timeout`]); a handler past it is stopped and answered 504.
    pub fn route_within<F, Fut>(
        mut self,
        pattern: &str,
        method: Method,
        timeout: Option<Duration>,
        handler: F,
    ) -> Result<Service, Error>
    where
        F: Fn(ServiceRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServiceResponse> + Send + 'static,
    {
        let handler: (Handler, Option<Duration>) =
            (Arc::new(move |request| Box::pin(handler(request))), timeout);
        if let Some(route) = self
            .routes
            .iter_mut()
            .find(|r| r.pattern.as_str() == pattern)
        {
            route.methods.insert(method, handler);
            return Ok(self);
        }
        let regex = Regex::new(pattern).map_err(|e| Error::InvalidRoute {
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })?;
        self.routes.push(Route {
            pattern: regex,
            methods: BTreeMap::from([(method, handler)]),
        });
        Ok(self)
    }

    /// How many handlers run at once (default 64). A request beyond them is answered at once
    /// with `503` and the header `busy` (the caller may try another instance); heartbeats are
    /// answered whatever the handlers are doing.
    pub fn with_concurrency(mut self, concurrency: usize) -> Service {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How many requests may wait for a handler slot when all are taken (default 0: none; a
    /// request beyond the slots and this queue is answered `busy` at once). A waiting request
    /// waits off the receive loop, so heartbeats are still answered.
    pub fn with_queue(mut self, queue: usize) -> Service {
        self.queue = queue;
        self
    }

    /// How long a handler may run (default 30 s); past it, it is stopped and the call is
    /// answered `504`.
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Service {
        self.handler_timeout = timeout;
        self
    }

    /// Accepts `secret` beside the current one, for a rotation without downtime: give the
    /// instances the next secret, move the callers over (`register` again with it), then start
    /// the instances with the next secret alone. Each answer is signed with the secret its
    /// request was signed with.
    pub fn with_next_secret(mut self, secret: impl AsRef<[u8]>) -> Service {
        self.secrets.truncate(1);
        self.secrets.push(Secret::new(secret));
        self
    }

    /// How many request ids the replay guard holds inside its window (default 1,000,000);
    /// beyond it, requests are refused rather than ids forgotten.
    pub fn with_replay_capacity(mut self, capacity: usize) -> Service {
        self.replay_capacity = capacity.max(1);
        self
    }

    /// The socket's options, security among them (default: `rylm-transport`'s safe defaults,
    /// NULL security; a CURVE server refuses callers whose keys it does not allow before any
    /// of their frames is read).
    pub fn with_transport(mut self, transport: Options) -> Service {
        self.transport = transport;
        self
    }

    /// How far a request's timestamp may be from the service's clock (default 30 s).
    pub fn with_replay_window(mut self, window: Duration) -> Service {
        self.replay_window = window;
        self
    }

    /// The routes, as discovery lists them.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.routes
            .iter()
            .map(|r| RouteInfo {
                pattern: r.pattern.as_str().to_owned(),
                methods: r.methods.keys().map(|m| m.as_str().to_owned()).collect(),
            })
            .collect()
    }

    /// The response to `request`: its handler's, or 404 / 405.
    /// What this service has done; the same counters once it serves.
    pub fn counters(&self) -> Arc<ServiceCounters> {
        self.counters.clone()
    }

    /// Dispatches `request` to its route, and counts the answer.
    pub(crate) async fn dispatch(&self, mut request: WireRequest) -> ServiceResponse {
        // A traced request runs under a span of this instance (when spans are recorded here),
        // whose id the handler sees.
        let hop = request
            .headers
            .get(TRACEPARENT)
            .and_then(|incoming| Hop::continue_if_recorded(incoming));
        let span = match hop {
            Some(hop) => {
                request
                    .headers
                    .insert(TRACEPARENT.into(), hop.traceparent());
                hop.span(&self.name)
            }
            None => tracing::Span::none(),
        };
        let started = std::time::Instant::now();
        let (response, route) = self.route_request(request).instrument(span).await;
        let outcome = match response.status {
            404 | 405 => Outcome::Error(ErrorKind::Unknown),
            503 => Outcome::Error(ErrorKind::Busy),
            504 => Outcome::Error(ErrorKind::TimedOut),
            500 if response.status_msg == PANICKED => Outcome::Error(ErrorKind::Panicked),
            500.. => Outcome::Error(ErrorKind::Failed),
            _ => Outcome::Ok,
        };
        self.counters
            .routes
            .record(route.unwrap_or(UNMATCHED), started.elapsed(), outcome);
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        if response.status >= 500 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    /// The response to `request`, and the pattern of the route that answered it.
    async fn route_request(&self, request: WireRequest) -> (ServiceResponse, Option<&str>) {
        let method: Method = match request.method.parse() {
            Ok(method) => method,
            Err(error) => return (ServiceResponse::new(405, error.to_string()), None),
        };
        let mut allowed = BTreeSet::new();
        for route in &self.routes {
            // A pattern without groups needs only its match (no captures to allocate).
            let (captures, named) = if route.pattern.captures_len() == 1 {
                let Some(whole) = route.pattern.find(&request.path) else {
                    continue;
                };
                (vec![Some(whole.as_str().to_owned())], HashMap::new())
            } else {
                let Some(captures) = route.pattern.captures(&request.path) else {
                    continue;
                };
                let named = route
                    .pattern
                    .capture_names()
                    .flatten()
                    .filter_map(|name| {
                        captures
                            .name(name)
                            .map(|m| (name.to_owned(), m.as_str().to_owned()))
                    })
                    .collect();
                let captures = captures
                    .iter()
                    .map(|c| c.map(|m| m.as_str().to_owned()))
                    .collect();
                (captures, named)
            };
            let Some((handler, timeout)) = route.methods.get(&method) else {
                allowed.extend(route.methods.keys().map(|m| m.as_str()));
                continue;
            };
            let route_pattern = route.pattern.as_str();
            let view = ServiceRequest {
                id: request.id,
                path: request.path,
                method,
                captures,
                named,
                arguments: request.arguments,
                headers: request.headers,
                body: Bytes::from(request.body),
            };
            // Run in the calling task (no task of its own: a hop between threads costs more
            // than most handlers), stopped at its deadline; a panic becomes a 500 instead of
            // taking the service down.
            let timeout = timeout.unwrap_or(self.handler_timeout);
            let mut run =
                std::pin::pin!(std::panic::AssertUnwindSafe(handler(view)).catch_unwind());
            // A handler that answers at once needs no timer.
            let outcome = match futures_lite::future::poll_once(run.as_mut()).await {
                Some(outcome) => Ok(outcome),
                None => tokio::time::timeout(timeout, run).await,
            };
            let response = match outcome {
                Ok(Ok(response)) => response,
                Ok(Err(_)) => {
                    tracing::error!(route = %route_pattern, "a service handler panicked");
                    ServiceResponse::new(500, PANICKED)
                }
                Err(_) => {
                    tracing::warn!(route = %route_pattern, ?timeout, "a service handler ran past its timeout");
                    ServiceResponse::new(
                        504,
                        format!("the handler did not answer within {timeout:?}"),
                    )
                }
            };
            return (response, Some(route_pattern));
        }
        let response = if allowed.is_empty() {
            ServiceResponse::new(404, format!("no route for path {:?}", request.path))
        } else {
            let allowed: Vec<&str> = allowed.into_iter().collect();
            ServiceResponse::new(
                405,
                format!("method {method} not allowed on {:?}", request.path),
            )
            .with("allowed", allowed)
        };
        (response, None)
    }

    /// Binds `address` (`tcp://127.0.0.1:0` picks a free port) and serves until the handle is
    /// shut down or dropped.
    pub async fn serve(self, address: &str) -> Result<ServiceHandle, Error> {
        let socket = Socket::new(Kind::Router, &self.transport)?;
        let bound = socket.bind(address).await?;
        let (stop, stopped) = watch::channel(false);
        let binding = Binding {
            service: self.name.clone(),
            instance: rylm_message::new_id(),
        };
        let instance = binding.instance.clone();
        let task = tokio::spawn(run(Arc::new(self), socket, binding, stopped, bound.clone()));
        tracing::info!(address = %bound, %instance, "service listening");
        Ok(ServiceHandle::new(bound, instance, stop, task))
    }
}

/// A running service instance.
#[derive(Debug)]
pub struct ServiceHandle {
    address: String,
    instance: String,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServiceHandle {
    pub(crate) fn new(
        address: String,
        instance: String,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> ServiceHandle {
        ServiceHandle {
            address,
            instance,
            stop,
            task: Some(task),
        }
    }

    /// The address the instance is bound to, with the real port.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// This instance's id: new at every start, and bound into every request's MAC.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Stops taking requests, lets the running handlers finish and answer (each within its
    /// timeout), then closes.
    pub async fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(60)).await
    }

    /// Like [`ServiceHandle::shutdown`], but stops at once whatever is still running after
    /// `limit`.
    pub async fn shutdown_within(mut self, limit: Duration) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(limit, &mut task).await.is_err()
        {
            tracing::warn!(address = %self.address, ?limit, "shutdown took too long; stopping the handlers");
            task.abort();
        }
    }

    /// Stops at once, as a crash would: running handlers are dropped unanswered.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Everything a running instance needs to answer.
struct Replier {
    socket: Socket,
    service: Arc<Service>,
    binding: Binding,
    /// Replies from the receive loop (pongs, refusals, `busy`) on their way out: bounded, so
    /// that a peer that never reads cannot stall the loop or pile up tasks.
    outgoing: Arc<Semaphore>,
}

/// The most frames a message may have after its routing identity (a services-mux message has
/// one; a peer of wire version 1 sends four, dropped with a warning that names the version).
const MAX_FRAMES: usize = 4;
/// How long a handler may compute in the receive loop before its first await (see `run`).
const INLINE_LIMIT: Duration = Duration::from_millis(2);
/// How many handlers start in tasks of their own after one took longer than `INLINE_LIMIT`
/// in the receive loop, before the loop tries again.
const SPAWNED_AFTER_SLOW: u32 = 1_000;
/// Replies the receive loop may have on their way out at once; beyond, one is dropped.
const OUTGOING: usize = 1024;
/// How long a reply waits for a peer that does not read.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

impl Replier {
    /// Sends `frame` to `identity`, signed with secret number `secret`.
    async fn send(&self, identity: Bytes, frame: &Frame, secret: usize) {
        let frames =
            match protocol::encode_to(Some(identity), frame, self.key(secret), &self.binding) {
                Ok(frames) => frames,
                Err(error) => {
                    tracing::error!(%error, "cannot encode a reply");
                    return;
                }
            };
        self.deliver(frames).await;
    }

    /// Sends a handler's `response` to call `id` on `path` to `identity`.
    async fn send_response(
        &self,
        identity: Bytes,
        id: &str,
        path: &str,
        response: &ServiceResponse,
        secret: usize,
    ) {
        let view = ResponseView {
            id,
            ts: protocol::now_ms(),
            path,
            status: response.status,
            status_msg: &response.status_msg,
            headers: WithMethod(&response.headers),
            payload: &response.payload,
        };
        let frames =
            match protocol::encode_response(identity, &view, self.key(secret), &self.binding) {
                Ok(frames) => frames,
                Err(error) => {
                    tracing::error!(%error, "cannot encode a reply");
                    return;
                }
            };
        self.deliver(frames).await;
    }

    fn key(&self, secret: usize) -> &Secret {
        self.service
            .secrets
            .get(secret)
            .unwrap_or(&self.service.secrets[0])
    }

    async fn deliver(&self, frames: Vec<Bytes>) {
        if let Err(error) = self.socket.send_within(frames, REPLY_DEADLINE).await {
            // The caller went away, or does not read.
            tracing::debug!(%error, "could not send a reply; the caller is gone");
        }
    }

    /// Sends from a task of its own, without waiting: the receive loop never blocks on a peer.
    fn send_later(self: &Arc<Self>, identity: Bytes, frame: Frame, secret: usize) {
        let Ok(permit) = self.outgoing.clone().try_acquire_owned() else {
            tracing::debug!("too many replies on their way out; dropped one");
            return;
        };
        let replier = self.clone();
        tokio::spawn(async move {
            replier.send(identity, &frame, secret).await;
            drop(permit);
        });
    }
}

async fn run(
    service: Arc<Service>,
    socket: Socket,
    binding: Binding,
    mut stopped: watch::Receiver<bool>,
    address: String,
) {
    let slots = Arc::new(Semaphore::new(service.concurrency));
    let queue = Arc::new(Semaphore::new(service.queue));
    let mut guard = ReplayGuard::new(
        service.replay_window.as_millis() as u64,
        service.replay_capacity,
    );
    let replier = Arc::new(Replier {
        socket: socket.clone(),
        service: service.clone(),
        binding: binding.clone(),
        outgoing: Arc::new(Semaphore::new(OUTGOING)),
    });
    let mut handlers = tokio::task::JoinSet::new();
    // While draining, heartbeats are still answered (so that callers do not take the instance
    // for dead while it finishes their calls) and new requests get a 503.
    let mut draining = false;
    // Handlers left to start in tasks of their own, after one computed for long in this loop.
    let mut spawn_next: u32 = 0;
    let mut warned = false;
    let mut spare = None;
    // Messages left to take without waiting before the loop looks at its stop signal again.
    let mut burst = 0usize;
    loop {
        // The rest of a burst is taken as it is there; the wait (and the stop signal beside it)
        // is looked at once per burst.
        let ready = match burst.checked_sub(1) {
            Some(left) => {
                burst = left;
                // Each counts against the task's budget, as a wait would: a long burst yields
                // to the tasks it woke instead of starving them.
                tokio::task::coop::consume_budget().await;
                socket.try_recv_message().ok().flatten()
            }
            None => None,
        };
        let message = if let Some(message) = ready {
            Ok(message)
        } else {
            burst = rylm_transport::BURST;
            tokio::select! {
            _ = stopped.changed(), if !draining => {
                draining = true;
                if handlers.is_empty() {
                    break;
                }
                continue;
            }
            // Only a draining loop waits for its handlers: otherwise each handler that ends
            // would wake it, and a wake-up per call costs a thread hop.
            Some(_) = handlers.join_next(), if draining && !handlers.is_empty() => {
                if handlers.is_empty() {
                    break;
                }
                continue;
            }
            message = socket.recv_message() => message,
            }
        };
        // Forget the handlers that have ended (at most the slots and the queue).
        while handlers.try_join_next().is_some() {}
        let message = match message {
            Ok(message) => message,
            Err(error) if error.is_closed() => break,
            Err(error) => {
                tracing::warn!(%error, %address, "receiving failed");
                continue;
            }
        };
        // The frames after the routing identity, borrowed: nothing is copied before the MAC
        // is checked.
        let mut parts: [&[u8]; MAX_FRAMES] = [&[]; MAX_FRAMES];
        let count = message.len().saturating_sub(1);
        let Some(identity) = message.bytes(0) else {
            continue;
        };
        if count > MAX_FRAMES {
            tracing::warn!(%address, frames = count, "dropped a message of too many frames");
            continue;
        }
        for (index, part) in parts.iter_mut().enumerate().take(count) {
            *part = message.part(index + 1).unwrap_or_default();
        }
        let (frame, secret) = match protocol::decode(&parts[..count], &service.secrets, &binding) {
            Ok(Decoded::Frame(frame, secret)) => (frame, secret),
            Ok(Decoded::BadMac { id }) => {
                service.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%address, call = %id, "refused a frame whose MAC does not match: wrong shared secret, or bound to another instance");
                replier.send_later(
                    identity,
                    refusal(
                        id,
                        "wrong shared secret, or a request bound to another instance (the frame's MAC does not match)",
                    ),
                    0,
                );
                continue;
            }
            Err(error) => {
                service.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%address, %error, "dropped a malformed frame");
                continue;
            }
        };
        match frame {
            Frame::Request(request) => {
                if let Err(error) = guard.check(&request.id, request.ts, protocol::now_ms()) {
                    service.counters.replayed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%address, call = %request.id, %error, "refused a replayed or stale request");
                    replier.send_later(identity, refusal(request.id, &error.to_string()), secret);
                    continue;
                }
                let busy = |message: &str| {
                    ServiceResponse::new(503, message)
                        .with_header(BUSY, "true")
                        .into_wire(&request.id, &request.path)
                };
                if draining {
                    service.counters.busy.fetch_add(1, Ordering::Relaxed);
                    let response = busy("the service is shutting down");
                    replier.send_later(identity, Frame::Response(response), secret);
                    continue;
                }
                // At capacity and with the queue full: say so at once, so that the caller can
                // go elsewhere.
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => Ok(permit),
                    Err(_) => match queue.clone().try_acquire_owned() {
                        Ok(place) => Err(place),
                        Err(_) => {
                            service.counters.busy.fetch_add(1, Ordering::Relaxed);
                            let response = busy("busy: every handler slot is taken");
                            replier.send_later(identity, Frame::Response(response), secret);
                            continue;
                        }
                    },
                };
                let (service, replier, slots) = (service.clone(), replier.clone(), slots.clone());
                let call = async move {
                    let permit = match permit {
                        Ok(permit) => permit,
                        // A place in the queue: wait for a slot, off the receive loop.
                        Err(place) => {
                            let Ok(permit) = slots.acquire_owned().await else {
                                return;
                            };
                            drop(place);
                            permit
                        }
                    };
                    let (id, path) = (request.id.clone(), request.path.clone());
                    let response = service.dispatch(request).await;
                    replier
                        .send_response(identity, &id, &path, &response, secret)
                        .await;
                    drop(permit);
                };
                // The box of the last call answered here is used again.
                let mut call = match spare.take() {
                    Some(mut boxed) => {
                        Pin::set(&mut boxed, call);
                        boxed
                    }
                    None => Box::pin(call),
                };
                // One step in this loop first: a handler that answers without waiting (most
                // do) is answered here, without a task and a hop between threads; one that
                // waits goes on in a task of its own. A handler that computes for long before
                // it first waits would hold up this loop (and the heartbeats): after one such
                // step, the next handlers start in tasks of their own, and then the loop tries
                // again (a thread preempted in the middle of a step looks the same, so one slow
                // step does not cost the instance its fast path for good).
                if spawn_next > 0 {
                    spawn_next -= 1;
                    handlers.spawn(call);
                    continue;
                }
                let started = std::time::Instant::now();
                let done = futures_lite::future::poll_once(call.as_mut())
                    .await
                    .is_some();
                let took = started.elapsed();
                if took > INLINE_LIMIT {
                    spawn_next = SPAWNED_AFTER_SLOW;
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(%address, ?took, "a handler computed for long before its first await; handlers start in tasks of their own for a while (this is logged once)");
                    }
                }
                if done {
                    spare = Some(call);
                } else {
                    handlers.spawn(call);
                }
            }
            Frame::Ping(ping) => replier.send_later(
                identity,
                Frame::Pong(WireControl {
                    id: ping.id,
                    ts: protocol::now_ms(),
                    service: binding.service.clone(),
                    instance: binding.instance.clone(),
                    ..WireControl::default()
                }),
                secret,
            ),
            Frame::Discover(discover) => replier.send_later(
                identity,
                Frame::Routes(WireRoutes {
                    id: discover.id,
                    ts: protocol::now_ms(),
                    service: service.name.clone(),
                    routes: service.routes(),
                }),
                secret,
            ),
            other => {
                tracing::warn!(%address, frame = ?other, "ignored a frame a service does not expect")
            }
        }
    }
    // Graceful: the running handlers have finished and answered before the socket goes, and
    // the close flushes their answers (the transport's linger).
    socket.close().await;
    tracing::info!(%address, "service stopped");
}

fn refusal(id: String, reason: &str) -> Frame {
    Frame::Refusal(WireControl {
        id,
        ts: protocol::now_ms(),
        reason: reason.to_owned(),
        ..WireControl::default()
    })
}

/// The header of a `503` that says the instance is at capacity (as opposed to failing): the
/// caller may try another instance.
pub const BUSY: &str = "busy";
