//! The HTTP side: the gateway, its router components, and the mapping of requests to messages.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rylm_components::parts::{Emit, Endpoint, Listen, Transport};
use rylm_components::{
    CacheStore, Heartbeat, PoolStatus, ResultSink, WITHDRAW_FUNCTION, WorkerPool,
};
use rylm_core_router::{InboundLink, Mode, OutboundQueue, Router};
use rylm_message::{Codec, Message, NativeCodec};
use tokio::sync::{mpsc, watch};
use tower::ServiceBuilder;

use crate::Error;
use crate::handler::{Whole, handle};

/// Every response body, boxed: the handler's, and the layers' own (the body limit's 413).
pub(crate) type AnyBody = http_body_util::combinators::BoxBody<Bytes, tower::BoxError>;
/// Each request waiting for its answer: the parts of a mux function's answer come one by one.
pub(crate) type Pending = Arc<std::sync::Mutex<HashMap<String, mpsc::Sender<Message>>>>;

/// The parts of one answer held for a client that reads them more slowly than they come; a
/// client that falls further behind has its answer cut off (an error line ends it).
pub(crate) const PARTS_BUFFERED: usize = 64;

/// How the gateway listens and how long it waits.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where HTTP clients connect (default `127.0.0.1:0`, a free port).
    pub listen: SocketAddr,
    /// Where workers connect (default a free loopback tcp port).
    pub workers: String,
    /// How long a request waits for its worker's answer before a 504 (default 30 s).
    pub deadline: Duration,
    /// The largest request body accepted; above it, 413 (default 8 MiB).
    pub max_body: usize,
    /// How many requests are handled at once, over all connections; above it, 503 with
    /// `Retry-After` at once (default 10,000).
    pub concurrency: usize,
    /// How many connections are held at once; above it, a new connection is answered 503 and
    /// closed (default 10,000).
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may stay idle between requests (default 10 s).
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body; after it, 408 (default 30 s).
    pub body_timeout: Duration,
    /// What a 503 tells a client to wait before trying again (default 1 s).
    pub retry_after: Duration,
    /// How workers are watched.
    pub heartbeat: Heartbeat,
    /// Serve pylm workers (PUSH/PULL, PalmMessage, found through a raw-bytes cache at `db`)
    /// instead of rylm's. pylm workers announce neither themselves nor their functions, so the
    /// gateway cannot answer 503 or 404 at once: such a request waits for its deadline (504),
    /// and a pylm worker's failure comes back as the body `0`.
    pub pylm: bool,
    /// In pylm mode, where the cache answers (default a free loopback tcp port).
    pub db: String,
    /// The workers' sockets' options, security among them (default: safe defaults, NULL).
    pub transport: Transport,
    /// Carry W3C trace context (default true): continue the caller's `traceparent` (or start
    /// a trace) under a span of the gateway, pass it to the worker and give it back. Off,
    /// `traceparent` is neither read nor written.
    pub trace: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: "tcp://127.0.0.1:0".into(),
            deadline: Duration::from_secs(30),
            max_body: 8 * 1024 * 1024,
            concurrency: 10_000,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            heartbeat: Heartbeat::default(),
            pylm: false,
            db: "tcp://127.0.0.1:0".into(),
            transport: Transport::default(),
            trace: true,
        }
    }
}

/// The inbound component: submits the messages the HTTP side makes, and the withdrawals of
/// requests whose clients went away.
#[derive(Debug)]
pub struct GatewayRouter {
    requests: mpsc::Receiver<Message>,
    /// Ids of abandoned requests. Unbounded, yet bounded in practice: each admitted request
    /// sends at most one, and admission is bounded.
    withdrawals: mpsc::UnboundedReceiver<String>,
}

impl GatewayRouter {
    /// The router component (non-blocking).
    pub async fn run(mut self, mut link: InboundLink) -> Result<(), rylm_core_router::Error> {
        loop {
            tokio::select! {
                _ = link.stopping() => return Ok(()),
                withdrawn = self.withdrawals.recv() => {
                    if let Some(id) = withdrawn {
                        let withdraw = Message::call(WITHDRAW_FUNCTION, Bytes::new()).with_client(id);
                        link.submit(withdraw).await?;
                    }
                }
                request = self.requests.recv() => match request {
                    Some(message) => { link.submit(message).await?; }
                    None => return Ok(()),
                },
            }
        }
    }
}

/// The outbound component: hands each result to the HTTP request waiting for it.
#[derive(Debug)]
pub struct GatewayDealer {
    pending: Pending,
}

impl GatewayDealer {
    /// The router component (non-blocking).
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), rylm_core_router::Error> {
        while let Some(delivery) = queue.recv().await {
            let (message, _) = delivery.into_parts();
            let last = message.header(rylm_components::MORE).is_none();
            let waiter = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if last {
                    pending.remove(&message.client)
                } else {
                    pending.get(&message.client).cloned()
                }
            };
            let Some(waiter) = waiter else {
                tracing::debug!(request = %message.client, "a result for a request that gave up");
                continue;
            };
            let client = message.client.clone();
            if let Err(mpsc::error::TrySendError::Full(_)) = waiter.try_send(message) {
                // Never wait here: one slow reader must not hold up every other request.
                tracing::warn!(request = %client, "a client reads a streamed answer too slowly; cut off");
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&client);
            }
        }
        Ok(())
    }
}

/// Shared by every request handler.
pub(crate) struct State {
    pub(crate) requests: mpsc::Sender<Message>,
    pub(crate) withdrawals: mpsc::UnboundedSender<String>,
    pub(crate) pending: Pending,
    /// Requests handled at once, over all connections.
    pub(crate) admitted: Arc<tokio::sync::Semaphore>,
    pub(crate) retry_after: Duration,
    pub(crate) body_timeout: Duration,
    /// The worker pool's view of its workers; `None` for pylm workers, which announce nothing.
    pub(crate) status: Option<Arc<PoolStatus>>,
    /// The PUSH to pylm workers: connected ones are its peers.
    pub(crate) pylm_workers: Option<rylm_components::rylm_transport::Socket>,
    pub(crate) deadline: Duration,
    pub(crate) max_body: usize,
    pub(crate) next_id: std::sync::atomic::AtomicU64,
    /// Requests by route (function): calls, errors by kind, latency.
    pub(crate) routes: Arc<rylm_message::stats::CallTable>,
    /// Whether trace context is carried ([`HttpGateway::set_trace`] turns it on and off).
    pub(crate) trace: std::sync::atomic::AtomicBool,
}

/// A running gateway.
pub struct HttpGateway {
    local_addr: SocketAddr,
    pool: Option<Arc<PoolStatus>>,
    worker_address: String,
    db_address: Option<String>,
    cache_stop: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    routes: Arc<rylm_message::stats::CallTable>,
    state: Arc<State>,
    router: Router,
}

impl std::fmt::Debug for HttpGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGateway")
            .field("local_addr", &self.local_addr)
            .field("worker_address", &self.worker_address)
            .finish()
    }
}

impl HttpGateway {
    /// Binds the HTTP listener and the workers' socket, and starts serving.
    pub async fn start(config: GatewayConfig) -> Result<HttpGateway, Error> {
        let pending: Pending = Arc::default();
        let (requests, requests_in) = mpsc::channel(1024);
        let (withdrawals, withdrawals_in) = mpsc::unbounded_channel();
        let gateway_in = GatewayRouter {
            requests: requests_in,
            withdrawals: withdrawals_in,
        };
        let dealer = GatewayDealer {
            pending: pending.clone(),
        };
        let (cache_stop, cache_stopped) = watch::channel(false);
        let mut pylm_workers = None;
        let (router, worker_address, status, db_address) = if config.pylm {
            // pylm workers: PUSH to them, PULL from them, found through a raw-bytes cache.
            let codec: Arc<dyn Codec> = Arc::new(rylm_message::PylmCodec::default());
            let to_workers = Emit::push(
                &Endpoint::Bind(config.workers.clone()),
                &config.transport,
                codec.clone(),
            )
            .await?;
            // Workers answer on the host they take work from, wherever that is.
            let from_workers = Listen::pull(
                &Endpoint::Bind(rylm_components::beside(to_workers.address())),
                &config.transport,
                codec.clone(),
            )
            .await?;
            pylm_workers = Some(to_workers.socket().clone());
            let (push_address, pull_address) = (
                to_workers.address().to_owned(),
                from_workers.address().to_owned(),
            );
            let store = CacheStore::default().with_raw_replies();
            let (db_address, _cache_task) = store
                .clone()
                .serve(
                    &Endpoint::Bind(config.db.clone()),
                    &config.transport,
                    codec,
                    cache_stopped,
                )
                .await?;
            for (key, value) in [
                ("name", "gateway"),
                ("worker_push_address", &push_address),
                ("worker_pull_address", &pull_address),
                ("db_address", &db_address),
            ] {
                store.preset(key, value.to_owned());
            }
            let router = Router::builder()
                .outbound(
                    "workers",
                    move |queue| to_workers.run(queue),
                    None,
                    Mode::NonBlocking,
                )
                .outbound(
                    "dealer",
                    move |queue| dealer.run(queue),
                    None,
                    Mode::NonBlocking,
                )
                .inbound(
                    "http",
                    move |link| gateway_in.run(link),
                    "workers",
                    Mode::NonBlocking,
                )
                .inbound(
                    "results",
                    move |link| from_workers.run(link),
                    "dealer",
                    Mode::NonBlocking,
                )
                .start()?;
            (router, push_address, None, Some(db_address))
        } else {
            let codec: Arc<dyn Codec> = Arc::new(NativeCodec::default());
            let pool = WorkerPool::new(
                &Endpoint::Bind(config.workers.clone()),
                &config.transport,
                codec,
                config.heartbeat.clone(),
            )
            .await?
            .fail_when_alone();
            let (worker_address, status) = (pool.address().to_owned(), pool.status());
            let (results, mut results_in) = mpsc::channel::<Message>(1024);
            let results_component = move |mut link: InboundLink| async move {
                loop {
                    tokio::select! {
                        _ = link.stopping() => return Ok(()),
                        result = results_in.recv() => match result {
                            Some(message) => { link.submit(message).await?; }
                            None => return Ok(()),
                        },
                    }
                }
            };
            let router = Router::builder()
                .outbound(
                    "workers",
                    move |queue| pool.run(queue, ResultSink::Channel(results)),
                    None,
                    Mode::NonBlocking,
                )
                .outbound(
                    "dealer",
                    move |queue| dealer.run(queue),
                    None,
                    Mode::NonBlocking,
                )
                .inbound(
                    "http",
                    move |link| gateway_in.run(link),
                    "workers",
                    Mode::NonBlocking,
                )
                .inbound("results", results_component, "dealer", Mode::NonBlocking)
                .start()?;
            (router, worker_address, Some(status), None)
        };

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
        let pool = status.clone();
        let routes = Arc::new(rylm_message::stats::CallTable::default());
        let state: Arc<State> = Arc::new(State {
            requests,
            withdrawals,
            pending,
            admitted: Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1))),
            retry_after: config.retry_after,
            body_timeout: config.body_timeout,
            status,
            pylm_workers,
            deadline: config.deadline,
            max_body: config.max_body,
            next_id: std::sync::atomic::AtomicU64::new(0),
            routes: routes.clone(),
            trace: std::sync::atomic::AtomicBool::new(config.trace),
        });
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, state.clone(), config, stopped));
        tracing::info!(%local_addr, %worker_address, "HTTP gateway started");
        Ok(HttpGateway {
            local_addr,
            pool,
            worker_address,
            db_address,
            stop,
            server,
            router,
            cache_stop,
            routes,
            state,
        })
    }

    /// Turns trace context on or off for the requests that come from now on (the starting
    /// value is [`GatewayConfig::trace`]).
    pub fn set_trace(&self, on: bool) {
        self.state
            .trace
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where HTTP clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The worker pool's view (workers, credits, waiting and in-flight messages, counters);
    /// `None` in pylm mode, whose workers the gateway does not see.
    pub fn pool_status(&self) -> Option<Arc<PoolStatus>> {
        self.pool.clone()
    }

    /// Requests by route (the function called; `_unknown` for names no worker announces,
    /// `_other` past the table's bound): calls, errors by kind, latency.
    pub fn routes(&self) -> Arc<rylm_message::stats::CallTable> {
        self.routes.clone()
    }

    /// Where workers connect.
    pub fn worker_address(&self) -> &str {
        &self.worker_address
    }

    /// In pylm mode, the cache pylm workers read their addresses from (`--db` of a pylm
    /// Worker).
    pub fn db_address(&self) -> Option<&str> {
        self.db_address.as_deref()
    }

    /// Stops accepting connections, lets the requests in hand finish (each within its
    /// deadline), then stops the router.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.cache_stop.send(true);
        Ok(self.router.shutdown().await?)
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    config: GatewayConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    // Accept errors (out of file descriptors, say) back off instead of spinning.
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, _) = tokio::select! {
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
        let connection_permit = connections.clone().try_acquire_owned().ok();
        let handler = {
            let (state, full) = (state.clone(), connection_permit.is_none());
            tower::service_fn(
                move |request: Request<tower_http::body::Limited<Incoming>>| {
                    let state = state.clone();
                    async move {
                        let response = if full {
                            let mut response = unavailable(
                                &state,
                                "the gateway holds as many connections as it may; try again",
                            );
                            response.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                            response.whole()
                        } else {
                            handle(state, request).await
                        };
                        Ok::<_, Infallible>(response)
                    }
                },
            )
        };
        // HTTP concerns as layers: tracing, a backstop timeout, and the body limit (a
        // Content-Length above it is a 413 before the body is read). Admission is the handler's:
        // one limit over every connection.
        let service = ServiceBuilder::new()
            .layer(tower_http::trace::TraceLayer::new_for_http())
            .map_result(to_response)
            .timeout(config.deadline + config.body_timeout + Duration::from_secs(1))
            .layer(tower_http::limit::RequestBodyLimitLayer::new(
                config.max_body,
            ))
            .service(handler);
        // The header timeout also closes keep-alive connections idle between requests.
        // HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on the same port.
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .keep_alive(connection_permit.is_some());
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(config.header_timeout))
            .keep_alive_timeout(config.header_timeout);
        let connection = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "an HTTP connection ended with an error");
            }
            drop(connection_permit);
        });
    }
    drop(listener);
    // Requests in hand finish within their deadline; connections then close.
    let _ = tokio::time::timeout(Duration::from_secs(60), graceful.shutdown()).await;
}

/// The first wait after a failed accept, and the longest.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A 503 that says when to try again.
pub(crate) fn unavailable(state: &State, message: &str) -> Response<Full<Bytes>> {
    let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, message);
    let seconds = state.retry_after.as_secs().max(1).to_string();
    if let Ok(value) = hyper::header::HeaderValue::from_str(&seconds) {
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, value);
    }
    response
}

/// Errors of the layers as HTTP answers: the backstop timeout 504.
fn to_response<B>(
    result: Result<Response<B>, tower::BoxError>,
) -> Result<Response<AnyBody>, tower::BoxError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<tower::BoxError>,
{
    Ok(match result {
        Ok(response) => response.map(|body| body.map_err(|error| error.into()).boxed()),
        Err(error) if error.is::<tower::timeout::error::Elapsed>() => boxed(json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "the request took too long",
        )),
        Err(error) => boxed(json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error.to_string(),
        )),
    })
}

/// A whole response as the gateway's response.
fn boxed(response: Response<Full<Bytes>>) -> Response<AnyBody> {
    response.map(|body| body.map_err(|never| match never {}).boxed())
}

pub(crate) fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message, "status": status.as_u16() }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
