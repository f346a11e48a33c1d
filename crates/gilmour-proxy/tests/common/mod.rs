//! What the proxy's tests share: a node written against the proxy's API, an HTTP client, and
//! a proxy on the test Redis.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rylm_gilmour_proxy::{Proxy, ProxyConfig};
use serde_json::{Value, json};

pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn topic(name: &str) -> String {
    format!("{name}.{}", uuid::Uuid::new_v4())
}

/// A node written against the proxy's API: an HTTP server with a health check that can be
/// made to fail, services (`/echo`, `/text`, `/fail`, `/teapot`, `/slow`), a slot (`/slot`)
/// and a lambda (`/lambda`), counting what it is called for.
pub struct TestNode {
    pub port: u16,
    pub healthy: Arc<AtomicBool>,
    pub calls: Arc<AtomicUsize>,
    pub signals: tokio::sync::mpsc::UnboundedReceiver<Value>,
    pub server: tokio::task::JoinHandle<()>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let port = listener.local_addr().expect("an address").port();
        let healthy = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let (heard, signals) = tokio::sync::mpsc::unbounded_channel();
        let (h, c) = (healthy.clone(), calls.clone());
        let server = tokio::spawn(async move {
            // Connection tasks live in this set: stopping the server closes them all, so the
            // node's port then refuses, pooled connections included.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, c, heard) = (h.clone(), c.clone(), heard.clone());
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (h, c, heard) = (h.clone(), c.clone(), heard.clone());
                        async move { Ok::<_, Infallible>(answer(request, &h, &c, &heard).await) }
                    });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestNode {
            port,
            healthy,
            calls,
            signals,
            server,
        }
    }

    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn answer(
    request: Request<hyper::body::Incoming>,
    healthy: &AtomicBool,
    calls: &AtomicUsize,
    heard: &tokio::sync::mpsc::UnboundedSender<Value>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let call: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = |status: u16, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = StatusCode::from_u16(status).expect("a status");
        response
    };
    if path != "/health" {
        calls.fetch_add(1, Ordering::SeqCst);
    }
    match path.as_str() {
        "/health" if healthy.load(Ordering::SeqCst) => reply(200, "ok".into()),
        "/health" => reply(500, "sick".into()),
        "/echo" => reply(200, json!({"echo": call["data"], "topic": call["topic"], "sender": call["sender"], "timeout": call["timeout"]}).to_string()),
        "/text" => reply(200, "plain words".into()),
        "/fail" => reply(503, "it broke".into()),
        "/teapot" => reply(418, json!({"why": "teapot"}).to_string()),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reply(200, "late".into())
        }
        "/slot" => {
            let _ = heard.send(call);
            reply(200, "ignored".into())
        }
        "/lambda" => reply(200, json!({"lambda": call["data"], "topic": call["topic"]}).to_string()),
        _ => reply(404, "no such path".into()),
    }
}

pub type Client = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> Client {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// One HTTP call to the proxy: the status and the JSON body (a string when not JSON).
pub async fn http(
    client: &Client,
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
        .expect("a request");
    let response = tokio::time::timeout(DEADLINE, client.request(request))
        .await
        .expect("the proxy answers in time")
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

pub struct Setup {
    pub proxy: Proxy,
    pub base: String,
    pub url: String,
    pub http: Client,
}

impl Setup {
    pub async fn new(test: &str, tune: impl FnOnce(&mut ProxyConfig)) -> Option<Setup> {
        let url = rylm_testkit::redis_url(test)?;
        let mut config = ProxyConfig::new(&url);
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        tune(&mut config);
        let proxy = Proxy::start(config).await.expect("the proxy starts");
        let base = format!("http://{}", proxy.local_addr());
        Some(Setup {
            proxy,
            base,
            url,
            http: client(),
        })
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        http(
            &self.http,
            method,
            &format!("{}{path}", self.base),
            body.as_deref(),
            None,
        )
        .await
    }

    pub async fn register(&self, body: Value) -> String {
        let (status, answer) = self.call("POST", "/nodes", Some(body)).await;
        assert_eq!((status, &answer["status"]), (200, &json!("ok")), "{answer}");
        answer["id"].as_str().expect("an id").to_owned()
    }

    pub async fn subscribers(&self, channel: &str) -> i64 {
        use fred::prelude::*;
        let raw = Builder::from_config(Config::from_url(&self.url).unwrap())
            .build()
            .unwrap();
        raw.init().await.expect("connects");
        let counts: Vec<(String, i64)> = raw.pubsub_numsub(channel).await.expect("NUMSUB");
        let _ = raw.quit().await;
        counts.iter().map(|(_, n)| n).sum()
    }
}
