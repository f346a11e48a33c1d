//! The proxy's HTTP side: the listener and its limits (connections, header and body time,
//! body size), the routes, and who may use which (the operator's token, the registration
//! token, each node's own token).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry as MetricsRegistry;
use rylm_gilmour::node::Node;
use serde_json::Value;
use tokio::sync::watch;

use crate::api::{self, Role, Status};
use crate::calls::{publish_request, publish_signal, refused_response};
use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::registry::{self, Entry, Registry};
use crate::{Error, watchdog};

pub(crate) type HttpClient = LegacyClient<HttpConnector, Full<Bytes>>;

/// What every route and task of one proxy shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) http: HttpClient,
    /// For health checks: a connection each, not kept (one check per node every interval
    /// would otherwise hold an idle connection, and its buffers, per node).
    pub(crate) checks: HttpClient,
    pub(crate) metrics: Arc<Metrics>,
    /// Told when a node is freed, to give the memory back (see `memory`).
    pub(crate) freed: Arc<tokio::sync::Notify>,
    /// The one Gilmour node (two Redis connections) every registered node's handlers,
    /// requests and signals go through.
    pub(crate) gilmour: Node,
    /// What `/metrics` encodes, made once the rest exists.
    pub(crate) metrics_registry: std::sync::OnceLock<MetricsRegistry>,
}

/// The proxy's state, read at each scrape.
#[derive(Debug)]
struct Live(std::sync::Weak<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.0.upgrade() else {
            return Ok(());
        };
        let whole = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let gilmour = &shared.gilmour;
        rylm_admin::gauge(
            &mut encoder,
            "gilmour_proxy_nodes",
            "nodes registered",
            whole(shared.registry().len()),
        )?;
        rylm_admin::gauge(
            &mut encoder,
            "gilmour_proxy_redis_connected",
            "1 when both Redis connections are up",
            i64::from(gilmour.is_connected()),
        )?;
        rylm_admin::gauge(
            &mut encoder,
            "gilmour_proxy_queued",
            "handlers waiting for a place to run",
            whole(gilmour.queued()),
        )?;
        rylm_admin::gauge(
            &mut encoder,
            "gilmour_proxy_pending",
            "requests of the nodes waiting for their reply",
            whole(gilmour.pending()),
        )?;
        let counters = gilmour.counters();
        for (name, help, value) in [
            (
                "gilmour_proxy_busy",
                "requests answered 503 busy",
                &counters.busy,
            ),
            (
                "gilmour_proxy_dropped",
                "messages dropped: no sender",
                &counters.dropped,
            ),
            (
                "gilmour_proxy_lagged",
                "messages lost: the subscriber connection's buffer overflowed",
                &counters.lagged,
            ),
        ] {
            rylm_admin::counter(
                &mut encoder,
                name,
                help,
                value.load(std::sync::atomic::Ordering::Relaxed),
            )?;
        }
        Ok(())
    }
}

/// A registry of the proxy's metrics and state.
fn metrics_registry(shared: &Arc<Shared>) -> MetricsRegistry {
    let mut registry = MetricsRegistry::default();
    registry.register_collector(Box::new(shared.metrics.clone()));
    registry.register_collector(Box::new(Live(Arc::downgrade(shared))));
    registry
}

/// A running proxy.
pub struct Proxy {
    local_addr: SocketAddr,
    admin: Option<rylm_admin::Admin>,
    trimmer: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Connects to Redis (an error, with the reason, when it cannot), binds the listen address
    /// and serves.
    pub async fn start(config: ProxyConfig) -> Result<Proxy, Error> {
        let gilmour = Node::connect_with(&config.redis_url, config.node_options.clone()).await?;
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(source) => {
                gilmour.shutdown().await;
                return Err(Error::Listen {
                    address: config.listen.to_string(),
                    source,
                });
            }
        };
        let local_addr = listener.local_addr().map_err(|source| Error::Listen {
            address: config.listen.to_string(),
            source,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.health_timeout));
        connector.set_nodelay(true);
        let http = LegacyClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(config.node_concurrency.clamp(1, 16))
            .build(connector.clone());
        let checks = LegacyClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let (freed, trimmer) = crate::memory::trimmer();
        let shared = Arc::new(Shared {
            freed,
            config,
            registry: Mutex::default(),
            http,
            checks,
            metrics: Arc::new(Metrics::default()),
            gilmour,
            metrics_registry: std::sync::OnceLock::new(),
        });
        let _ = shared.metrics_registry.set(metrics_registry(&shared));
        let admin = match shared.config.admin {
            Some(listen) => {
                let live = Arc::downgrade(&shared);
                let ready: rylm_admin::Readiness = Arc::new(move || match live.upgrade() {
                    Some(shared) if shared.gilmour.is_connected() => Ok(()),
                    Some(_) => Err("Redis is not connected".to_owned()),
                    None => Err("the proxy is stopping".to_owned()),
                });
                match rylm_admin::Admin::start(listen, metrics_registry(&shared), ready).await {
                    Ok(admin) => Some(admin),
                    Err(error) => {
                        shared.gilmour.shutdown().await;
                        return Err(Error::Admin(error));
                    }
                }
            }
            None => None,
        };
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, shared.clone(), stopped));
        tracing::info!(%local_addr, "Gilmour proxy listening");
        Ok(Proxy {
            local_addr,
            admin,
            trimmer,
            stop,
            server,
            shared,
        })
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the admin endpoints listen, when `admin` was configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(rylm_admin::Admin::local_addr)
    }

    /// How many nodes are registered.
    pub fn nodes(&self) -> usize {
        self.shared.registry().len()
    }

    /// Stops accepting connections, lets the calls in hand finish (at most 30 s), then removes
    /// every node's subscriptions and closes the Redis connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
        let entries = self.shared.registry().all();
        for entry in entries {
            registry::retire(&self.shared.gilmour, &entry).await;
        }
        self.trimmer.abort();
        self.shared.gilmour.drain(Duration::from_secs(5)).await;
        self.shared.gilmour.shutdown().await;
    }
}

/// Runs a proxy with `config` until Ctrl-C or SIGTERM, then shuts it down gracefully.
pub async fn run_until_stopped(config: ProxyConfig) -> Result<(), Error> {
    let proxy = Proxy::start(config).await?;
    println!("gilmour proxy listening on http://{}", proxy.local_addr());
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("stopping the Gilmour proxy");
    proxy.shutdown().await;
    Ok(())
}

/// The first wait after a failed accept, and the longest.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(
        shared.config.max_connections.max(1),
    ));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "accept failed; waiting before the next");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = connections.clone().try_acquire_owned().ok();
        let full = permit.is_none();
        let header_timeout = shared.config.header_timeout;
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Body>| {
            let shared = shared.clone();
            async move {
                if full {
                    let mut response = refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the proxy holds as many connections as it may; try again",
                    );
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                    return Ok::<_, Infallible>(response);
                }
                Ok::<_, Infallible>(route(shared, peer, request).await)
            }
        });
        // The header timeout also closes keep-alive connections idle between requests.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!full)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "an HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

pub(crate) fn json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn refuse(status: StatusCode, what: &str) -> Response<Full<Bytes>> {
    json(status, &api::status_body(what))
}

fn ok() -> Response<Full<Bytes>> {
    json(StatusCode::OK, &api::status_body("ok"))
}

/// Compares two tokens in constant time.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Who a request may act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The proxy has no operator token: every route is open, as in the original spec.
    Anyone,
    /// The operator's token: every route.
    Operator,
    /// The registration token: `POST /nodes` only.
    Registrar,
    /// Some other bearer token: a node's own, checked against the node of the route.
    Bearer,
    /// No token.
    Nobody,
}

fn bearer(request: &Request<Body>) -> Option<&str> {
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn caller(config: &ProxyConfig, request: &Request<Body>) -> Caller {
    let Some(operator) = &config.token else {
        return Caller::Anyone;
    };
    match bearer(request) {
        None => Caller::Nobody,
        Some(given) if same(given, operator) => Caller::Operator,
        Some(given)
            if config
                .register_token
                .as_deref()
                .is_some_and(|r| same(given, r)) =>
        {
            Caller::Registrar
        }
        Some(_) => Caller::Bearer,
    }
}

fn unauthorized() -> Response<Full<Bytes>> {
    refuse(
        StatusCode::UNAUTHORIZED,
        "this proxy needs Authorization: Bearer <token>",
    )
}

fn forbidden(what: &str) -> Response<Full<Bytes>> {
    refuse(StatusCode::FORBIDDEN, &format!("this token may not {what}"))
}

/// Whether the caller may use the routes of `entry`: the operator, or the node itself.
fn may_use(caller: Caller, request: &Request<Body>, entry: &Entry) -> bool {
    match caller {
        Caller::Anyone | Caller::Operator => true,
        Caller::Bearer => bearer(request).is_some_and(|given| same(given, &entry.token)),
        Caller::Registrar | Caller::Nobody => false,
    }
}

/// The body as JSON: at most `max_body` bytes (413), within the body timeout (408).
async fn read_json(
    shared: &Shared,
    request: Request<Body>,
) -> Result<Value, Response<Full<Bytes>>> {
    let max = shared.config.max_body;
    let deadline = shared.config.body_timeout;
    let body = tokio::time::timeout(deadline, Limited::new(request.into_body(), max).collect())
        .await
        .map_err(|_| {
            refuse(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the body did not arrive within {deadline:?}"),
            )
        })?
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is larger than {max} bytes"),
                )
            } else {
                refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the body: {error}"),
                )
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|error| refuse(StatusCode::BAD_REQUEST, &format!("malformed JSON: {error}")))
}

fn query(request: &Request<Body>, name: &str) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// The answer for a route whose node is not registered: 410 for a node forgotten because it
/// went dirty, 404 otherwise.
fn missing(shared: &Shared, id: &str) -> Response<Full<Bytes>> {
    if shared.registry().was_dirty(id) {
        refuse(
            StatusCode::GONE,
            "the node was dirty (its listener could not be reached) and is forgotten; register again",
        )
    } else {
        refuse(StatusCode::NOT_FOUND, &format!("no node {id:?}"))
    }
}

async fn route(
    shared: Arc<Shared>,
    peer: SocketAddr,
    request: Request<Body>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            let nodes = shared.registry().len();
            return json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "nodes": nodes}),
            );
        }
        (&Method::GET, ["metrics"]) => {
            let mut text = String::new();
            if let Some(registry) = shared.metrics_registry.get()
                && prometheus_client::encoding::text::encode(&mut text, registry).is_err()
            {
                return refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics did not encode",
                );
            }
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return response;
        }
        _ => {}
    }
    let caller = caller(&shared.config, &request);
    if caller == Caller::Nobody {
        return unauthorized();
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["nodes"]) => {
            if !matches!(
                caller,
                Caller::Anyone | Caller::Operator | Caller::Registrar
            ) {
                return unauthorized();
            }
            match read_json(&shared, request).await {
                Ok(body) => register(&shared, peer.ip(), &body).await,
                Err(response) => response,
            }
        }
        (&Method::GET, ["nodes"]) => {
            match caller {
                Caller::Anyone | Caller::Operator => {}
                Caller::Registrar => return forbidden("list the nodes"),
                _ => return unauthorized(),
            }
            let entries = shared.registry().all();
            let mut nodes = Vec::new();
            for entry in entries {
                nodes.push(entry.describe(false).await);
            }
            json(StatusCode::OK, &serde_json::json!({ "nodes": nodes }))
        }
        (_, ["nodes", id, rest @ ..]) => {
            let Some(entry) = shared.registry().get(id) else {
                return missing(&shared, id);
            };
            if !may_use(caller, &request, &entry) {
                return forbidden("act for this node");
            }
            node_route(&shared, &entry, &method, rest, request).await
        }
        (&Method::POST, [kind @ ("request" | "signal"), id]) => {
            let Some(entry) = shared.registry().get(id) else {
                return missing(&shared, id);
            };
            if !may_use(caller, &request, &entry) {
                return forbidden("publish for this node");
            }
            let status = entry.inner.lock().await.status;
            match status {
                Status::Ok => {}
                Status::Unavailable => {
                    return refuse(
                        StatusCode::CONFLICT,
                        "the node is unavailable: it fails its health check",
                    );
                }
                Status::Dirty => {
                    return refuse(
                        StatusCode::GONE,
                        "the node is dirty: its listener could not be reached; register again",
                    );
                }
            }
            // The node's trace context, continued by what the proxy publishes for it.
            let traceparent = request
                .headers()
                .get(rylm_message::trace::TRACEPARENT)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = match read_json(&shared, request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            if *kind == "request" {
                publish_request(&shared, &entry, &body, traceparent).await
            } else {
                publish_signal(&shared, &body, traceparent.as_deref()).await
            }
        }
        (_, ["nodes"] | ["healthz"] | ["metrics"] | ["request" | "signal", _]) => refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => refuse(StatusCode::NOT_FOUND, &format!("no route {method} {path}")),
    }
}

/// `/nodes/:id[/slots|/services]`.
async fn node_route(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    method: &Method,
    rest: &[&str],
    request: Request<Body>,
) -> Response<Full<Bytes>> {
    match (method, rest) {
        (&Method::GET, []) => json(StatusCode::OK, &entry.describe(true).await),
        (&Method::DELETE, []) => delete(shared, entry).await,
        (_, [kind @ ("slots" | "services")]) => {
            let role = if *kind == "slots" {
                Role::Slot
            } else {
                Role::Service
            };
            match *method {
                Method::GET => {
                    let list = registry::handlers(entry.inner.lock().await.list(role));
                    json(StatusCode::OK, &serde_json::json!({ *kind: list }))
                }
                Method::POST => match read_json(shared, request).await {
                    Ok(body) => add(shared, entry, role, &body).await,
                    Err(response) => response,
                },
                Method::DELETE => {
                    let Some(topic) = query(&request, "topic") else {
                        return refuse(
                            StatusCode::BAD_REQUEST,
                            "say which with ?topic=<topic>[&path=<path>]",
                        );
                    };
                    let path = query(&request, "path");
                    match registry::remove(&shared.gilmour, entry, role, &topic, path.as_deref())
                        .await
                    {
                        Ok(true) => ok(),
                        Ok(false) => refuse(
                            StatusCode::NOT_FOUND,
                            &format!(
                                "the node has no {} on {topic:?}{}",
                                role.name(),
                                path.map(|p| format!(" at {p}")).unwrap_or_default()
                            ),
                        ),
                        Err(error) => refuse(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("some handlers are still subscribed: {error}"),
                        ),
                    }
                }
                _ => refuse(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or DELETE"),
            }
        }
        _ => refuse(StatusCode::NOT_FOUND, "no such route under /nodes/:id"),
    }
}

/// `POST /nodes`: checks the body and the node's health check, replaces an earlier
/// registration from the same host and port, then subscribes.
async fn register(shared: &Arc<Shared>, host: IpAddr, body: &Value) -> Response<Full<Bytes>> {
    let registration = match api::registration(body, &shared.config.limits) {
        Ok(registration) => registration,
        Err(refused) => return refused_response(&refused),
    };
    let replaces = shared.registry().at(host, registration.port);
    if replaces.is_none() && shared.registry().len() >= shared.config.max_nodes {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the proxy holds {} nodes, as many as it may",
                shared.config.max_nodes
            ),
        );
    }
    let entry = registry::entry(
        shared,
        host,
        registration.port,
        registration.health_check,
        registration.slots,
        registration.services,
    );
    if let Err(why) = watchdog::check(shared, &entry).await {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "the node's health check {} failed: {why}",
                entry.url(&entry.health_check)
            ),
        );
    }
    // The old registration's handlers go before the new ones come, so that no request or
    // signal reaches the node twice.
    if let Some(old) = replaces {
        tracing::info!(old = %old.id, new = %entry.id, node = %entry.url(""), "a node registered again: its old registration is gone");
        shared.registry().remove(&old.id);
        registry::retire(&shared.gilmour, &old).await;
    }
    {
        let mut inner = entry.inner.lock().await;
        if let Err(error) = registry::subscribe_all(shared, &entry, &mut inner).await {
            let _ = registry::unsubscribe_all(&shared.gilmour, &mut inner).await;
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
        }
    }
    registry::admit(shared, entry.clone()).await;
    watchdog::start(shared, &entry);
    tracing::info!(id = %entry.id, node = %entry.url(""), "a node registered");
    json(
        StatusCode::OK,
        &serde_json::json!({ "id": entry.id, "status": Status::Ok, "token": entry.token }),
    )
}

/// `DELETE /nodes/:id`: when every subscription of the node is gone, the node is forgotten;
/// otherwise it stays, and the answer says so (to be tried again).
async fn delete(shared: &Arc<Shared>, entry: &Arc<Entry>) -> Response<Full<Bytes>> {
    {
        let mut inner = entry.inner.lock().await;
        if let Err(error) = registry::unsubscribe_all(&shared.gilmour, &mut inner).await {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("some handlers are still subscribed; try again: {error}"),
            );
        }
    }
    shared.registry().remove(&entry.id);
    registry::retire(&shared.gilmour, entry).await;
    shared.freed.notify_one();
    ok()
}

/// `POST /nodes/:id/slots|services`.
async fn add(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    role: Role,
    body: &Value,
) -> Response<Full<Bytes>> {
    let handler = match api::handler(body, role, &shared.config.limits) {
        Ok(handler) => handler,
        Err(refused) => return refused_response(&refused),
    };
    let mut inner = entry.inner.lock().await;
    let status = inner.status;
    if status == Status::Dirty {
        return refuse(StatusCode::GONE, "the node is dirty; register again");
    }
    if inner.slots.len() + inner.services.len() >= shared.config.limits.max_steps {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "a node has at most {} slots and services",
                shared.config.limits.max_steps
            ),
        );
    }
    let clash = inner.list(role).iter().any(|l| {
        l.handler.topic == handler.topic
            && match role {
                Role::Service => l.handler.group == handler.group,
                Role::Slot => l.handler.path == handler.path,
            }
    });
    if clash {
        return refuse(
            StatusCode::CONFLICT,
            &format!(
                "the node already has this {} on {:?}",
                role.name(),
                handler.topic
            ),
        );
    }
    // An unavailable node's subscriptions are made when it answers again.
    let subscription = if status == Status::Ok {
        match registry::subscribe(shared, entry, role, &handler).await {
            Ok(subscription) => Some(subscription),
            Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
        }
    } else {
        None
    };
    inner.list(role).push(registry::Live {
        handler,
        subscription,
    });
    ok()
}
