//! Thousands of concurrent keep-alive connections, where pylm's gateway spent a thread on each:
//! 2,000 connections are opened and held at once, each sends a request, and then each sends a
//! second one on the same connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rylm_components::{Functions, Worker};
use rylm_gateway::{GatewayConfig, HttpGateway};

const CONNECTIONS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_keep_alive_connections_are_held_and_served() {
    tokio::time::timeout(Duration::from_secs(120), run())
        .await
        .expect("done within two minutes");
}

async fn run() {
    let gateway = HttpGateway::start(GatewayConfig::default())
        .await
        .expect("starts");
    let functions = || {
        Functions::new().add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
        })
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            Worker::builder(functions())
                .credits(64)
                .connect(gateway.worker_address())
                .await
                .expect("a worker"),
        );
    }
    let address = gateway.local_addr();

    // Open every connection before any request: all 2,000 are held at once.
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("connection {i} of {CONNECTIONS} refused: {e} (is the open-files limit too low?)"));
        let (sender, connection) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .expect("a handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }

    for round in 0..2 {
        let mut requests = tokio::task::JoinSet::new();
        for (i, mut sender) in senders.drain(..).enumerate() {
            requests.spawn(async move {
                let mut ready = false;
                // The first requests race the workers joining: retry a 503 a few times.
                for _ in 0..200 {
                    sender.ready().await.expect("the connection stays open");
                    let request = Request::post("/upper")
                        .header("host", "gateway")
                        .body(Full::new(Bytes::from(format!("r{round}-c{i}"))))
                        .expect("a request");
                    let response = sender
                        .send_request(request)
                        .await
                        .expect("an answer on the same connection");
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .expect("a body")
                        .to_bytes();
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(body, Bytes::from(format!("R{round}-C{i}")));
                    ready = true;
                    break;
                }
                assert!(ready, "connection {i} never got an answer");
                sender
            });
        }
        while let Some(done) = requests.join_next().await {
            senders.push(done.expect("a request task"));
        }
        assert_eq!(
            senders.len(),
            CONNECTIONS,
            "every connection answered in round {round}"
        );
    }

    drop(senders);
    for worker in workers {
        worker.shutdown().await;
    }
    gateway.shutdown().await.expect("clean");
}
