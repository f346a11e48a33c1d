//! Brubeck 0.1.4 at runtime: a [`Service`] that answers Brubeck callers
//! ([`Service::serve_brubeck`]) and a [`BrubeckCaller`] of Brubeck-framed services, so that a
//! Brubeck system can move to rylm one process at a time.
//!
//! The layout is Brubeck's: the caller binds a PUSH for requests and a DEALER (identity = its
//! sender id) for responses; the service connects a PULL and a ROUTER and answers
//! `[sender_id, "", frame]`. The framing is [`crate::brubeck`]'s. Brubeck authenticates with a
//! passphrase carried in clear text in every frame: the service compares it in constant time
//! and answers a wrong one with 401 (Brubeck stayed silent). Use CURVE on the sockets
//! ([`rylm_transport::Security`]) where the network is not trusted; this layout has no
//! heartbeats and no replay protection, which is why the native protocol exists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rylm_transport::{Kind, Options, Socket};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, oneshot, watch};

use crate::brubeck::{self, BrubeckRequest, BrubeckResponse};
use crate::protocol::{self, Method, WireRequest};
use crate::service::{Service, ServiceHandle};
use crate::{Error, ServiceResponse};

impl Service {
    /// Serves Brubeck 0.1.4 callers: connects a PULL to the caller's request address and a
    /// ROUTER to its response address. The passphrase must be one of the service's secrets.
    pub async fn serve_brubeck(
        self,
        requests: &str,
        responses: &str,
    ) -> Result<ServiceHandle, Error> {
        let pull = Socket::new(Kind::Pull, &self.transport)?;
        pull.connect(requests).await?;
        let router = Socket::new(Kind::Router, &self.transport)?;
        router.connect(responses).await?;
        let (stop, stopped) = watch::channel(false);
        let instance = rylm_message::new_id();
        let address = requests.to_owned();
        let task = tokio::spawn(run(Arc::new(self), pull, router, stopped, address.clone()));
        tracing::info!(%requests, %responses, "Brubeck service connected");
        Ok(ServiceHandle::new(address, instance, stop, task))
    }
}

async fn run(
    service: Arc<Service>,
    pull: Socket,
    router: Socket,
    mut stopped: watch::Receiver<bool>,
    address: String,
) {
    let slots = Arc::new(Semaphore::new(service.concurrency));
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        let received = tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = handlers.join_next(), if !handlers.is_empty() => continue,
            received = pull.recv() => received,
        };
        let frames = match received {
            Ok(frames) => frames,
            Err(error) if error.is_closed() => break,
            Err(error) => {
                tracing::warn!(%address, %error, "receiving failed");
                continue;
            }
        };
        let request = match brubeck::decode_request(&frames.concat()) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%address, %error, "dropped a malformed Brubeck frame");
                continue;
            }
        };
        let (service, router) = (service.clone(), router.clone());
        if !service
            .secrets
            .iter()
            .any(|secret| secret.matches(request.passphrase.as_bytes()))
        {
            tracing::warn!(%address, conn = %request.conn_id, "refused a Brubeck request with a wrong passphrase");
            let response = ServiceResponse::new(401, "wrong passphrase");
            tokio::spawn(async move { answer(&router, &request, response, 0).await });
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let response = ServiceResponse::new(503, "busy: every handler slot is taken")
                .with_header(crate::BUSY, "true");
            tokio::spawn(async move { answer(&router, &request, response, 0).await });
            continue;
        };
        handlers.spawn(async move {
            let started = protocol::now_ms();
            let response = service.dispatch(to_wire(&request)).await;
            answer(&router, &request, response, started).await;
            drop(permit);
        });
    }
    while handlers.join_next().await.is_some() {}
    router.close().await;
    pull.close().await;
}

/// A Brubeck request as the routes see it: the connection id is the call's id.
fn to_wire(request: &BrubeckRequest) -> WireRequest {
    let object = |value: &Value| value.as_object().cloned().unwrap_or_default();
    WireRequest {
        id: request.conn_id.clone(),
        ts: protocol::now_ms(),
        path: request.path.clone(),
        method: request.method.clone(),
        arguments: object(&request.arguments),
        headers: object(&request.headers)
            .into_iter()
            .map(|(name, value)| match value {
                Value::String(text) => (name, text),
                other => (name, other.to_string()),
            })
            .collect(),
        body: serde_json::to_vec(&request.body).unwrap_or_default(),
    }
}

async fn answer(
    router: &Socket,
    request: &BrubeckRequest,
    response: ServiceResponse,
    started: u64,
) {
    let mut headers: Map<String, Value> = response
        .headers
        .into_iter()
        .map(|(name, value)| (name, Value::String(value)))
        .collect();
    headers.insert("METHOD".into(), json!(Method::Response.as_str()));
    let frame = BrubeckResponse {
        sender_id: request.sender_id.clone(),
        conn_id: request.conn_id.clone(),
        request_timestamp: request.request_timestamp.clone(),
        start_timestamp: started.to_string(),
        end_timestamp: protocol::now_ms().to_string(),
        passphrase: request.passphrase.clone(),
        origin_sender_id: request.origin_sender_id.clone(),
        origin_conn_id: request.origin_conn_id.clone(),
        origin_out_addr: request.origin_out_addr.clone(),
        handle_response: request.handle_response.clone(),
        path: request.path.clone(),
        method: Method::Response.as_str().into(),
        status_code: json!(response.status),
        status_msg: json!(response.status_msg),
        arguments: json!({}),
        headers: Value::Object(headers),
        body: Value::Object(response.payload),
    };
    let encoded = match brubeck::encode_response(&frame) {
        Ok(encoded) => encoded,
        Err(error) => {
            tracing::error!(%error, "cannot encode a Brubeck response");
            return;
        }
    };
    let frames = vec![
        Bytes::from(request.sender_id.clone().into_bytes()),
        Bytes::new(),
        Bytes::from(encoded),
    ];
    if let Err(error) = router.send(frames).await {
        tracing::debug!(%error, "could not answer a Brubeck caller");
    }
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<BrubeckResponse>>>>;

/// A caller of Brubeck-framed services, in Brubeck's layout: it binds a PUSH for requests and
/// a DEALER for responses, and the services connect to it.
pub struct BrubeckCaller {
    requests: Socket,
    responses: Socket,
    requests_address: String,
    responses_address: String,
    sender_id: String,
    passphrase: String,
    waiting: Waiting,
    receiver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for BrubeckCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrubeckCaller")
            .field("requests", &self.requests_address)
            .field("responses", &self.responses_address)
            .finish()
    }
}

impl Drop for BrubeckCaller {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

impl BrubeckCaller {
    /// Binds the request PUSH at `requests` and the response DEALER at `responses`
    /// (`tcp://127.0.0.1:0` picks free ports); `passphrase` is the services' shared secret.
    pub async fn bind(
        requests: &str,
        responses: &str,
        passphrase: &str,
        options: &Options,
    ) -> Result<BrubeckCaller, Error> {
        let sender_id = rylm_message::new_id();
        let push = Socket::new(Kind::Push, options)?;
        let requests_address = push.bind(requests).await?;
        let dealer = Socket::new(Kind::Dealer, &options.clone().identity(sender_id.clone()))?;
        let responses_address = dealer.bind(responses).await?;
        let waiting: Waiting = Arc::default();
        let receiver = tokio::spawn(receive(dealer.clone(), waiting.clone()));
        Ok(BrubeckCaller {
            requests: push,
            responses: dealer,
            requests_address,
            responses_address,
            sender_id,
            passphrase: passphrase.to_owned(),
            waiting,
            receiver,
        })
    }

    /// Where services connect their PULL.
    pub fn requests_address(&self) -> &str {
        &self.requests_address
    }

    /// Where services connect their ROUTER.
    pub fn responses_address(&self) -> &str {
        &self.responses_address
    }

    /// Waits until at least `count` services have connected to the response socket (a
    /// service can answer only once it has), or fails after `deadline`.
    pub async fn wait_for_services(&self, count: usize, deadline: Duration) -> Result<(), Error> {
        self.responses.wait_for_peers(count, deadline).await?;
        self.requests.wait_for_peers(count, deadline).await?;
        Ok(())
    }

    /// Calls `path` with `method` and `arguments`, and waits up to `deadline` for the answer.
    pub async fn call(
        &self,
        path: &str,
        method: Method,
        arguments: Map<String, Value>,
        deadline: Duration,
    ) -> Result<BrubeckResponse, Error> {
        let conn_id = rylm_message::new_id();
        let request = BrubeckRequest {
            sender_id: self.sender_id.clone(),
            conn_id: conn_id.clone(),
            request_timestamp: protocol::now_ms().to_string(),
            passphrase: self.passphrase.clone(),
            origin_sender_id: self.sender_id.clone(),
            origin_conn_id: conn_id.clone(),
            origin_out_addr: self.responses_address.clone(),
            handle_response: "1".into(),
            path: path.to_owned(),
            method: method.as_str().into(),
            arguments: Value::Object(arguments),
            headers: json!({}),
            body: json!({}),
        };
        let frame = brubeck::encode_request(&request)?;
        let (sender, answered) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id.clone(), sender);
        let exchange = async {
            self.requests
                .send_within(vec![Bytes::from(frame)], deadline)
                .await?;
            answered.await.map_err(|_| Error::Closed)
        };
        let outcome = tokio::time::timeout(deadline, exchange).await;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
        match outcome {
            Ok(answer) => answer,
            Err(_) => Err(Error::Timeout {
                path: path.to_owned(),
                waited: deadline,
            }),
        }
    }
}

async fn receive(dealer: Socket, waiting: Waiting) {
    while let Ok(frames) = dealer.recv().await {
        // `["", frame]`: the last frame is the response.
        let Some(frame) = frames.last() else { continue };
        match brubeck::decode_response(frame) {
            Ok(response) => {
                let waiter = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&response.conn_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response);
                }
            }
            Err(error) => tracing::warn!(%error, "dropped a malformed Brubeck response"),
        }
    }
}
