//! Calls between the proxy and its nodes: a request or signal POSTed to a node's handler, a
//! node's `/request` and `/signal` published on Gilmour, and its compositions, whose lambdas
//! are POSTs back to the node.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use rylm_gilmour::compose::{BoxFuture, Runner};
use rylm_gilmour::node::{self, Incoming};
use rylm_gilmour::protocol::{self, Composed, Step};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::api::{self, Target};
use crate::metrics::Metrics;
use crate::registry::Entry;
use crate::server::{HttpClient, Shared, json, refuse};

/// How one slot or service of a node is called.
pub(crate) struct NodeCall {
    pub(crate) http: HttpClient,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) url: String,
    pub(crate) timeout: Duration,
    pub(crate) max: usize,
    /// `service` or `slot`, for the metrics.
    pub(crate) kind: &'static str,
    /// The node's places for calls.
    pub(crate) calls: Arc<Semaphore>,
}

impl NodeCall {
    /// POSTs the request or signal to the node, once it has a free place, all within the
    /// handler's timeout, and counts it.
    pub(crate) async fn run(&self, incoming: Incoming) -> Step {
        let body = api::call_body(
            Some(&incoming.topic),
            &incoming.sender,
            &incoming.data,
            self.timeout,
        );
        let call = async {
            let started = Instant::now();
            let Ok(Ok(_place)) =
                tokio::time::timeout(self.timeout, self.calls.clone().acquire_owned()).await
            else {
                return timed_out();
            };
            let left = self.timeout.saturating_sub(started.elapsed());
            let traced = incoming.traceparent.as_deref();
            call_node(&self.http, &self.url, body, left, self.max, traced).await
        };
        timed(&self.metrics, self.kind, &incoming.topic, call).await
    }
}

fn timed_out() -> Step {
    Step {
        data: Value::from(protocol::TIMED_OUT_DATA),
        code: protocol::TIMED_OUT,
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
        crate::metrics::error_of(step.code),
    );
    step
}

/// POSTs `body` to the node, at most `timeout`: past it the connection is dropped (so the
/// node's late write fails) and the answer is 499. A traced call carries its `traceparent`
/// header, so that the node's own spans join the trace.
async fn call_node(
    http: &HttpClient,
    url: &str,
    body: Vec<u8>,
    timeout: Duration,
    max: usize,
    traceparent: Option<&str>,
) -> Step {
    let mut request = Request::post(url).header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(traceparent) = traceparent {
        request = request.header(rylm_message::trace::TRACEPARENT, traceparent);
    }
    let request = match request.body(Full::new(Bytes::from(body))) {
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
        Err(_) => timed_out(),
    }
}

/// Runs a node's compositions: requests through the proxy's Gilmour node, lambdas as POSTs to
/// the node.
struct NodeRunner<'a> {
    shared: &'a Shared,
    entry: &'a Entry,
    timeout: Duration,
    /// The trace context of the proxy's span for the node's request.
    traceparent: String,
}

impl Runner<String> for NodeRunner<'_> {
    fn request<'a>(
        &'a self,
        topic: &'a str,
        data: Value,
        timeout: Duration,
    ) -> BoxFuture<'a, Step> {
        let options = node::RequestOptions {
            traceparent: Some(self.traceparent.clone()),
            ..node::RequestOptions::from(timeout)
        };
        let request = self.shared.gilmour.request(topic, data, options);
        Box::pin(timed(&self.shared.metrics, "request", topic, async move {
            node::step_of(request.await)
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
                Some(&self.traceparent),
            )
            .await
        }))
    }
}

/// `POST /request/:id`: the answer's code is also the HTTP status.
pub(crate) async fn publish_request(
    shared: &Shared,
    entry: &Entry,
    body: &Value,
    traceparent: Option<String>,
) -> Response<Full<Bytes>> {
    let publish = match api::request(body, &shared.config.limits) {
        Ok(publish) => publish,
        Err(refused) => return refused_response(&refused),
    };
    let timeout = publish.timeout.unwrap_or(shared.config.request_timeout);
    // One span of the proxy for the node's request; a composition's steps run under it.
    let hop = rylm_message::trace::Hop::continue_from(traceparent.as_deref());
    let runner = NodeRunner {
        shared,
        entry,
        timeout,
        traceparent: hop.traceparent(),
    };
    let span = hop.span("rylm.gilmour-proxy.request");
    run_published(publish, &runner, timeout)
        .instrument(span)
        .await
}

async fn run_published(
    publish: api::Publish,
    runner: &NodeRunner<'_>,
    timeout: Duration,
) -> Response<Full<Bytes>> {
    let composed: Composed = match &publish.target {
        Target::Topic(topic) => {
            Composed::of(vec![runner.request(topic, publish.message, timeout).await])
        }
        Target::Composition(composition) => composition.run(publish.message, runner, timeout).await,
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
pub(crate) async fn publish_signal(
    shared: &Shared,
    body: &Value,
    traceparent: Option<&str>,
) -> Response<Full<Bytes>> {
    let (topic, message) = match api::signal(body) {
        Ok(signal) => signal,
        Err(refused) => return refused_response(&refused),
    };
    let started = Instant::now();
    let sent = shared
        .gilmour
        .signal_traced(&topic, message, traceparent)
        .await;
    shared.metrics.record(
        "signal",
        &topic,
        started.elapsed(),
        sent.is_err().then_some("failed"),
    );
    match sent {
        Ok(receivers) => json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "receivers": receivers }),
        ),
        Err(error) => refuse(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    }
}

/// A refused body as its answer.
pub(crate) fn refused_response(refused: &api::Refused) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST);
    refuse(status, &refused.message)
}
