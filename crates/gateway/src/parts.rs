//! pylm's HTTP parts as router components: `HttpService` (inbound: an HTTP server whose requests
//! are submitted to the router) and `HttpConnection` (outbound: each message is POSTed to an HTTP
//! worker and its response is the feedback).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rylm_core_router::{Error as RouterError, InboundLink, OutboundQueue};
use rylm_message::Message;

use crate::Error;

fn component_error(reason: String) -> RouterError {
    RouterError::Component {
        component: "http".into(),
        reason,
    }
}

/// An outbound, blocking component: POSTs each message's payload to `<base>/<method>` and hands
/// the response body back as feedback (the same envelope); a non-2xx answer, no answer within
/// the timeout, or a body above the size limit fails the message. Many messages are in flight
/// at once, on keep-alive connections.
#[derive(Debug)]
pub struct HttpConnection {
    base: String,
    timeout: std::time::Duration,
    max_response: usize,
}

impl HttpConnection {
    /// A connection to the HTTP worker at `base` (for example `http://127.0.0.1:8080`), with a
    /// 30 s timeout per request and responses up to 8 MiB.
    pub fn new(base: &str) -> HttpConnection {
        HttpConnection {
            base: base.trim_end_matches('/').to_owned(),
            timeout: std::time::Duration::from_secs(30),
            max_response: 8 * 1024 * 1024,
        }
    }

    /// How long one request may take, response body included.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest response body read; a larger one fails the message.
    pub fn max_response(mut self, bytes: usize) -> Self {
        self.max_response = bytes;
        self
    }

    /// The router component (register it blocking).
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let base: Arc<str> = self.base.into();
        let (timeout, max_response) = (self.timeout, self.max_response);
        while let Some(delivery) = queue.recv().await {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let (message, responder) = delivery.into_parts();
                let method = message.method().unwrap_or_default().to_owned();
                let outcome = async {
                    let request = Request::post(format!("{base}/{method}"))
                        .body(Full::new(message.payload.clone()))
                        .map_err(|e| component_error(e.to_string()))?;
                    let response = client
                        .request(request)
                        .await
                        .map_err(|e| component_error(format!("POST {base}/{method}: {e}")))?;
                    let status = response.status();
                    let body = Limited::new(response.into_body(), max_response)
                        .collect()
                        .await
                        .map_err(|e| {
                            component_error(format!(
                                "POST {base}/{method}: the response (up to {max_response} bytes): {e}"
                            ))
                        })?
                        .to_bytes();
                    if !status.is_success() {
                        return Err(component_error(format!(
                            "POST {base}/{method} answered {status}: {}",
                            String::from_utf8_lossy(&body)
                        )));
                    }
                    Ok(Some(message.reply(body)))
                };
                let outcome = match tokio::time::timeout(timeout, outcome).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(component_error(format!(
                        "POST {base}/{method}: no answer within {timeout:?}"
                    ))),
                };
                responder.send(outcome);
            });
        }
        Ok(())
    }
}

/// An inbound, blocking component: an HTTP server whose `POST /function` requests become messages
/// submitted to the router; the feedback's payload is the response body. Any other method is
/// answered 405. A client has 10 s to send a request's headers (and to send the next one on a
/// kept-alive connection).
#[derive(Debug)]
pub struct HttpService {
    listener: tokio::net::TcpListener,
    max_body: usize,
}

impl HttpService {
    /// Binds `address`.
    pub async fn bind(address: SocketAddr, max_body: usize) -> Result<HttpService, Error> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| Error::Listen {
                address: address.to_string(),
                source,
            })?;
        Ok(HttpService { listener, max_body })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The router component (register it blocking).
    pub async fn run(self, mut link: InboundLink) -> Result<(), RouterError> {
        let max_body = self.max_body;
        loop {
            let (stream, _) = tokio::select! {
                _ = link.stopping() => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                },
            };
            let link = link.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let link = link.clone();
                    async move { Ok::<_, Infallible>(serve_one(link, request, max_body).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

async fn serve_one(
    link: InboundLink,
    request: Request<Incoming>,
    max_body: usize,
) -> Response<Full<Bytes>> {
    let answer = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.method() != hyper::Method::POST {
        let mut response = answer(StatusCode::METHOD_NOT_ALLOWED, "POST /<function>".into());
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return response;
    }
    let function = request.uri().path().trim_start_matches('/').to_owned();
    if function.is_empty() || function.contains('/') {
        return answer(StatusCode::BAD_REQUEST, "POST /<function>".into());
    }
    let body = match Limited::new(request.into_body(), max_body).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("above {max_body} bytes"),
            );
        }
    };
    match link.submit(Message::call(function, body)).await {
        Ok(Some(feedback)) => match feedback.header(rylm_components::ERROR_KIND) {
            None => Response::new(Full::new(feedback.payload)),
            Some(kind) => answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "{kind}: {}",
                    feedback
                        .header(rylm_components::ERROR_MESSAGE)
                        .unwrap_or_default()
                ),
            ),
        },
        Ok(None) => answer(StatusCode::ACCEPTED, String::new()),
        Err(error) => answer(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}
