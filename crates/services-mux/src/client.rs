//! The calling side: register services, call them synchronously or asynchronously.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use regex::Regex;
use rylm_message::trace::{Hop, TRACEPARENT};
use rylm_transport::{Event, Kind, Options, Outbox, Socket, Undelivered};
use serde_json::{Map, Value};
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use crate::protocol::{
    self, Binding, Decoded, Frame, Method, RequestView, RouteInfo, Secret, WireControl,
    WireResponse,
};
use crate::{Error, ServiceResponse};

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

struct Instance {
    address: String,
    /// What every call and every answer needs (secrets, binding, socket), read without a
    /// lock; replaced whole when any of it changes.
    link: ArcSwap<Link>,
    live: AtomicBool,
    in_flight: AtomicUsize,
    /// When it last sent an authenticated frame, in ms after the client's start plus one (0:
    /// never).
    last_seen: AtomicU64,
    /// Why the instance refused our heartbeats (a wrong secret), until it accepts one; the
    /// flag says whether there is a reason, so that answers need not take the lock.
    refused: std::sync::Mutex<Option<String>>,
    refusing: AtomicBool,
    /// Its connection and heartbeat task, stopped when the instance is removed.
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Requests on their way to it, handed to its socket in bursts.
    outbox: Arc<Outbox<u64>>,
}

/// How to reach and authenticate an instance.
#[derive(Clone)]
struct Link {
    /// The shared secret first, then the one it replaced (answers to calls signed with the
    /// previous one may still be on their way); `register` may replace it (rotation).
    secrets: Vec<Secret>,
    /// What requests to this instance are bound to, from its last pong; `None` until then.
    binding: Option<Arc<Binding>>,
    socket: Option<Socket>,
}

impl Instance {
    fn new(address: &str, secret: Secret) -> Instance {
        Instance {
            address: address.to_owned(),
            link: ArcSwap::from_pointee(Link {
                secrets: vec![secret],
                binding: None,
                socket: None,
            }),
            live: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_seen: AtomicU64::new(0),
            outbox: Arc::default(),
            refused: std::sync::Mutex::new(None),
            refusing: AtomicBool::new(false),
            task: std::sync::Mutex::new(None),
        }
    }

    /// Changes the link (rare: rotation, a pong, a connection or its loss).
    fn relink(&self, change: impl Fn(&mut Link)) {
        self.link.rcu(|link| {
            let mut link = Link::clone(link);
            change(&mut link);
            link
        });
    }

    fn rotate(&self, secret: &Secret) {
        self.relink(|link| {
            let current = std::mem::replace(&mut link.secrets[0], secret.clone());
            link.secrets.truncate(1);
            link.secrets.push(current);
        });
    }

    fn binding(&self) -> Option<Arc<Binding>> {
        self.link.load().binding.clone()
    }

    fn refusal(&self) -> Option<String> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_refused(&self, reason: Option<String>) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        self.refusing.store(reason.is_some(), Ordering::Release);
        *refused = reason;
    }

    /// An authenticated frame came from the instance, `now` after the client's start: it was
    /// seen, it accepts us, and it is live (true when it was not until now).
    fn heard(&self, now: Duration) -> bool {
        self.last_seen
            .fetch_max(now.as_millis() as u64 + 1, Ordering::Relaxed);
        if self.refusing.load(Ordering::Acquire) {
            self.set_refused(None);
        }
        !self.live.load(Ordering::Acquire) && !self.live.swap(true, Ordering::AcqRel)
    }

    /// How long the instance has been silent at `now` after the client's start; `None` before
    /// it was first heard.
    fn silent_for(&self, now: Duration) -> Option<Duration> {
        match self.last_seen.load(Ordering::Relaxed) {
            0 => None,
            seen => Some(now.saturating_sub(Duration::from_millis(seen - 1))),
        }
    }
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

/// Hashes call numbers, which this client counts itself (a peer cannot choose the keys of
/// the pending map), by one multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type BuildIdHasher = std::hash::BuildHasherDefault<IdHasher>;

/// Call ids: unique per client (a random prefix, then a counter), which is what the services'
/// replay guards need; cheaper than a random id per call.
struct Ids {
    prefix: String,
    counter: AtomicU64,
}

/// The longest id [`Ids`] writes: a uuid, a dash and 16 hex digits.
const ID_CAPACITY: usize = 64;

/// An id as text, on the stack.
struct IdText {
    bytes: [u8; ID_CAPACITY],
    len: usize,
}

impl IdText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl Ids {
    fn new() -> Ids {
        let mut prefix = rylm_message::new_id();
        prefix.truncate(ID_CAPACITY - 17);
        Ids {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// The next call's number; [`Ids::text`] gives the id on the wire.
    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The id of call `n`: the prefix, a dash, `n` in hex without leading zeros.
    fn text(&self, n: u64) -> IdText {
        let mut text = IdText {
            bytes: [0; ID_CAPACITY],
            len: self.prefix.len() + 1,
        };
        text.bytes[..self.prefix.len()].copy_from_slice(self.prefix.as_bytes());
        text.bytes[self.prefix.len()] = b'-';
        let digits = 16 - (n.leading_zeros() as usize / 4).min(15);
        for shift in (0..digits).rev() {
            text.bytes[text.len] = b"0123456789abcdef"[((n >> (shift * 4)) & 0xf) as usize];
            text.len += 1;
        }
        text
    }

    /// The number of a call of this client from its id on the wire (None for any other id,
    /// and for ids not written as [`Ids::text`] writes them).
    fn parse(&self, id: &str) -> Option<u64> {
        let digits = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        if digits.is_empty() || digits.len() > 16 || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        digits.bytes().try_fold(0u64, |n, digit| {
            let value = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                _ => return None,
            };
            Some((n << 4) | u64::from(value))
        })
    }
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

/// One call on `instance` is over.
fn release(instance: &Instance) {
    let _ = instance
        .in_flight
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

/// Sends call `id`'s request to `instance`, bound to it (it waits for the instance's pong),
/// through the instance's outbox. An error here is the caller's; one met later fails the call
/// through its pending entry.
async fn send_request(
    inner: &Arc<Inner>,
    instance: &Arc<Instance>,
    id: u64,
    request: &RequestView<'_>,
) -> Result<(), Error> {
    let (frames, socket) = encoded(instance, |link| {
        let binding = link
            .binding
            .as_deref()
            .ok_or_else(|| not_connected(instance))?;
        protocol::encode_request(request, &link.secrets[0], binding)
    })?;
    let in_flight = instance.in_flight.load(Ordering::Relaxed);
    instance
        .outbox
        .send(id, &socket, frames, inner, in_flight)
        .await?;
    Ok(())
}

impl Undelivered<u64> for Inner {
    /// Call `call`'s request could not be sent: the call fails.
    fn undelivered(&self, call: u64, error: rylm_transport::Error) {
        let failed = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
        if let Some(pending) = failed {
            release(&pending.instance);
            fail(self, call, pending, error.into());
        }
    }
}

/// Sends a control frame (a ping, a discovery request) to `instance`; control frames are not
/// bound to an instance (requests go through [`send_request`]).
async fn send_frame(instance: &Instance, frame: &Frame) -> Result<(), Error> {
    send_with(instance, |link| {
        protocol::encode(frame, &link.secrets[0], &Binding::default())
    })
    .await
}

/// Sends what `encode` writes with the instance's current link, on its socket.
async fn send_with(
    instance: &Instance,
    encode: impl FnOnce(&Link) -> Result<Vec<Bytes>, Error>,
) -> Result<(), Error> {
    let (frames, socket) = encoded(instance, encode)?;
    Ok(socket.send(frames).await?)
}

/// What `encode` writes with the instance's current link, and the link's socket.
fn encoded(
    instance: &Instance,
    encode: impl FnOnce(&Link) -> Result<Vec<Bytes>, Error>,
) -> Result<(Vec<Bytes>, Socket), Error> {
    let link = instance.link.load();
    let Some(socket) = &link.socket else {
        return Err(not_connected(instance));
    };
    Ok((encode(&link)?, socket.clone()))
}

fn not_connected(instance: &Instance) -> Error {
    Error::NoLiveInstance {
        service: instance.address.clone(),
        waited: Duration::ZERO,
    }
}

/// Connects to one instance, pings it, and routes what it sends back.
async fn run_instance(inner: Weak<Inner>, instance: Arc<Instance>) {
    let Some(config) = inner.upgrade().map(|i| i.config.clone()) else {
        return;
    };
    // The transport dials in the background and again whenever the instance goes away; the
    // instance is live again as soon as it answers a ping.
    let socket = match Socket::new(Kind::Dealer, &config.transport) {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!(address = %instance.address, %error, "cannot create a socket for the instance");
            return;
        }
    };
    let mut events = socket.events();
    if let Err(error) = socket.connect(&instance.address).await {
        tracing::error!(address = %instance.address, %error, "cannot connect to the instance");
        return;
    }
    instance.relink(|link| link.socket = Some(socket.clone()));
    let dead_after = config.heartbeat_interval * config.heartbeat_misses;
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    loop {
        tokio::select! {
            message = socket.recv_message() => {
                let Some(inner) = inner.upgrade() else { break };
                match message {
                    Ok(message) => {
                        on_frame(&inner, &instance, &message);
                        // The rest of a burst without waiting again.
                        for _ in 1..rylm_transport::BURST {
                            // Each counts against the task's budget, as a wait would: a long burst
                            // yields to the tasks it woke instead of starving them.
                            tokio::task::coop::consume_budget().await;
                            let Ok(Some(message)) = socket.try_recv_message() else { break };
                            on_frame(&inner, &instance, &message);
                        }
                    }
                    Err(error) if error.is_closed() => break,
                    Err(error) => tracing::warn!(address = %instance.address, %error, "receiving failed"),
                }
            }
            event = events.next() => {
                let Some(inner) = inner.upgrade() else { break };
                // A lost connection fails the calls on it at once, rather than at the deadline.
                if let Some(Event::Disconnected { .. }) = event {
                    mark_dead(&inner, &instance, Duration::ZERO);
                }
            }
            _ = ticker.tick() => {
                let Some(inner) = inner.upgrade() else { break };
                let silent_for = instance.silent_for(inner.started.elapsed());
                if let Some(silent_for) = silent_for.filter(|s| *s > dead_after) {
                    mark_dead(&inner, &instance, silent_for);
                }
                expire_async(&inner, &instance);
                let ping = Frame::Ping(WireControl { id: inner.ids.text(inner.ids.next()).as_str().to_owned(), ts: protocol::now_ms(), ..WireControl::default() });
                if let Err(error) = send_frame(&instance, &ping).await {
                    tracing::debug!(address = %instance.address, %error, "ping failed");
                }
            }
        }
    }
    instance.relink(|link| link.socket = None);
    socket.close().await;
}

fn mark_dead(inner: &Inner, instance: &Instance, silent_for: Duration) {
    if !instance.live.swap(false, Ordering::AcqRel) {
        return;
    }
    instance.in_flight.store(0, Ordering::Relaxed);
    // A new start of the instance has a new id: learn it from its next pong.
    instance.relink(|link| link.binding = None);
    tracing::warn!(address = %instance.address, ?silent_for, "instance stopped answering heartbeats");
    let failed: Vec<(u64, Pending)> = {
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| std::ptr::eq(&*p.instance, instance))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| pending.remove(&id).map(|p| (id, p)))
            .collect()
    };
    for (id, pending) in failed {
        let error = Error::InstanceDead {
            address: instance.address.clone(),
            silent_for,
        };
        fail(inner, id, pending, error);
    }
}

/// Ends call `id`, already out of the pending map, with `error` (an asynchronous call's
/// handler gets it as a 503 response).
fn fail(inner: &Inner, id: u64, pending: Pending, error: Error) {
    match pending.waiter {
        Waiter::Sync(sender) => {
            let _ = sender.send(Err(error));
        }
        Waiter::Discover(sender) => {
            let _ = sender.send(Err(error));
        }
        Waiter::Async => {
            let response = ServiceResponse::new(503, error.to_string());
            let id = inner.ids.text(id).as_str().to_owned();
            deliver_async(inner, id, pending.path, response);
        }
    }
}

/// Asynchronous calls on `address` past their deadline: removed, and their handlers answered
/// 504 (a synchronous call's own timeout removes it).
fn expire_async(inner: &Inner, instance: &Instance) {
    let now = Instant::now();
    let expired: Vec<(u64, Pending)> = {
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| {
                std::ptr::eq(&*p.instance, instance)
                    && p.expires <= now
                    && matches!(p.waiter, Waiter::Async)
            })
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| pending.remove(&id).map(|p| (id, p)))
            .collect()
    };
    for (id, pending) in expired {
        release(instance);
        let response = ServiceResponse::new(504, "no response within the call's deadline");
        let id = inner.ids.text(id).as_str().to_owned();
        deliver_async(inner, id, pending.path, response);
    }
}

fn deliver_async(inner: &Inner, id: String, path: String, response: ServiceResponse) {
    let handler = {
        let handlers = inner.handlers.read().unwrap_or_else(|e| e.into_inner());
        handlers
            .iter()
            .find(|(regex, _)| regex.is_match(&path))
            .map(|(_, h)| h.clone())
    };
    match handler {
        Some(handler) => {
            tokio::spawn(async move {
                let _ = handler(path, response).await;
            });
        }
        None => {
            tracing::debug!(call = %id, %path, "no response handler for an asynchronous call's response")
        }
    }
}

fn on_frame(inner: &Inner, instance: &Instance, message: &rylm_transport::Received) {
    // Borrowed: nothing is copied before the MAC is checked.
    let mut parts: [&[u8]; 4] = [&[]; 4];
    if message.len() > parts.len() {
        tracing::warn!(address = %instance.address, frames = message.len(), "dropped a message of too many frames");
        return;
    }
    for (index, part) in parts.iter_mut().enumerate().take(message.len()) {
        *part = message.part(index).unwrap_or_default();
    }
    let frames = &parts[..message.len()];
    let link = instance.link.load();
    let unbound = Binding::default();
    let binding = link.binding.as_deref().unwrap_or(&unbound);
    let frame = match protocol::decode(frames, &link.secrets, binding) {
        Ok(Decoded::Frame(frame, _)) => frame,
        Ok(Decoded::BadMac { id }) => {
            tracing::warn!(address = %instance.address, call = %id, "dropped a response whose MAC does not match");
            return;
        }
        Err(error) => {
            tracing::warn!(address = %instance.address, %error, "dropped a malformed frame");
            return;
        }
    };
    let mut bound = link.binding.is_some();
    drop(link);
    if let Frame::Pong(pong) = &frame {
        let learned = Binding {
            service: pong.service.clone(),
            instance: pong.instance.clone(),
        };
        if instance.binding().as_deref() != Some(&learned) {
            tracing::debug!(address = %instance.address, instance = %learned.instance, "bound to the instance");
            let learned = Arc::new(learned);
            instance.relink(|link| link.binding = Some(learned.clone()));
        }
        bound = true;
    }
    // Live once it answers a ping (and so is bound); any other authenticated frame is news too.
    if !matches!(frame, Frame::Refusal(_)) && bound && instance.heard(inner.started.elapsed()) {
        tracing::debug!(address = %instance.address, "instance is live");
        inner.live_changed.notify_waiters();
    }
    let key = inner.ids.parse(frame.id());
    let pending = key.and_then(|key| {
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
    });
    let (Some(key), Some(pending)) = (key, pending) else {
        if let Frame::Refusal(refusal) = &frame {
            // A refused heartbeat: this instance does not accept our secret.
            tracing::warn!(address = %instance.address, reason = %refusal.reason, "the instance refuses this client");
            instance.set_refused(Some(refusal.reason.clone()));
            inner.live_changed.notify_waiters();
            return;
        }
        if !matches!(frame, Frame::Pong(_)) {
            tracing::debug!(call = %frame.id(), "dropped an answer nobody waits for (late, or replayed)");
        }
        return;
    };
    if !std::ptr::eq(&*pending.instance, instance) {
        // An answer for a call made elsewhere: not this instance's to settle.
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, pending);
        return;
    }
    release(instance);
    match (frame, pending.waiter) {
        (Frame::Response(response), Waiter::Sync(sender)) => {
            let _ = sender.send(Ok(response));
        }
        (Frame::Response(response), Waiter::Async) => {
            deliver_async(
                inner,
                response.id.clone(),
                pending.path,
                ServiceResponse::from_wire(response),
            );
        }
        (Frame::Routes(routes), Waiter::Discover(sender)) => {
            let _ = sender.send(Ok(routes.routes));
        }
        (Frame::Refusal(refusal), waiter) => {
            tracing::warn!(address = %instance.address, reason = %refusal.reason, "the service refused a call");
            let error = || Error::Refused {
                address: instance.address.clone(),
                reason: refusal.reason.clone(),
            };
            match waiter {
                Waiter::Sync(sender) => {
                    let _ = sender.send(Err(error()));
                }
                Waiter::Discover(sender) => {
                    let _ = sender.send(Err(error()));
                }
                Waiter::Async => deliver_async(
                    inner,
                    refusal.id,
                    pending.path,
                    ServiceResponse::new(401, refusal.reason),
                ),
            }
        }
        (other, _) => tracing::warn!(frame = ?other, "an answer of the wrong kind"),
    }
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn ids_are_the_prefix_and_a_hex_counter() {
        let ids = Ids::new();
        let first = ids.next();
        assert_eq!(ids.text(first).as_str(), format!("{}-0", ids.prefix));
        for expected in 1..=300u64 {
            let n = ids.next();
            let text = ids.text(n);
            assert_eq!(text.as_str(), format!("{}-{expected:x}", ids.prefix));
            assert_eq!(ids.parse(text.as_str()), Some(expected));
        }
        ids.counter
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let last = ids.text(ids.next());
        assert_eq!(last.as_str(), format!("{}-ffffffffffffffff", ids.prefix));
        assert_eq!(ids.parse(last.as_str()), Some(u64::MAX));
        // Two clients never share a prefix.
        assert_ne!(Ids::new().prefix, ids.prefix);
    }

    #[test]
    fn only_this_clients_ids_in_their_own_spelling_parse() {
        let ids = Ids::new();
        let other = Ids::new();
        assert_eq!(ids.parse(other.text(5).as_str()), None);
        for foreign in ["", "-1", "x", "1"] {
            assert_eq!(ids.parse(foreign), None, "{foreign:?}");
        }
        for spelling in ["", "05", "A", "g", "10000000000000000", "+1"] {
            let id = format!("{}-{spelling}", ids.prefix);
            assert_eq!(ids.parse(&id), None, "{id}");
        }
        assert_eq!(ids.parse(&format!("{}-0", ids.prefix)), Some(0));
    }
}
