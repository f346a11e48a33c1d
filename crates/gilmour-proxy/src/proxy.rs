//! The HTTP proxy: nodes register their HTTP endpoints as Gilmour slots and services, the
//! proxy subscribes for them on Redis and calls them back, lets them publish requests,
//! compositions and signals, and watches their health.
//!
//! Each registered node gets a Gilmour [`Node`] of its own (two Redis connections), so that two
//! HTTP nodes on one proxy behave as two Gilmour processes: the same topic and group on both
//! share the work through the group's lock. A watchdog per node pings its health check; after
//! `failure_threshold` failures in a row the node is `unavailable` (its subscriptions removed,
//! its registration kept) until it answers again; when its port refuses connections
//! `dirty_after` checks in a row it is `dirty`, and nothing more is done for it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::Value;
use tokio::sync::watch;

use crate::Error;
use crate::api::{self, Handler, Role, Status, Target};
use crate::compose::{self, BoxFuture, Runner};
use crate::engine::{self, Incoming, Node, NodeOptions, Reply, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{self, Composed, Step};

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The Redis every node's subscriptions go through.
    pub redis_url: String,
    /// Where the control and publish API listen. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Between two health checks of a node. Default 10 s.
    pub health_interval: Duration,
    /// A health check not answered within this has failed. Default 3 s.
    pub health_timeout: Duration,
    /// Failed health checks in a row before a node is `unavailable`. Default 2.
    pub failure_threshold: u32,
    /// Health checks in a row whose connection is refused before a node is `dirty`. Default 6.
    pub dirty_after: u32,
    /// When set, the control and publish routes need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The deadline of a `/request` that gives none. Default 60 s.
    pub request_timeout: Duration,
    /// The largest body read, from callers and from nodes. Default 4 MiB.
    pub max_body: usize,
    /// The Gilmour settings of every node's connection.
    pub node_options: NodeOptions,
}

impl ProxyConfig {
    /// The defaults, with the Redis at `redis_url`.
    pub fn new(redis_url: impl Into<String>) -> Self {
        ProxyConfig {
            redis_url: redis_url.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(3),
            failure_threshold: 2,
            dirty_after: 6,
            token: None,
            request_timeout: Duration::from_secs(60),
            max_body: 4 << 20,
            node_options: NodeOptions::default(),
        }
    }
}

/// The options of `rylm gilmour-proxy` and of the crate's `rylm-gilmour-proxy` binary.
pub const USAGE: &str = "\
Usage: rylm-gilmour-proxy [OPTIONS]

Lets programs in any language join a Gilmour network over HTTP.

Options:
  --redis <URL>               Redis to use [default: $RYLM_REDIS_URL or redis://127.0.0.1:6379]
  --listen <ADDR>             control and publish API [default: 127.0.0.1:8080]
  --token <TOKEN>             require Authorization: Bearer <TOKEN> [default: $GILMOUR_PROXY_TOKEN]
  --health-interval <SECS>    between two health checks of a node [default: 10]
  --health-timeout <SECS>     a health check's deadline [default: 3]
  --failure-threshold <N>     failed checks in a row before `unavailable` [default: 2]
  --dirty-after <N>           refused checks in a row before `dirty` [default: 6]
  --request-timeout <SECS>    a /request's deadline when it gives none [default: 60]
  --concurrency <N>           handlers running at once per node [default: 64]
  --max-body <BYTES>          largest body read [default: 4194304]
  -h, --help                  this text
";

impl ProxyConfig {
    /// Reads the command line's options (see [`USAGE`]); `Ok(None)` for `--help`.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Self>, String> {
        let redis = std::env::var("RYLM_REDIS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let mut config = ProxyConfig::new(redis);
        config.token = std::env::var("GILMOUR_PROXY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (flag.clone(), None),
            };
            let value = match inline.or_else(|| args.next()) {
                Some(value) => value,
                None => return Err(format!("{name} needs a value\n\n{USAGE}")),
            };
            let seconds = |value: &str| {
                compose::seconds_of(&Value::from(value.parse::<f64>().unwrap_or(-1.0))).ok_or_else(
                    || format!("{name} takes a positive number of seconds, not {value:?}"),
                )
            };
            let count =
                |value: &str| {
                    value.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("{name} takes a positive whole number, not {value:?}")
                    })
                };
            match name.as_str() {
                "--redis" => config.redis_url = value,
                "--listen" => {
                    config.listen = value.parse().map_err(|_| {
                        format!("--listen takes host:port, such as 127.0.0.1:8080, not {value:?}")
                    })?;
                }
                "--token" => config.token = Some(value).filter(|t| !t.is_empty()),
                "--health-interval" => config.health_interval = seconds(&value)?,
                "--health-timeout" => config.health_timeout = seconds(&value)?,
                "--failure-threshold" => config.failure_threshold = count(&value)?,
                "--dirty-after" => config.dirty_after = count(&value)?,
                "--request-timeout" => config.request_timeout = seconds(&value)?,
                "--concurrency" => config.node_options.concurrency = count(&value)? as usize,
                "--max-body" => {
                    config.max_body = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--max-body takes a number of bytes, not {value:?}")
                    })?;
                }
                other => return Err(format!("unknown option {other}\n\n{USAGE}")),
            }
        }
        Ok(Some(config))
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

type Client = HttpClient<HttpConnector, Full<Bytes>>;

struct Live {
    handler: Handler,
    subscription: Option<Subscription>,
}

struct Inner {
    status: Status,
    failures: u32,
    refused: u32,
    slots: Vec<Live>,
    services: Vec<Live>,
}

impl Inner {
    /// The node's slots or services.
    fn list(&mut self, role: Role) -> &mut Vec<Live> {
        match role {
            Role::Slot => &mut self.slots,
            Role::Service => &mut self.services,
        }
    }
}

/// Handlers not subscribed yet.
fn unsubscribed(handlers: Vec<Handler>) -> Vec<Live> {
    handlers
        .into_iter()
        .map(|handler| Live {
            handler,
            subscription: None,
        })
        .collect()
}

struct Entry {
    id: String,
    host: IpAddr,
    port: u16,
    health_check: String,
    gilmour: Node,
    inner: tokio::sync::Mutex<Inner>,
    watchdog: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Entry {
    fn url(&self, path: &str) -> String {
        match self.host {
            IpAddr::V4(ip) => format!("http://{ip}:{}{path}", self.port),
            IpAddr::V6(ip) => format!("http://[{ip}]:{}{path}", self.port),
        }
    }

    async fn describe(&self, full: bool) -> Value {
        let inner = self.inner.lock().await;
        let mut out = serde_json::json!({
            "id": self.id,
            "host": self.host.to_string(),
            "port": self.port,
            "health_check": self.health_check,
            "status": inner.status,
        });
        if full {
            out["slots"] = handlers(&inner.slots);
            out["services"] = handlers(&inner.services);
        }
        out
    }
}

fn handlers(live: &[Live]) -> Value {
    Value::from(
        live.iter()
            .map(|l| serde_json::to_value(&l.handler).unwrap_or(Value::Null))
            .collect::<Vec<_>>(),
    )
}

struct Shared {
    config: ProxyConfig,
    nodes: Mutex<HashMap<String, Arc<Entry>>>,
    http: Client,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn node(&self, id: &str) -> Option<Arc<Entry>> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

/// A running proxy.
pub struct Proxy {
    local_addr: SocketAddr,
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
    /// Checks that Redis answers, binds the listen address and serves.
    pub async fn start(config: ProxyConfig) -> Result<Proxy, Error> {
        // Fails early, with the reason, when Redis cannot be reached.
        Node::connect_with(&config.redis_url, config.node_options.clone())
            .await?
            .shutdown()
            .await;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                address: config.listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Listen {
            address: config.listen.to_string(),
            source,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.health_timeout));
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let shared = Arc::new(Shared {
            config,
            nodes: Mutex::default(),
            http,
            metrics: Arc::new(Metrics::default()),
        });
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, shared.clone(), stopped));
        tracing::info!(%local_addr, "Gilmour proxy listening");
        Ok(Proxy {
            local_addr,
            stop,
            server,
            shared,
        })
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, lets the calls in hand finish (at most 30 s), then closes
    /// every node's subscriptions and connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let entries: Vec<Arc<Entry>> = self
            .shared
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, e)| e)
            .collect();
        for entry in entries {
            retire(&entry, Duration::from_secs(5)).await;
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request: Request<Body>| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(shared, peer, request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "an HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

fn json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn refuse(status: StatusCode, what: &str) -> Response<Full<Bytes>> {
    json(status, &api::status_body(what))
}

fn ok() -> Response<Full<Bytes>> {
    json(StatusCode::OK, &api::status_body("ok"))
}

/// Whether the request carries the configured bearer token (compared in constant time).
fn authorized(config: &ProxyConfig, request: &Request<Body>) -> bool {
    let Some(token) = &config.token else {
        return true;
    };
    let given = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn read_json(request: Request<Body>, max: usize) -> Result<Value, Response<Full<Bytes>>> {
    let body = Limited::new(request.into_body(), max)
        .collect()
        .await
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
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
            let nodes = shared.nodes.lock().unwrap_or_else(|e| e.into_inner()).len();
            return json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "nodes": nodes}),
            );
        }
        (&Method::GET, ["metrics"]) => {
            let mut response = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return response;
        }
        _ => {}
    }
    if !authorized(&shared.config, &request) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this proxy needs Authorization: Bearer <token>",
        );
    }
    let max = shared.config.max_body;
    match (&method, segments.as_slice()) {
        (&Method::POST, ["nodes"]) => match read_json(request, max).await {
            Ok(body) => register(&shared, peer.ip(), &body).await,
            Err(response) => response,
        },
        (&Method::GET, ["nodes"]) => {
            let entries: Vec<Arc<Entry>> = shared
                .nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            let mut nodes = Vec::new();
            for entry in entries {
                nodes.push(entry.describe(false).await);
            }
            json(StatusCode::OK, &serde_json::json!({ "nodes": nodes }))
        }
        (_, ["nodes", id, rest @ ..]) => {
            let Some(entry) = shared.node(id) else {
                return refuse(StatusCode::NOT_FOUND, &format!("no node {id:?}"));
            };
            match (&method, rest) {
                (&Method::GET, []) => json(StatusCode::OK, &entry.describe(true).await),
                (&Method::DELETE, []) => {
                    shared
                        .nodes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(entry.id.as_str());
                    tokio::spawn(async move {
                        retire(&entry, Duration::from_secs(600)).await;
                    });
                    ok()
                }
                (_, [kind @ ("slots" | "services")]) => {
                    let role = if *kind == "slots" {
                        Role::Slot
                    } else {
                        Role::Service
                    };
                    match method {
                        Method::GET => {
                            let list = handlers(entry.inner.lock().await.list(role));
                            json(StatusCode::OK, &serde_json::json!({ *kind: list }))
                        }
                        Method::POST => match read_json(request, max).await {
                            Ok(body) => add(&shared, &entry, role, &body).await,
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
                            remove(&entry, role, &topic, path.as_deref()).await
                        }
                        _ => refuse(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or DELETE"),
                    }
                }
                _ => refuse(StatusCode::NOT_FOUND, &format!("no route {method} {path}")),
            }
        }
        (&Method::POST, [kind @ ("request" | "signal"), id]) => {
            let Some(entry) = shared.node(id) else {
                return refuse(StatusCode::NOT_FOUND, &format!("no node {id:?}"));
            };
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
            let body = match read_json(request, max).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            if *kind == "request" {
                publish_request(&shared, &entry, &body).await
            } else {
                publish_signal(&shared, &entry, &body).await
            }
        }
        (_, ["nodes"] | ["healthz"] | ["metrics"] | ["request" | "signal", _]) => refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => refuse(StatusCode::NOT_FOUND, &format!("no route {method} {path}")),
    }
}

/// `POST /nodes`: checks the body and the node's health check, then subscribes.
async fn register(shared: &Arc<Shared>, host: IpAddr, body: &Value) -> Response<Full<Bytes>> {
    let registration = match api::registration(body) {
        Ok(registration) => registration,
        Err(what) => return refuse(StatusCode::BAD_REQUEST, &what),
    };
    let gilmour = match Node::connect_with(
        &shared.config.redis_url,
        shared.config.node_options.clone(),
    )
    .await
    {
        Ok(gilmour) => gilmour,
        Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    };
    let entry = Arc::new(Entry {
        id: uuid::Uuid::new_v4().to_string(),
        host,
        port: registration.port,
        health_check: registration.health_check,
        gilmour,
        inner: tokio::sync::Mutex::new(Inner {
            status: Status::Ok,
            failures: 0,
            refused: 0,
            slots: unsubscribed(registration.slots),
            services: unsubscribed(registration.services),
        }),
        watchdog: Mutex::new(None),
    });
    if let Err(why) = check_health(shared, &entry).await {
        entry.gilmour.shutdown().await;
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "the node's health check {} failed: {why}",
                entry.url(&entry.health_check)
            ),
        );
    }
    {
        let mut inner = entry.inner.lock().await;
        if let Err(error) = subscribe_all(shared, &entry, &mut inner).await {
            drop(inner);
            entry.gilmour.shutdown().await;
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
        }
    }
    let watchdog = tokio::spawn(watch_health(shared.clone(), entry.clone()));
    *entry.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some(watchdog);
    shared
        .nodes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(entry.id.clone(), entry.clone());
    tracing::info!(id = %entry.id, node = %entry.url(""), "a node registered");
    json(
        StatusCode::OK,
        &serde_json::json!({ "id": entry.id, "status": Status::Ok }),
    )
}

/// Removes a node for good: its watchdog and subscriptions at once, its connections once its
/// running handlers are done (at most `drain`).
async fn retire(entry: &Arc<Entry>, drain: Duration) {
    if let Some(watchdog) = entry
        .watchdog
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        watchdog.abort();
    }
    {
        let mut inner = entry.inner.lock().await;
        unsubscribe_all(entry, &mut inner).await;
    }
    entry.gilmour.drain(drain).await;
    entry.gilmour.shutdown().await;
}

async fn subscribe_all(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    inner: &mut Inner,
) -> Result<(), Error> {
    for (role, list) in [
        (Role::Slot, &mut inner.slots),
        (Role::Service, &mut inner.services),
    ] {
        for live in list.iter_mut().filter(|l| l.subscription.is_none()) {
            live.subscription = Some(subscribe(shared, entry, role, &live.handler).await?);
        }
    }
    Ok(())
}

async fn unsubscribe_all(entry: &Entry, inner: &mut Inner) {
    for live in inner.slots.iter_mut().chain(inner.services.iter_mut()) {
        if let Some(subscription) = live.subscription.take()
            && let Err(error) = entry.gilmour.remove(subscription).await
        {
            tracing::warn!(%error, topic = %live.handler.topic, "could not unsubscribe");
        }
    }
}

/// Subscribes one slot or service of a node: each request or signal becomes a POST to the
/// node's path.
async fn subscribe(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    role: Role,
    handler: &Handler,
) -> Result<Subscription, Error> {
    let call = Arc::new(NodeCall {
        http: shared.http.clone(),
        metrics: shared.metrics.clone(),
        url: entry.url(&handler.path),
        timeout: handler.timeout(),
        max: shared.config.max_body,
        kind: role.name(),
    });
    match role {
        Role::Service => {
            let group = handler.group.clone().unwrap_or_default();
            entry
                .gilmour
                .reply_to_with(&handler.topic, &group, call.timeout, move |incoming| {
                    let call = call.clone();
                    async move {
                        let step = call.run(incoming).await;
                        Reply {
                            data: step.data,
                            code: step.code,
                        }
                    }
                })
                .await
        }
        Role::Slot => {
            entry
                .gilmour
                .slot_with(&handler.topic, handler.group.as_deref(), move |incoming| {
                    let call = call.clone();
                    async move {
                        // A slot's answer is ignored; its failures show in the metrics.
                        call.run(incoming).await;
                    }
                })
                .await
        }
    }
}

/// How one slot or service of a node is called.
struct NodeCall {
    http: Client,
    metrics: Arc<Metrics>,
    url: String,
    timeout: Duration,
    max: usize,
    /// `service` or `slot`, for the metrics.
    kind: &'static str,
}

impl NodeCall {
    /// POSTs the request or signal to the node and counts it.
    async fn run(&self, incoming: Incoming) -> Step {
        let body = api::call_body(
            Some(&incoming.topic),
            &incoming.sender,
            &incoming.data,
            self.timeout,
        );
        let call = call_node(&self.http, &self.url, body, self.timeout, self.max);
        timed(&self.metrics, self.kind, &incoming.topic, call).await
    }
}

/// Runs `call` and counts it under `kind` and `topic`: its time, and whether it failed.
async fn timed(
    metrics: &Metrics,
    kind: &str,
    topic: &str,
    call: impl Future<Output = Step>,
) -> Step {
    let started = Instant::now();
    let step = call.await;
    metrics.record(
        kind,
        topic,
        started.elapsed(),
        protocol::is_failure(step.code),
    );
    step
}

/// POSTs `body` to the node, at most `timeout`: past it the connection is dropped (so the
/// node's late write fails) and the answer is 499.
async fn call_node(http: &Client, url: &str, body: Vec<u8>, timeout: Duration, max: usize) -> Step {
    let request = match Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
    {
        Ok(request) => request,
        Err(error) => {
            return Step {
                data: Value::from(format!("bad node URL {url}: {error}")),
                code: protocol::HANDLER_FAILED,
            };
        }
    };
    let call = async {
        let response = http
            .request(request)
            .await
            .map_err(|error| format!("calling {url}: {error}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map_err(|error| format!("reading the answer of {url}: {error}"))?
            .to_bytes();
        Ok::<_, String>(api::reply_of(status, &body))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(step)) => step,
        Ok(Err(error)) => Step {
            data: Value::from(error),
            code: protocol::HANDLER_FAILED,
        },
        Err(_) => Step {
            data: Value::from(protocol::TIMED_OUT_DATA),
            code: protocol::TIMED_OUT,
        },
    }
}

enum Health {
    Failed(String),
    Refused(String),
}

/// One health check: a GET of the node's health check path, answered 2xx in time.
async fn check_health(shared: &Shared, entry: &Entry) -> Result<(), Health> {
    let url = entry.url(&entry.health_check);
    let request = Request::get(&url)
        .body(Full::new(Bytes::new()))
        .map_err(|error| Health::Failed(error.to_string()))?;
    let response = tokio::time::timeout(shared.config.health_timeout, shared.http.request(request))
        .await
        .map_err(|_| {
            Health::Failed(format!(
                "no answer within {:?}",
                shared.config.health_timeout
            ))
        })?
        .map_err(|error| {
            if error.is_connect() {
                Health::Refused(format!("nothing listens: {error}"))
            } else {
                Health::Failed(error.to_string())
            }
        })?;
    let status = response.status();
    // Reads (and bounds) the body so the connection can be reused.
    let _ = tokio::time::timeout(
        shared.config.health_timeout,
        Limited::new(response.into_body(), 64 << 10).collect(),
    )
    .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(Health::Failed(format!("answered {status}")))
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Failed(why) | Health::Refused(why) => f.write_str(why),
        }
    }
}

/// Pings the node every interval and moves it between `ok`, `unavailable` and `dirty`.
async fn watch_health(shared: Arc<Shared>, entry: Arc<Entry>) {
    let mut ticks = tokio::time::interval(shared.config.health_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let outcome = check_health(&shared, &entry).await;
        let mut inner = entry.inner.lock().await;
        match outcome {
            Ok(()) => {
                inner.failures = 0;
                inner.refused = 0;
                if inner.status == Status::Unavailable {
                    match subscribe_all(&shared, &entry, &mut inner).await {
                        Ok(()) => {
                            inner.status = Status::Ok;
                            tracing::info!(id = %entry.id, "the node answers again: ok");
                        }
                        Err(error) => {
                            tracing::warn!(id = %entry.id, %error, "could not subscribe again");
                        }
                    }
                }
            }
            Err(why) => {
                inner.failures += 1;
                inner.refused = if matches!(why, Health::Refused(_)) {
                    inner.refused + 1
                } else {
                    0
                };
                if inner.refused >= shared.config.dirty_after.max(1) {
                    unsubscribe_all(&entry, &mut inner).await;
                    inner.status = Status::Dirty;
                    tracing::warn!(id = %entry.id, %why, "the node's listener is gone: dirty");
                    return;
                }
                if inner.status == Status::Ok
                    && inner.failures >= shared.config.failure_threshold.max(1)
                {
                    unsubscribe_all(&entry, &mut inner).await;
                    inner.status = Status::Unavailable;
                    tracing::warn!(id = %entry.id, %why, "the node fails its health check: unavailable");
                }
            }
        }
    }
}

/// `POST /nodes/:id/slots|services`.
async fn add(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    role: Role,
    body: &Value,
) -> Response<Full<Bytes>> {
    let handler = match api::handler(body, role) {
        Ok(handler) => handler,
        Err(what) => return refuse(StatusCode::BAD_REQUEST, &what),
    };
    let mut inner = entry.inner.lock().await;
    let status = inner.status;
    if status == Status::Dirty {
        return refuse(StatusCode::GONE, "the node is dirty; register again");
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
        match subscribe(shared, entry, role, &handler).await {
            Ok(subscription) => Some(subscription),
            Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
        }
    } else {
        None
    };
    inner.list(role).push(Live {
        handler,
        subscription,
    });
    ok()
}

/// `DELETE /nodes/:id/slots|services?topic=T[&path=P]`.
async fn remove(
    entry: &Entry,
    role: Role,
    topic: &str,
    path: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut inner = entry.inner.lock().await;
    let list = inner.list(role);
    let (gone, kept): (Vec<Live>, Vec<Live>) = list
        .drain(..)
        .partition(|l| l.handler.topic == topic && path.is_none_or(|p| l.handler.path == p));
    *list = kept;
    if gone.is_empty() {
        return refuse(
            StatusCode::NOT_FOUND,
            &format!(
                "the node has no {} on {topic:?}{}",
                role.name(),
                path.map(|p| format!(" at {p}")).unwrap_or_default()
            ),
        );
    }
    for live in gone {
        if let Some(subscription) = live.subscription
            && let Err(error) = entry.gilmour.remove(subscription).await
        {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
        }
    }
    ok()
}

/// Runs a node's compositions: requests through its Gilmour node, lambdas as POSTs to it.
struct NodeRunner<'a> {
    shared: &'a Shared,
    entry: &'a Entry,
    timeout: Duration,
}

impl Runner<String> for NodeRunner<'_> {
    fn request<'a>(
        &'a self,
        topic: &'a str,
        data: Value,
        timeout: Duration,
    ) -> BoxFuture<'a, Step> {
        let request = self.entry.gilmour.request(topic, data, timeout);
        Box::pin(timed(&self.shared.metrics, "request", topic, async move {
            engine::step_of(request.await)
        }))
    }

    fn lambda<'a>(&'a self, path: &'a String, data: Value) -> BoxFuture<'a, Step> {
        let sender = uuid::Uuid::new_v4().to_string();
        let body = api::call_body(None, &sender, &data, self.timeout);
        let url = self.entry.url(path);
        Box::pin(timed(&self.shared.metrics, "lambda", path, async move {
            call_node(
                &self.shared.http,
                &url,
                body,
                self.timeout,
                self.shared.config.max_body,
            )
            .await
        }))
    }
}

/// `POST /request/:id`: the answer's code is also the HTTP status.
async fn publish_request(shared: &Shared, entry: &Entry, body: &Value) -> Response<Full<Bytes>> {
    let publish = match api::request(body) {
        Ok(publish) => publish,
        Err(what) => return refuse(StatusCode::BAD_REQUEST, &what),
    };
    let timeout = publish.timeout.unwrap_or(shared.config.request_timeout);
    let runner = NodeRunner {
        shared,
        entry,
        timeout,
    };
    let composed: Composed = match &publish.target {
        Target::Topic(topic) => {
            Composed::of(vec![runner.request(topic, publish.message, timeout).await])
        }
        Target::Composition(composition) => {
            composition.run(publish.message, &runner, timeout).await
        }
    };
    let status = u16::try_from(composed.code)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(
        status,
        &serde_json::to_value(&composed).unwrap_or(Value::Null),
    )
}

/// `POST /signal/:id`: `receivers` says how many subscriptions heard it.
async fn publish_signal(shared: &Shared, entry: &Entry, body: &Value) -> Response<Full<Bytes>> {
    let (topic, message) = match api::signal(body) {
        Ok(signal) => signal,
        Err(what) => return refuse(StatusCode::BAD_REQUEST, &what),
    };
    let started = Instant::now();
    let sent = entry.gilmour.signal(&topic, message).await;
    shared
        .metrics
        .record("signal", &topic, started.elapsed(), sent.is_err());
    match sent {
        Ok(receivers) => json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "receivers": receivers }),
        ),
        Err(error) => refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    }
}
