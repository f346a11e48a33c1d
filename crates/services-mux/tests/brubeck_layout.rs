//! The brubeck codec over Brubeck 0.1.4's socket layout: the caller binds PUSH (requests) and
//! DEALER with its sender id as identity (responses); the service connects PULL and ROUTER and
//! answers `[sender_id, "", frame]`.

use std::time::Duration;

use bytes::Bytes;
use rylm_services_mux::brubeck::{self, BrubeckRequest, BrubeckResponse};
use rylm_transport::{Kind, Options, Socket};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_request_and_its_response_cross_the_brubeck_sockets() {
    let sender_id = "365e4b3ae1b04a4e94a2f0c3f0e313db";

    // The caller's side.
    let requests = Socket::new(Kind::Push, &Options::default()).expect("socket");
    let request_addr = requests.bind("tcp://127.0.0.1:0").await.expect("binds");
    let responses = Socket::new(
        Kind::Dealer,
        &Options::default().identity(Bytes::from_static(sender_id.as_bytes())),
    )
    .expect("socket");
    let response_addr = responses.bind("tcp://127.0.0.1:0").await.expect("binds");

    // The service's side.
    let pull = Socket::new(Kind::Pull, &Options::default()).expect("socket");
    pull.connect(&request_addr).await.expect("connects");
    let router = Socket::new(Kind::Router, &Options::default()).expect("socket");
    router.connect(&response_addr).await.expect("connects");

    let request = BrubeckRequest {
        sender_id: sender_id.into(),
        conn_id: "3725c0d2e7a44d2fb0c4b6a1e9f8506e".into(),
        request_timestamp: "1358433619512".into(),
        passphrase: "my_shared_secret".into(),
        origin_sender_id: "34f9ceee-cd52-4b7f-b197-88bf2f0ec378".into(),
        origin_conn_id: "1".into(),
        origin_out_addr: "tcp://127.0.0.1:9998".into(),
        handle_response: "1".into(),
        path: "/service/slow".into(),
        method: "request".into(),
        arguments: json!({"RETURN_DATA": "I made a round trip"}),
        headers: json!({}),
        body: json!({}),
    };
    let frame = brubeck::encode_request(&request).expect("encodes");
    requests
        .send(vec![Bytes::from(frame)])
        .await
        .expect("pushes");

    let received = tokio::time::timeout(DEADLINE, pull.recv())
        .await
        .expect("arrives")
        .expect("receives");
    let got = brubeck::decode_request(&received.concat()).expect("decodes");
    assert_eq!(got, request);

    let response = BrubeckResponse {
        sender_id: got.sender_id.clone(),
        conn_id: got.conn_id.clone(),
        request_timestamp: got.request_timestamp.clone(),
        start_timestamp: "1358433619513".into(),
        end_timestamp: "1358433624514".into(),
        passphrase: got.passphrase.clone(),
        origin_sender_id: got.origin_sender_id.clone(),
        origin_conn_id: got.origin_conn_id.clone(),
        origin_out_addr: got.origin_out_addr.clone(),
        handle_response: got.handle_response.clone(),
        path: got.path.clone(),
        method: "response".into(),
        status_code: json!(200),
        status_msg: json!("Took a while, but I am back."),
        arguments: json!({}),
        headers: json!({"METHOD": "response"}),
        body: got.arguments.clone(),
    };
    let frames = vec![
        Bytes::from(got.sender_id.clone().into_bytes()),
        Bytes::new(),
        Bytes::from(brubeck::encode_response(&response).expect("encodes")),
    ];
    // A ROUTER routes only to a peer whose handshake (and so identity) it has.
    router
        .wait_for_peers(1, DEADLINE)
        .await
        .expect("the caller's DEALER is connected");
    router.send(frames).await.expect("routes to the caller");

    let answer = tokio::time::timeout(DEADLINE, responses.recv())
        .await
        .expect("arrives")
        .expect("receives");
    let parts = answer;
    assert_eq!(parts.len(), 2, "an empty delimiter, then the frame");
    assert!(parts[0].is_empty());
    let back = brubeck::decode_response(&parts[1]).expect("decodes");
    assert_eq!(back.conn_id, request.conn_id);
    assert_eq!(back.body["RETURN_DATA"], "I made a round trip");
}
