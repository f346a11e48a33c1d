//! Brubeck 0.1.4 at runtime, both ways: a rylm service answers the spec's example frame sent
//! as a Brubeck caller sends it, and a rylm caller calls a peer that answers as a Brubeck
//! service does. (brubeck-service runs only on Python 2: no live peer; the frames are the
//! spec's.)

use std::time::Duration;

use bytes::Bytes;
use rylm_services_mux::brubeck::{self, BrubeckResponse};
use rylm_services_mux::{BrubeckCaller, Method, Service, ServiceResponse};
use rylm_transport::{Kind, Options, Socket};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);
const EXAMPLE: &str = brubeck::SPEC_EXAMPLE;

fn slow_echo() -> Service {
    Service::new("slow-echo", "my_shared_secret")
        .route(r"^/service/slow$", Method::Request, |request| async move {
            let data = request
                .argument("RETURN_DATA")
                .cloned()
                .unwrap_or("NO DATA".into());
            ServiceResponse::new(200, "Took a while, but I am back.").with("RETURN_DATA", data)
        })
        .expect("route")
}

/// A Brubeck caller's sockets, bound: PUSH for requests, DEALER (identity = sender id).
async fn brubeck_caller_sockets(sender_id: &str) -> (Socket, String, Socket, String) {
    let push = Socket::new(Kind::Push, &Options::default()).expect("push");
    let requests = push.bind("tcp://127.0.0.1:0").await.expect("bind");
    let dealer = Socket::new(
        Kind::Dealer,
        &Options::default().identity(Bytes::from(sender_id.to_owned())),
    )
    .expect("dealer");
    let responses = dealer.bind("tcp://127.0.0.1:0").await.expect("bind");
    (push, requests, dealer, responses)
}

async fn response_to(push: &Socket, dealer: &Socket, frame: &str) -> BrubeckResponse {
    push.send(vec![Bytes::from(frame.to_owned())])
        .await
        .expect("pushes");
    let answer = tokio::time::timeout(DEADLINE, dealer.recv())
        .await
        .expect("an answer")
        .expect("receives");
    assert_eq!(answer.len(), 2, "an empty delimiter, then the frame");
    assert!(answer[0].is_empty());
    brubeck::decode_response(&answer[1]).expect("a Brubeck response")
}

#[tokio::test]
async fn a_rylm_service_answers_the_spec_example_as_brubeck_would() {
    let (push, requests, dealer, responses) =
        brubeck_caller_sockets("365e4b3ae1b04a4e94a2f0c3f0e313db").await;
    let service = slow_echo()
        .serve_brubeck(&requests, &responses)
        .await
        .expect("connects");
    // Brubeck's ROUTER sends to an identity it must already know: wait for the connection.
    dealer
        .wait_for_peers(1, DEADLINE)
        .await
        .expect("the service connects");

    let response = response_to(&push, &dealer, EXAMPLE).await;
    assert_eq!(response.conn_id, "3725c0d2e7a44d2fb0c4b6a1e9f8506e");
    assert_eq!(response.sender_id, "365e4b3ae1b04a4e94a2f0c3f0e313db");
    assert_eq!(response.path, "/service/slow");
    assert_eq!(response.method, "response");
    assert_eq!(response.status_code, json!(200));
    assert_eq!(response.status_msg, json!("Took a while, but I am back."));
    assert_eq!(response.body["RETURN_DATA"], "I made a round trip");
    assert_eq!(response.headers["METHOD"], "response");

    // A wrong passphrase is answered 401 (Brubeck stayed silent).
    let wrong = EXAMPLE
        .replace("16:my_shared_secret", "16:not_the_secret!!")
        .replace(
            "3725c0d2e7a44d2fb0c4b6a1e9f8506e",
            "00000000000000000000000000000001",
        );
    let response = response_to(&push, &dealer, &wrong).await;
    assert_eq!(response.status_code, json!(401));
    assert_eq!(response.conn_id, "00000000000000000000000000000001");
    service.shutdown().await;
}

#[tokio::test]
async fn a_rylm_caller_calls_a_brubeck_framed_service() {
    let caller = BrubeckCaller::bind(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        "my_shared_secret",
        &Options::default(),
    )
    .await
    .expect("binds");
    // A peer that answers as Brubeck's service does, from the frames alone.
    let pull = Socket::new(Kind::Pull, &Options::default()).expect("pull");
    pull.connect(caller.requests_address())
        .await
        .expect("connects");
    let router = Socket::new(Kind::Router, &Options::default()).expect("router");
    router
        .connect(caller.responses_address())
        .await
        .expect("connects");
    let peer = tokio::spawn(async move {
        let frames = pull.recv().await.expect("a request");
        let request = brubeck::decode_request(&frames.concat()).expect("a Brubeck request");
        assert_eq!(request.passphrase, "my_shared_secret");
        assert_eq!(request.method, "get");
        let response = BrubeckResponse {
            sender_id: request.sender_id.clone(),
            conn_id: request.conn_id.clone(),
            request_timestamp: request.request_timestamp.clone(),
            start_timestamp: "1".into(),
            end_timestamp: "2".into(),
            passphrase: request.passphrase.clone(),
            origin_sender_id: request.origin_sender_id.clone(),
            origin_conn_id: request.origin_conn_id.clone(),
            origin_out_addr: request.origin_out_addr.clone(),
            handle_response: request.handle_response.clone(),
            path: request.path.clone(),
            method: "response".into(),
            status_code: json!(200),
            status_msg: json!("OK"),
            arguments: json!({}),
            headers: json!({"METHOD": "response"}),
            body: json!({"RETURN_DATA": request.arguments["RETURN_DATA"]}),
        };
        let frame = brubeck::encode_response(&response).expect("encodes");
        router
            .wait_for_peers(1, DEADLINE)
            .await
            .expect("the caller's DEALER is there");
        router
            .send(vec![
                Bytes::from(request.sender_id.into_bytes()),
                Bytes::new(),
                Bytes::from(frame),
            ])
            .await
            .expect("answers");
    });
    let arguments = json!({"RETURN_DATA": "both ways"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let response = caller
        .call("/service/slow", Method::Get, arguments, DEADLINE)
        .await
        .expect("answered");
    assert_eq!(response.status_code, json!(200));
    assert_eq!(response.body["RETURN_DATA"], "both ways");
    peer.await.expect("the peer saw a well-formed request");
}

#[tokio::test]
async fn a_rylm_caller_and_a_rylm_brubeck_service_talk() {
    let caller = BrubeckCaller::bind(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        "my_shared_secret",
        &Options::default(),
    )
    .await
    .expect("binds");
    let service = slow_echo()
        .serve_brubeck(caller.requests_address(), caller.responses_address())
        .await
        .expect("connects");
    let arguments = json!({"RETURN_DATA": "rylm to rylm"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    caller
        .wait_for_services(1, DEADLINE)
        .await
        .expect("the service connects");
    let response = caller
        .call("/service/slow", Method::Request, arguments, DEADLINE)
        .await
        .expect("answered");
    assert_eq!(response.status_code, json!(200));
    assert_eq!(response.body["RETURN_DATA"], "rylm to rylm");
    service.shutdown().await;
}
