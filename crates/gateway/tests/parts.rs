//! pylm's HTTP parts as router components: an HttpService in front, an HttpConnection to an
//! HTTP worker behind, the worker's answer routed back as feedback to the waiting request.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rylm_core_router::{Mode, Router};
use rylm_gateway::{HttpConnection, HttpService};

/// An HTTP worker: `POST /reverse` reverses the body; anything else is a 500.
async fn http_worker() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let path = request.uri().path().to_owned();
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let response = match path.as_str() {
                            "/reverse" => {
                                let mut v = body.to_vec();
                                v.reverse();
                                Response::new(Full::new(Bytes::from(v)))
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                Response::new(Full::new(body))
                            }
                            "/huge" => Response::new(Full::new(Bytes::from(vec![b'x'; 2 << 20]))),
                            _ => {
                                let mut response =
                                    Response::new(Full::new(Bytes::from_static(b"no such thing")));
                                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                response
                            }
                        };
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{address}")
}

async fn post(base: &str, path: &str, body: &'static str) -> (StatusCode, String) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("{base}{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("in time")
        .expect("an answer");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_http_service_and_an_http_connection_route_through_the_router() {
    let worker = http_worker().await;
    let service = HttpService::bind("127.0.0.1:0".parse().expect("an address"), 1024)
        .await
        .expect("binds");
    let base = format!("http://{}", service.local_addr().expect("an address"));
    let connection = HttpConnection::new(&worker)
        .timeout(Duration::from_millis(300))
        .max_response(1 << 20);
    let router = Router::builder()
        .outbound(
            "http-worker",
            move |q| connection.run(q),
            None,
            Mode::Blocking,
        )
        .inbound(
            "http-in",
            move |link| service.run(link),
            "http-worker",
            Mode::Blocking,
        )
        .start()
        .expect("a valid table");

    assert_eq!(
        post(&base, "/reverse", "stressed").await,
        (StatusCode::OK, "desserts".to_owned())
    );
    let (status, body) = post(&base, "/unknown", "x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body.contains("500"),
        "the worker's failure is reported: {body}"
    );
    let (status, _) = post(&base, "/", "x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let started = std::time::Instant::now();
    let (status, body) = post(&base, "/slow", "x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("no answer within"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout acted"
    );
    let (status, body) = post(&base, "/huge", "x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = Request::get(format!("{base}/reverse"))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let response = client.request(get).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    router.shutdown_within(Duration::from_secs(5)).await.ok();
}
