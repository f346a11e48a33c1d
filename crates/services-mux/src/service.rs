//! A service instance: a ROUTER socket that routes authenticated requests by path and method.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use regex::Regex;
use rylm_transport::{Kind, Options, Socket};
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, watch};

use crate::Error;
use crate::protocol::{
    self, Decoded, Frame, Method, ReplayGuard, RouteInfo, Secret, WireControl, WireRequest,
    WireResponse, WireRoutes,
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
    methods: BTreeMap<Method, Handler>,
}

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
    secret: Secret,
    routes: Vec<Route>,
    concurrency: usize,
    replay_window: Duration,
    transport: Options,
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
            secret: Secret::new(secret),
            routes: Vec::new(),
            concurrency: 64,
            transport: Options::default(),
            replay_window: Duration::from_secs(30),
        }
    }

    /// Routes `method` on paths matching `pattern` (a regular expression; anchor it with `^`
    /// and `$` to match whole paths) to `handler`. Routes match in the order they are added;
    /// adding a method to an existing pattern extends that route.
    pub fn route<F, Fut>(
        mut self,
        pattern: &str,
        method: Method,
        handler: F,
    ) -> Result<Service, Error>
    where
        F: Fn(ServiceRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServiceResponse> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
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

    /// How many handlers run at once (default 64); further requests wait for a free slot.
    pub fn with_concurrency(mut self, concurrency: usize) -> Service {
        self.concurrency = concurrency.max(1);
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
    async fn dispatch(&self, request: WireRequest) -> ServiceResponse {
        let method: Method = match request.method.parse() {
            Ok(method) => method,
            Err(error) => return ServiceResponse::new(405, error.to_string()),
        };
        let mut allowed = BTreeSet::new();
        for route in &self.routes {
            let Some(captures) = route.pattern.captures(&request.path) else {
                continue;
            };
            let Some(handler) = route.methods.get(&method) else {
                allowed.extend(route.methods.keys().map(|m| m.as_str()));
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
            let view = ServiceRequest {
                id: request.id.clone(),
                path: request.path.clone(),
                method,
                captures: captures
                    .iter()
                    .map(|c| c.map(|m| m.as_str().to_owned()))
                    .collect(),
                named,
                arguments: request.arguments.clone(),
                headers: request.headers.clone(),
                body: Bytes::from(request.body.clone()),
            };
            // A task of its own, so that a panic becomes a 500 instead of killing the service.
            return match tokio::spawn(handler(view)).await {
                Ok(response) => response,
                Err(join_error) => {
                    tracing::error!(path = %request.path, %join_error, "a service handler panicked");
                    ServiceResponse::new(500, "the handler panicked")
                }
            };
        }
        if allowed.is_empty() {
            ServiceResponse::new(404, format!("no route for path {:?}", request.path))
        } else {
            let allowed: Vec<&str> = allowed.into_iter().collect();
            ServiceResponse::new(
                405,
                format!("method {method} not allowed on {:?}", request.path),
            )
            .with("allowed", allowed)
        }
    }

    /// Binds `address` (`tcp://127.0.0.1:0` picks a free port) and serves until the handle is
    /// shut down or dropped.
    pub async fn serve(self, address: &str) -> Result<ServiceHandle, Error> {
        let socket = Socket::new(Kind::Router, &self.transport)?;
        let bound = socket.bind(address).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(Arc::new(self), socket, stopped, bound.clone()));
        tracing::info!(address = %bound, "service listening");
        Ok(ServiceHandle {
            address: bound,
            stop,
            task: Some(task),
        })
    }
}

/// A running service instance.
#[derive(Debug)]
pub struct ServiceHandle {
    address: String,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServiceHandle {
    /// The address the instance is bound to, with the real port.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops taking requests, lets the running handlers finish and answer, then closes.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
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

async fn send(socket: &Socket, identity: Bytes, frame: &Frame, secret: &Secret) {
    let mut frames = match protocol::encode(frame, secret) {
        Ok(frames) => frames,
        Err(error) => {
            tracing::error!(%error, "cannot encode a reply");
            return;
        }
    };
    frames.insert(0, identity);
    if let Err(error) = socket.send(frames).await {
        // The caller went away: a ROUTER cannot send to an identity it no longer knows.
        tracing::warn!(%error, "could not send a reply; the caller is gone");
    }
}

async fn run(
    service: Arc<Service>,
    socket: Socket,
    mut stopped: watch::Receiver<bool>,
    address: String,
) {
    let slots = Arc::new(Semaphore::new(service.concurrency));
    let guard = Arc::new(std::sync::Mutex::new(ReplayGuard::new(
        service.replay_window.as_millis() as u64,
        100_000,
    )));
    let mut handlers = tokio::task::JoinSet::new();
    // While draining, heartbeats are still answered (so that callers do not take the instance
    // for dead while it finishes their calls) and new requests get a 503.
    let mut draining = false;
    loop {
        let message = tokio::select! {
            _ = stopped.changed(), if !draining => {
                draining = true;
                if handlers.is_empty() {
                    break;
                }
                continue;
            }
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {
                if draining && handlers.is_empty() {
                    break;
                }
                continue;
            }
            message = socket.recv() => message,
        };
        let mut frames = match message {
            Ok(frames) => frames,
            Err(error) if error.is_closed() => break,
            Err(error) => {
                tracing::warn!(%error, %address, "receiving failed");
                continue;
            }
        };
        if frames.is_empty() {
            continue;
        }
        let identity = frames.remove(0);
        let reply = |frame: Frame| {
            let (socket, service, identity) = (socket.clone(), service.clone(), identity.clone());
            async move { send(&socket, identity, &frame, &service.secret).await }
        };
        let frame = match protocol::decode(&frames, &service.secret) {
            Ok(Decoded::Frame(frame)) => frame,
            Ok(Decoded::BadMac { id }) => {
                tracing::warn!(%address, call = %id, "refused a frame whose MAC does not match: wrong shared secret");
                reply(refusal(
                    id,
                    "wrong shared secret (the frame's MAC does not match)",
                ))
                .await;
                continue;
            }
            Err(error) => {
                tracing::warn!(%address, %error, "dropped a malformed frame");
                continue;
            }
        };
        match frame {
            Frame::Request(request) => {
                let checked = guard.lock().unwrap_or_else(|e| e.into_inner()).check(
                    &request.id,
                    request.ts,
                    protocol::now_ms(),
                );
                if let Err(error) = checked {
                    tracing::warn!(%address, call = %request.id, %error, "refused a replayed or stale request");
                    reply(refusal(request.id, &error.to_string())).await;
                    continue;
                }
                if draining {
                    let response = ServiceResponse::new(503, "the service is shutting down")
                        .into_wire(&request.id, &request.path);
                    reply(Frame::Response(response)).await;
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (service, socket) = (service.clone(), socket.clone());
                handlers.spawn(async move {
                    let (id, path) = (request.id.clone(), request.path.clone());
                    let response = service.dispatch(request).await.into_wire(&id, &path);
                    send(
                        &socket,
                        identity,
                        &Frame::Response(response),
                        &service.secret,
                    )
                    .await;
                    drop(permit);
                });
            }
            Frame::Ping(ping) => {
                reply(Frame::Pong(WireControl {
                    id: ping.id,
                    ts: protocol::now_ms(),
                    reason: String::new(),
                }))
                .await
            }
            Frame::Discover(discover) => {
                reply(Frame::Routes(WireRoutes {
                    id: discover.id,
                    ts: protocol::now_ms(),
                    service: service.name.clone(),
                    routes: service.routes(),
                }))
                .await
            }
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
    })
}
