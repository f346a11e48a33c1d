//! The calling side: register services, call them synchronously or asynchronously.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regex::Regex;
use rylm_message::trace::{Hop, TRACEPARENT};
use rylm_transport::Options;
use serde_json::{Map, Value};
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use crate::protocol::{
    self, Frame, Method, RequestView, RouteInfo, Secret, WireControl, WireResponse,
};
use crate::{Error, ServiceResponse};

mod ids;
mod instance;

use ids::{BuildIdHasher, Ids};
use instance::{Instance, mark_dead, release, run_instance, send_frame, send_request};

/// A call to make: path, method, arguments, headers and body.
///
/// ```
/// use rylm_services_mux::{Call, Method};
/// let call = Call::new("/service/slow").method(Method::Get).argument("RETURN_DATA", "hi");
/// assert_eq!(call.path, "/service/slow");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The path the service routes on.
    pub path: String,
    /// The method (default `request`).
    pub method: Method,
    /// Named arguments.
    pub arguments: Map<String, Value>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
}

impl Call {
    /// A `request` call to `path` with nothing else.
    pub fn new(path: impl Into<String>) -> Call {
        Call {
            path: path.into(),
            method: Method::Request,
            arguments: Map::new(),
            headers: BTreeMap::new(),
            body: Bytes::new(),
        }
    }

    /// Sets the method.
    pub fn method(mut self, method: Method) -> Call {
        self.method = method;
        self
    }

    /// Adds an argument.
    pub fn argument(mut self, name: impl Into<String>, value: impl Into<Value>) -> Call {
        self.arguments.insert(name.into(), value.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Call {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Call {
        self.body = body.into();
        self
    }
}

/// What a synchronous call gives back.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The call's id.
    pub id: String,
    /// The address of the instance that answered.
    pub instance: String,
    /// The service's response.
    pub response: ServiceResponse,
    /// What the response handler registered for the path returned, if there is one (it runs
    /// once per response).
    pub handled: Option<Value>,
}

type HandlerFuture = Pin<Box<dyn Future<Output = Value> + Send>>;
type ResponseHandler = Arc<dyn Fn(String, ServiceResponse) -> HandlerFuture + Send + Sync>;

/// Timing of heartbeats and calls.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How often each instance is pinged (default 1 s).
    pub heartbeat_interval: Duration,
    /// How many intervals of silence make an instance dead (default 3).
    pub heartbeat_misses: u32,
    /// The deadline of calls that give none (default 30 s).
    pub default_deadline: Duration,
    /// The sockets' options, security among them (default: `rylm-transport`'s safe defaults,
    /// NULL security).
    pub transport: Options,
    /// Carry W3C trace context: a call without a `traceparent` header starts a trace, and
    /// each call is a span `rylm.service.call` of it (default true).
    pub trace: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_misses: 3,
            default_deadline: Duration::from_secs(30),
            transport: Options::default(),
            trace: true,
        }
    }
}

enum Waiter {
    Sync(oneshot::Sender<Result<WireResponse, Error>>),
    Async,
    Discover(oneshot::Sender<Result<Vec<RouteInfo>, Error>>),
}

struct Pending {
    instance: Arc<Instance>,
    path: String,
    waiter: Waiter,
    /// When the call's deadline passes (an asynchronous call's handler then gets a 504).
    expires: Instant,
}

struct Registered {
    secret: Secret,
    instances: Vec<Arc<Instance>>,
}

struct Inner {
    config: ClientConfig,
    /// What `Instance::last_seen` counts from.
    started: Instant,
    services: std::sync::Mutex<HashMap<String, Registered>>,
    /// By call number ([`Ids`]).
    pending: std::sync::Mutex<HashMap<u64, Pending, BuildIdHasher>>,
    handlers: std::sync::RwLock<Vec<(Regex, ResponseHandler)>>,
    /// Signalled whenever an instance becomes live.
    live_changed: Notify,
    round_robin: AtomicUsize,
    ids: Ids,
}

/// The calling side of services-mux. Cheap to clone; clones share everything.
///
/// ```no_run
/// # async fn example() -> Result<(), rylm_services_mux::Error> {
/// use std::time::Duration;
/// use rylm_services_mux::{Call, ServiceClient};
///
/// let client = ServiceClient::new();
/// client.register("slow", &["tcp://127.0.0.1:9998"], "my_shared_secret");
/// let reply = client.call("slow", Call::new("/service/slow").argument("RETURN_DATA", "hi"), Some(Duration::from_secs(10))).await?;
/// println!("{} {}", reply.response.status, reply.response.status_msg);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services = self
            .inner
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f.debug_struct("ServiceClient")
            .field("services", &services.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for ServiceClient {
    fn default() -> Self {
        ServiceClient::new()
    }
}

impl ServiceClient {
    /// A client with the default timing.
    pub fn new() -> ServiceClient {
        ServiceClient::with_config(ClientConfig::default())
    }

    /// A client with this timing.
    pub fn with_config(config: ClientConfig) -> ServiceClient {
        ServiceClient {
            inner: Arc::new(Inner {
                config,
                started: Instant::now(),
                services: std::sync::Mutex::new(HashMap::new()),
                pending: std::sync::Mutex::new(HashMap::default()),
                handlers: std::sync::RwLock::new(Vec::new()),
                live_changed: Notify::new(),
                round_robin: AtomicUsize::new(0),
                ids: Ids::new(),
            }),
        }
    }

    /// Registers `service` at these instance addresses with its shared secret. New addresses
    /// join the service's instances; the secret replaces the one the service had, for every
    /// instance (a rotation: calls from now on are signed with it). Connections are made in
    /// the background; calls wait (within their deadline) for a live instance.
    pub fn register(&self, service: &str, addresses: &[&str], secret: impl AsRef<[u8]>) {
        let secret = Secret::new(&secret);
        let mut services = self
            .inner
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let registered = services
            .entry(service.to_owned())
            .or_insert_with(|| Registered {
                secret: secret.clone(),
                instances: Vec::new(),
            });
        registered.secret = secret.clone();
        for instance in &registered.instances {
            instance.rotate(&secret);
        }
        for address in addresses {
            if registered.instances.iter().any(|i| i.address == *address) {
                continue;
            }
            let instance = Arc::new(Instance::new(address, secret.clone()));
            registered.instances.push(instance.clone());
            let task = tokio::spawn(run_instance(Arc::downgrade(&self.inner), instance.clone()));
            *instance.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
    }

    /// Removes the instance at `address` from `service`: its connection closes and the calls
    /// waiting on it fail. False when it was not registered.
    pub fn remove(&self, service: &str, address: &str) -> bool {
        let removed = {
            let mut services = self
                .inner
                .services
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(registered) = services.get_mut(service) else {
                return false;
            };
            let Some(index) = registered
                .instances
                .iter()
                .position(|i| i.address == address)
            else {
                return false;
            };
            registered.instances.remove(index)
        };
        if let Some(task) = removed
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        mark_dead(&self.inner, &removed, Duration::ZERO);
        true
    }

    /// Registers the handler that gets the responses on paths matching `pattern`: the
    /// responses of asynchronous calls, and (once) those of synchronous calls, whose
    /// [`Reply::handled`] carries what it returned.
    pub fn on_response<F, Fut>(&self, pattern: &str, handler: F) -> Result<(), Error>
    where
        F: Fn(String, ServiceResponse) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Value> + Send + 'static,
    {
        let regex = Regex::new(pattern).map_err(|e| Error::InvalidRoute {
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })?;
        let handler: ResponseHandler =
            Arc::new(move |path, response| Box::pin(handler(path, response)));
        self.inner
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((regex, handler));
        Ok(())
    }

    /// Calls `service` and waits for the response, up to `deadline` (the configured default
    /// when `None`). Other calls go on meanwhile, on the same connections.
    pub async fn call(
        &self,
        service: &str,
        mut call: Call,
        deadline: Option<Duration>,
    ) -> Result<Reply, Error> {
        let span = self.traced(&mut call);
        self.call_now(service, call, deadline)
            .instrument(span)
            .await
    }

    /// With tracing on: `call` continues its `traceparent` (or starts a trace) under a span
    /// of this client, whose id the request carries.
    fn traced(&self, call: &mut Call) -> tracing::Span {
        if !self.inner.config.trace {
            return tracing::Span::none();
        }
        let hop = Hop::continue_from(call.headers.get(TRACEPARENT).map(String::as_str));
        call.headers.insert(TRACEPARENT.into(), hop.traceparent());
        hop.span("rylm.service.call")
    }

    async fn call_now(
        &self,
        service: &str,
        call: Call,
        deadline: Option<Duration>,
    ) -> Result<Reply, Error> {
        let deadline = deadline.unwrap_or(self.inner.config.default_deadline);
        let started = Instant::now();
        // An instance at capacity answers `503 busy` at once: try the others, each once.
        let mut busy: Vec<Arc<Instance>> = Vec::new();
        let (id, instance, response) = loop {
            let (sender, receiver) = oneshot::channel();
            let (id, instance) = self
                .dispatch(
                    service,
                    &call,
                    Waiter::Sync(sender),
                    deadline.saturating_sub(started.elapsed()),
                    &busy,
                )
                .await?;
            let mut cleanup = PendingGuard {
                inner: &self.inner,
                id,
                settled: false,
            };
            let remaining = deadline.saturating_sub(started.elapsed());
            let outcome = match tokio::time::timeout(remaining, receiver).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        path: call.path,
                        waited: deadline,
                    });
                }
                Ok(Err(_)) => return Err(Error::Closed),
                Ok(Ok(outcome)) => outcome,
            };
            // Whoever sent the outcome took the call out of the pending map.
            cleanup.settled = true;
            let response = outcome?;
            if response.status == 503 && response.headers.contains_key(crate::service::BUSY) {
                tracing::debug!(instance = %instance.address, "the instance is busy; trying another");
                busy.push(instance);
                continue;
            }
            break (id, instance, response);
        };
        let response = ServiceResponse::from_wire(response);
        let handled = match self.response_handler(&call.path) {
            Some(handler) => Some(handler(call.path, response.clone()).await),
            None => None,
        };
        Ok(Reply {
            id: self.inner.ids.text(id).as_str().to_owned(),
            instance: instance.address.clone(),
            response,
            handled,
        })
    }

    /// Sends the call and returns its id at once; the response goes to the handler
    /// registered for its path with [`ServiceClient::on_response`]. If the instance dies
    /// first, the handler gets a 503 response saying so.
    pub async fn send(&self, service: &str, mut call: Call) -> Result<String, Error> {
        let span = self.traced(&mut call);
        self.send_now(service, call).instrument(span).await
    }

    async fn send_now(&self, service: &str, call: Call) -> Result<String, Error> {
        let deadline = self.inner.config.default_deadline;
        let (id, _) = self
            .dispatch(service, &call, Waiter::Async, deadline, &[])
            .await?;
        Ok(self.inner.ids.text(id).as_str().to_owned())
    }

    /// The routes of `service`, as one of its instances lists them.
    pub async fn discover(
        &self,
        service: &str,
        deadline: Option<Duration>,
    ) -> Result<Vec<RouteInfo>, Error> {
        let deadline = deadline.unwrap_or(self.inner.config.default_deadline);
        let started = Instant::now();
        let instance = self.live_instance(service, deadline, &[]).await?;
        let id = self.inner.ids.next();
        let (sender, receiver) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Pending {
                    instance: instance.clone(),
                    path: "*".into(),
                    waiter: Waiter::Discover(sender),
                    expires: started + deadline,
                },
            );
        let _cleanup = PendingGuard {
            inner: &self.inner,
            id,
            settled: false,
        };
        let frame = Frame::Discover(WireControl {
            id: self.inner.ids.text(id).as_str().to_owned(),
            ts: protocol::now_ms(),
            ..WireControl::default()
        });
        send_frame(&instance, &frame).await?;
        match tokio::time::timeout(deadline.saturating_sub(started.elapsed()), receiver).await {
            Err(_) => Err(Error::Timeout {
                path: "discovery".into(),
                waited: deadline,
            }),
            Ok(Err(_)) => Err(Error::Closed),
            Ok(Ok(outcome)) => outcome,
        }
    }

    /// How many calls are waiting for a response.
    pub fn in_flight(&self) -> usize {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn response_handler(&self, path: &str) -> Option<ResponseHandler> {
        let handlers = self
            .inner
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner());
        handlers
            .iter()
            .find(|(regex, _)| regex.is_match(path))
            .map(|(_, h)| h.clone())
    }

    /// Picks a live instance (fewest calls in flight, ties in turn) other than those in
    /// `busy`, waiting for one up to `deadline`; [`Error::Busy`] at once when every live
    /// instance is in `busy`.
    async fn live_instance(
        &self,
        service: &str,
        deadline: Duration,
        busy: &[Arc<Instance>],
    ) -> Result<Arc<Instance>, Error> {
        let started = Instant::now();
        loop {
            let notified = self.inner.live_changed.notified();
            {
                let services = self
                    .inner
                    .services
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let registered = services
                    .get(service)
                    .ok_or_else(|| Error::UnknownService(service.to_owned()))?;
                let turn = self.inner.round_robin.fetch_add(1, Ordering::Relaxed);
                let count = registered.instances.len().max(1);
                let mut any_live = false;
                let mut best: Option<(usize, &Arc<Instance>)> = None;
                for k in 0..registered.instances.len() {
                    let instance = &registered.instances[(turn + k) % count];
                    if !instance.live.load(Ordering::Acquire) {
                        continue;
                    }
                    any_live = true;
                    if busy.iter().any(|b| Arc::ptr_eq(b, instance)) {
                        continue;
                    }
                    let in_flight = instance.in_flight.load(Ordering::Relaxed);
                    if best.is_none_or(|(fewest, _)| in_flight < fewest) {
                        best = Some((in_flight, instance));
                    }
                }
                if let Some((_, instance)) = best {
                    return Ok(instance.clone());
                }
                if any_live {
                    return Err(Error::Busy {
                        service: service.to_owned(),
                    });
                }
                // Every instance refuses us: a wrong secret. Say so now, not at the deadline.
                let refusals: Vec<(String, String)> = registered
                    .instances
                    .iter()
                    .filter_map(|instance| {
                        instance
                            .refusal()
                            .map(|reason| (instance.address.clone(), reason))
                    })
                    .collect();
                if !registered.instances.is_empty() && refusals.len() == registered.instances.len()
                {
                    let (address, reason) = refusals.into_iter().next().unwrap_or_default();
                    return Err(Error::Refused { address, reason });
                }
            }
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() || tokio::time::timeout(remaining, notified).await.is_err() {
                return Err(Error::NoLiveInstance {
                    service: service.to_owned(),
                    waited: deadline,
                });
            }
        }
    }

    async fn dispatch(
        &self,
        service: &str,
        call: &Call,
        waiter: Waiter,
        deadline: Duration,
        busy: &[Arc<Instance>],
    ) -> Result<(u64, Arc<Instance>), Error> {
        let instance = self.live_instance(service, deadline, busy).await?;
        let id = self.inner.ids.next();
        // Only an asynchronous call's response handler needs the path later.
        let path = match waiter {
            Waiter::Async => call.path.clone(),
            _ => String::new(),
        };
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Pending {
                    instance: instance.clone(),
                    path,
                    waiter,
                    expires: Instant::now() + deadline,
                },
            );
        instance.in_flight.fetch_add(1, Ordering::Relaxed);
        let text = self.inner.ids.text(id);
        let request = RequestView {
            id: text.as_str(),
            ts: protocol::now_ms(),
            path: &call.path,
            method: call.method.as_str(),
            arguments: &call.arguments,
            headers: &call.headers,
            body: &call.body,
        };
        if let Err(error) = send_request(&self.inner, &instance, id, &request).await {
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            release(&instance);
            return Err(error);
        }
        Ok((id, instance))
    }
}

/// Removes a call's pending entry however the call ends (answer, deadline, cancellation).
struct PendingGuard<'a> {
    inner: &'a Inner,
    id: u64,
    /// The entry is already gone (the call was answered).
    settled: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let removed = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if let Some(pending) = removed {
            release(&pending.instance);
        }
    }
}
