//! One HTTP request, from its arrival to its answer: checks, admission, the message it becomes,
//! the wait for its worker's answer (withdrawn if the client goes away), and the answer, whole
//! or streamed part by part.

use rylm_message::stats::{ErrorKind, Outcome};
use std::convert::Infallible;
use std::sync::Arc;
use tracing::Instrument;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use rylm_components::{DEADLINE, ERROR_KIND, ERROR_MESSAGE};
use rylm_message::Message;
use tokio::sync::mpsc;

use crate::http::{PARTS_BUFFERED, State, json_error, unavailable};

/// The handler's response body: whole, or a stream of parts; it never fails. (An enum, not a
/// boxed body: a `dyn` body in the handler's future defeats the compiler's proof that the
/// connection's future is `Send`.)
pub(crate) enum HandlerBody {
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
pub(crate) async fn handle<B>(state: Arc<State>, request: Request<B>) -> Response<HandlerBody>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    let given = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    let request_id = crate::request::request_id(given);
    // W3C trace context: the caller's trace continued under a span of the gateway, or a new
    // trace; the worker's message carries it, and the answer says it.
    let (traceparent, span) = if state.trace.load(std::sync::atomic::Ordering::Relaxed) {
        let hop = rylm_message::trace::Hop::continue_from(
            request
                .headers()
                .get(rylm_message::trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        );
        (hop.traceparent(), hop.span("rylm.gateway"))
    } else {
        (String::new(), tracing::Span::none())
    };
    let started = std::time::Instant::now();
    let uri = request.uri().clone();
    // Whether a worker announced the function: asked once, for the answer and its counting.
    let calls = Called::from_path(uri.path());
    let announced = state
        .status
        .as_ref()
        .is_some_and(|status| status.knows(calls.name) || status.knows(calls.method));
    let route = route_of(&state, uri.path(), &calls, announced);
    let mut response = respond(&state, request, &request_id, &traceparent, announced)
        .instrument(span)
        .await;
    if let Some(route) = route {
        state
            .routes
            .record(route, started.elapsed(), outcome_of(response.status()));
    }
    if let Ok(value) = hyper::header::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    if !traceparent.is_empty()
        && let Ok(value) = hyper::header::HeaderValue::from_str(&traceparent)
    {
        response
            .headers_mut()
            .insert(rylm_message::trace::TRACEPARENT, value);
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

/// The function a path calls: `/server.sleep:100` is the method `sleep:100`, named `sleep`.
struct Called<'a> {
    /// The path without its leading `/`.
    function: &'a str,
    /// The part after the server's name, if any.
    method: &'a str,
    /// The method without its parameter.
    name: &'a str,
}

impl<'a> Called<'a> {
    fn from_path(path: &'a str) -> Called<'a> {
        let function = path.trim_start_matches('/');
        let method = function
            .split_once('.')
            .map_or(function, |(_, method)| method);
        let name = method.split_once(':').map_or(method, |(name, _)| name);
        Called {
            function,
            method,
            name,
        }
    }
}

/// The route a request counts under: the function it calls (`/sleep:100` under `sleep`),
/// [`UNKNOWN_ROUTE`] for a name the workers do not announce; `None` for the gateway's own
/// routes (`/`, `/healthz`, `/readyz`).
fn route_of<'a>(state: &State, path: &str, calls: &Called<'a>, announced: bool) -> Option<&'a str> {
    if matches!(path, "/" | "/healthz" | "/readyz") {
        return None;
    }
    let known = match &state.status {
        Some(_) => announced,
        // pylm workers announce nothing: their names are counted, up to the table's bound.
        None => is_function_name(calls.function),
    };
    Some(if known { calls.name } else { UNKNOWN_ROUTE })
}

/// The route requests for functions nobody announces count under.
pub const UNKNOWN_ROUTE: &str = "_unknown";

/// How an answer of `status` counts.
fn outcome_of(status: StatusCode) -> Outcome {
    match status.as_u16() {
        ..400 => Outcome::Ok,
        404 => Outcome::Error(ErrorKind::Unknown),
        503 => Outcome::Error(ErrorKind::Busy),
        504 => Outcome::Error(ErrorKind::TimedOut),
        400..500 => Outcome::Error(ErrorKind::Invalid),
        _ => Outcome::Error(ErrorKind::Failed),
    }
}

/// Checks a request, makes it a message, waits for the worker's answer.
async fn respond<B>(
    state: &Arc<State>,
    request: Request<B>,
    request_id: &str,
    traceparent: &str,
    announced: bool,
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
            }).whole();
        }
        "/healthz" => return json_ok(serde_json::json!({ "status": "alive" })).whole(),
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
            .whole();
        }
        _ => {}
    }
    if request.method() != Method::GET && request.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST").whole();
    }
    let Called {
        function, method, ..
    } = Called::from_path(&path);
    if !is_function_name(function) {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("{path:?} is not /<function>: letters, digits and _ - . : only"),
        )
        .whole();
    }
    if let Some(status) = &state.status {
        if status.live_workers() == 0 {
            return unavailable(state, "no worker is connected").whole();
        }
        if !announced {
            let known = status.functions();
            return json_error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no function {method:?}; the workers have {}",
                    known.join(", ")
                ),
            )
            .whole();
        }
    }
    // pylm workers announce nothing, but a request sent while none is connected would wait in
    // the PUSH and reach the first to connect, perhaps after its client gave up.
    if state
        .pylm_workers
        .as_ref()
        .is_some_and(|push| push.peers() == 0)
    {
        return unavailable(state, "no pylm worker is connected").whole();
    }
    // One limit over every connection: beyond it, 503 at once.
    let Ok(_admitted) = state.admitted.clone().try_acquire_owned() else {
        return unavailable(state, "the gateway is at its concurrency limit; try again").whole();
    };

    let mut headers = std::collections::BTreeMap::new();
    headers.insert(
        "http.method".to_owned(),
        request.method().as_str().to_owned(),
    );
    headers.insert("http.request-id".to_owned(), request_id.to_owned());
    if !traceparent.is_empty() {
        headers.insert(
            rylm_message::trace::TRACEPARENT.to_owned(),
            traceparent.to_owned(),
        );
    }
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
            .whole();
        }
        Ok(Err(error)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("the body could not be read: {error}"),
            )
            .whole();
        }
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the body did not come within {:?}", state.body_timeout),
            )
            .whole();
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
        Err(_) => return unavailable(state, "the gateway is shutting down").whole(),
        Ok(()) => match tokio::time::timeout(state.deadline, answer.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return unavailable(state, "the gateway is shutting down").whole(),
            Err(_) => {
                return json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("no worker answered within {:?}", state.deadline),
                )
                .whole();
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
    answer_of(state, first).whole()
}

/// A response with a whole body, as the gateway's response type.
pub(crate) trait Whole {
    fn whole(self) -> Response<HandlerBody>;
}

impl Whole for Response<Full<Bytes>> {
    fn whole(self) -> Response<HandlerBody> {
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
pub(crate) struct Parts {
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
