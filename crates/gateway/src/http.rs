//! The HTTP side: the gateway, its router components, and the mapping of requests to messages.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rylm_components::parts::{Emit, Endpoint, Listen, Transport};
use rylm_components::{
    CacheStore, DEADLINE, ERROR_KIND, ERROR_MESSAGE, Heartbeat, PoolStatus, ResultSink,
    WITHDRAW_FUNCTION, WorkerPool,
};
use rylm_core_router::{InboundLink, Mode, OutboundQueue, Router};
use rylm_message::{Codec, Message, NativeCodec};
use tokio::sync::{mpsc, watch};
use tower::ServiceBuilder;

use crate::Error;

/// Every response body, boxed: the handler's, and the layers' own (the body limit's 413).
type AnyBody = http_body_util::combinators::BoxBody<Bytes, tower::BoxError>;
/// The handler's response body: whole, or a stream of parts; it never fails. (An enum, not a
/// boxed body: a `dyn` body in the handler's future defeats the compiler's proof that the
/// connection's future is `Send`.)
enum HandlerBody {
    Whole(Full<Bytes>),
    Parts(Parts),
}

impl hyper::body::Body for HandlerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            HandlerBody::Whole(body) => std::pin::Pin::new(body).poll_frame(cx),
            HandlerBody::Parts(parts) => std::pin::Pin::new(parts).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HandlerBody::Whole(body) => body.is_end_stream(),
            HandlerBody::Parts(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            HandlerBody::Whole(body) => body.size_hint(),
            HandlerBody::Parts(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Each request waiting for its answer: the parts of a mux function's answer come one by one.
type Pending = Arc<std::sync::Mutex<HashMap<String, mpsc::Sender<Message>>>>;

/// The parts of one answer held for a client that reads them more slowly than they come; a
/// client that falls further behind has its answer cut off (an error line ends it).
const PARTS_BUFFERED: usize = 64;

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
struct State {
    requests: mpsc::Sender<Message>,
    withdrawals: mpsc::UnboundedSender<String>,
    pending: Pending,
    /// Requests handled at once, over all connections.
    admitted: Arc<tokio::sync::Semaphore>,
    retry_after: Duration,
    body_timeout: Duration,
    /// The worker pool's view of its workers; `None` for pylm workers, which announce nothing.
    status: Option<Arc<PoolStatus>>,
    /// The PUSH to pylm workers: connected ones are its peers.
    pylm_workers: Option<rylm_components::rylm_transport::Socket>,
    deadline: Duration,
    max_body: usize,
    next_id: std::sync::atomic::AtomicU64,
}

/// A running gateway.
pub struct HttpGateway {
    local_addr: SocketAddr,
    worker_address: String,
    db_address: Option<String>,
    cache_stop: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
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
        let state = Arc::new(State {
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
        });
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, state, config, stopped));
        tracing::info!(%local_addr, %worker_address, "HTTP gateway started");
        Ok(HttpGateway {
            local_addr,
            worker_address,
            db_address,
            stop,
            server,
            router,
            cache_stop,
        })
    }

    /// Where HTTP clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
                            response.any()
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
fn unavailable(state: &State, message: &str) -> Response<Full<Bytes>> {
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

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message, "status": status.as_u16() }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// True when reading a body failed because it was above the limit (at any depth of wrapping).
fn is_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = current.source();
    }
    false
}

fn is_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// One HTTP request, answered with its request id (`X-Request-Id`, the client's or a new one).
async fn handle<B>(state: Arc<State>, request: Request<B>) -> Response<HandlerBody>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    let given = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    let request_id = crate::request::request_id(given);
    let mut response = respond(&state, request, &request_id).await;
    if let Ok(value) = hyper::header::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn json_ok(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Forgets a request when its handler ends, however it ends; one whose client went away (the
/// handler dropped before an answer) is withdrawn from the worker pool too.
struct InHand {
    state: Arc<State>,
    id: String,
    answered: bool,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.state
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if !self.answered {
            let _ = self.state.withdrawals.send(std::mem::take(&mut self.id));
        }
    }
}

/// Checks a request, makes it a message, waits for the worker's answer.
async fn respond<B>(
    state: &Arc<State>,
    request: Request<B>,
    request_id: &str,
) -> Response<HandlerBody>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/" => {
            return json_ok(match &state.status {
                Some(status) => serde_json::json!({
                    "functions": status.functions(),
                    "workers": status.live_workers(),
                    "call": "GET or POST /<function> with the payload as the body",
                }),
                None => serde_json::json!({
                    "workers": "pylm workers (they announce neither themselves nor their functions)",
                    "call": "GET or POST /<function> with the payload as the body",
                }),
            }).any();
        }
        "/healthz" => return json_ok(serde_json::json!({ "status": "alive" })).any(),
        "/readyz" => {
            // Ready: a worker has a free credit (pylm workers, which announce nothing: one is
            // connected).
            let free = state.status.as_ref().map(|status| status.free_credits());
            let pylm = state.pylm_workers.as_ref().map(|push| push.peers());
            return match (free, pylm) {
                (Some(0), _) => unavailable(state, "no worker has a free credit"),
                (Some(free), _) => {
                    json_ok(serde_json::json!({ "status": "ready", "free_credits": free }))
                }
                (None, Some(0)) => unavailable(state, "no pylm worker is connected"),
                (None, workers) => {
                    json_ok(serde_json::json!({ "status": "ready", "workers": workers }))
                }
            }
            .any();
        }
        _ => {}
    }
    if request.method() != Method::GET && request.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST").any();
    }
    let function = path.trim_start_matches('/');
    if !is_function_name(function) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("{path:?} is not /<function>: letters, digits and _ - . : only"),
        )
        .any();
    }
    let method = function
        .split_once('.')
        .map_or(function, |(_, method)| method);
    let method_name = method.split_once(':').map_or(method, |(name, _)| name);
    if let Some(status) = &state.status {
        if status.live_workers() == 0 {
            return unavailable(state, "no worker is connected").any();
        }
        let known = status.functions();
        if !known.iter().any(|f| f == method || f == method_name) {
            return json_error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no function {method:?}; the workers have {}",
                    known.join(", ")
                ),
            )
            .any();
        }
    }
    // pylm workers announce nothing, but a request sent while none is connected would wait in
    // the PUSH and reach the first to connect, perhaps after its client gave up.
    if state
        .pylm_workers
        .as_ref()
        .is_some_and(|push| push.peers() == 0)
    {
        return unavailable(state, "no pylm worker is connected").any();
    }
    // One limit over every connection: beyond it, 503 at once.
    let Ok(_admitted) = state.admitted.clone().try_acquire_owned() else {
        return unavailable(state, "the gateway is at its concurrency limit; try again").any();
    };

    let mut headers = std::collections::BTreeMap::new();
    headers.insert(
        "http.method".to_owned(),
        request.method().as_str().to_owned(),
    );
    headers.insert("http.request-id".to_owned(), request_id.to_owned());
    if let Some(query) = request.uri().query() {
        headers.insert("http.query".to_owned(), query.to_owned());
        crate::request::query_headers(query, &mut headers);
    }
    crate::request::header_headers(request.headers(), &mut headers);
    let collect = Limited::new(request.into_body(), state.max_body).collect();
    let body = match tokio::time::timeout(state.body_timeout, collect).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if is_over_limit(error.as_ref()) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is above the limit of {} bytes", state.max_body),
            )
            .any();
        }
        Ok(Err(error)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read: {error}"),
            )
            .any();
        }
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the body did not come within {:?}", state.body_timeout),
            )
            .any();
        }
    };

    let id = state
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    // pylm workers need `server.method`: name the gateway as the server when the path does not.
    let function = if state.status.is_none() && !function.contains('.') {
        format!("gateway.{function}")
    } else {
        function.to_owned()
    };
    let mut message = Message::call(function, body).with_client(id.clone());
    message.headers = headers;
    // The pool never dispatches it past the deadline, and the worker stops at it.
    message.headers.insert(
        DEADLINE.to_owned(),
        state.deadline.as_millis().max(1).to_string(),
    );
    let (done, mut answer) = mpsc::channel(PARTS_BUFFERED);
    state
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), done);
    let mut in_hand = InHand {
        state: state.clone(),
        id,
        answered: false,
    };
    let first = match state.requests.send(message).await {
        Err(_) => return unavailable(state, "the gateway is shutting down").any(),
        Ok(()) => match tokio::time::timeout(state.deadline, answer.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return unavailable(state, "the gateway is shutting down").any(),
            Err(_) => {
                return json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("no worker answered within {:?}", state.deadline),
                )
                .any();
            }
        },
    };
    if first.header(rylm_components::MORE).is_some() {
        // A mux function: its parts as they come, one NDJSON line each.
        let mut response = Response::new(HandlerBody::Parts(Parts {
            first: Some(first),
            rest: answer,
            in_hand,
        }));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-ndjson"),
        );
        return response;
    }
    in_hand.answered = true;
    drop(in_hand);
    answer_of(state, first).any()
}

/// A response with a whole body, as the gateway's response type.
trait Any {
    fn any(self) -> Response<HandlerBody>;
}

impl Any for Response<Full<Bytes>> {
    fn any(self) -> Response<HandlerBody> {
        self.map(HandlerBody::Whole)
    }
}

/// The HTTP answer to a worker's answer.
fn answer_of(state: &State, result: Message) -> Response<Full<Bytes>> {
    match result.header(ERROR_KIND) {
        None => Response::new(Full::new(result.payload)),
        Some(kind) => {
            let text = result.header(ERROR_MESSAGE).unwrap_or_default();
            let text = format!("{kind}: {text}");
            match kind {
                "unknown-function" => json_error(StatusCode::NOT_FOUND, &text),
                "worker-died" => json_error(StatusCode::BAD_GATEWAY, &text),
                "busy" | "shutdown" => unavailable(state, &text),
                "deadline" => json_error(StatusCode::GATEWAY_TIMEOUT, &text),
                _ => json_error(StatusCode::INTERNAL_SERVER_ERROR, &text),
            }
        }
    }
}

/// One NDJSON line for a part: a JSON string when it is UTF-8, else `{"base64": "..."}`; an
/// error answer is `{"error": ..., "kind": ...}`.
fn part_line(part: &Message) -> Bytes {
    let value = match part.header(ERROR_KIND) {
        Some(kind) => serde_json::json!({
            "error": part.header(ERROR_MESSAGE).unwrap_or_default(),
            "kind": kind,
        }),
        None => match std::str::from_utf8(&part.payload) {
            Ok(text) => serde_json::Value::from(text),
            Err(_) => {
                use base64::Engine;
                let encoded = base64::engine::general_purpose::STANDARD.encode(&part.payload);
                serde_json::json!({ "base64": encoded })
            }
        },
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// The body of a streamed answer: each part as it comes, until the last. Dropped early (the
/// client went away), its request is withdrawn.
struct Parts {
    first: Option<Message>,
    rest: mpsc::Receiver<Message>,
    in_hand: InHand,
}

impl hyper::body::Body for Parts {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.in_hand.answered {
            return Poll::Ready(None);
        }
        let part = match self.first.take() {
            Some(first) => first,
            None => match self.rest.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(part)) => part,
                Poll::Ready(None) => {
                    // Cut off (a slow reader) or the gateway stopping: say so, and end.
                    self.in_hand.answered = true;
                    let line = serde_json::json!({
                        "error": "the answer was cut off before its last part",
                        "kind": "cut-off",
                    });
                    let mut line = line.to_string().into_bytes();
                    line.push(b'\n');
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(line)))));
                }
            },
        };
        if part.header(rylm_components::MORE).is_none() {
            self.in_hand.answered = true;
        }
        if part.header(rylm_components::NONE).is_some() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(hyper::body::Frame::data(part_line(&part)))))
    }
}
