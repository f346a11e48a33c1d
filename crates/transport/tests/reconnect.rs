//! Connecting sockets come back by themselves when their peer is closed and bound again on
//! the same address, and what a graceful close accepted is flushed.

use std::time::Duration;

use bytes::Bytes;
use rylm_transport::{Event, Kind, Options, Socket};

const DEADLINE: Duration = Duration::from_secs(20);

async fn recv(socket: &Socket) -> Vec<Bytes> {
    tokio::time::timeout(DEADLINE, socket.recv())
        .await
        .expect("a message in time")
        .expect("receive")
}

/// Binds `address` again, retrying while the old listener's port is still being released.
async fn rebind(kind: Kind, address: &str) -> Socket {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let socket = Socket::new(kind, &Options::default()).expect("socket");
        match socket.bind(address).await {
            Ok(_) => return socket,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "port not free yet");
                socket.close().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("could not bind {address} again: {error}"),
        }
    }
}

#[tokio::test]
async fn dealer_push_and_req_reconnect_to_a_peer_bound_again() {
    for (client_kind, server_kind) in [
        (Kind::Dealer, Kind::Router),
        (Kind::Push, Kind::Pull),
        (Kind::Req, Kind::Rep),
    ] {
        let server = Socket::new(server_kind, &Options::default()).expect("server");
        let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");
        let client = Socket::new(client_kind, &Options::default()).expect("client");
        let mut events = client.events();
        client.connect(&address).await.expect("connect");
        client.send(vec!["one".into()]).await.expect("send");
        let got = recv(&server).await;
        assert_eq!(got.last(), Some(&Bytes::from("one")), "{client_kind:?}");
        if server_kind == Kind::Rep {
            server.send(vec!["ok".into()]).await.expect("reply");
            assert_eq!(recv(&client).await, vec![Bytes::from("ok")]);
        }
        server.close().await;
        // The client notices; then a new server takes the address.
        tokio::time::timeout(DEADLINE, async {
            while !matches!(events.next().await, Some(Event::Disconnected { .. }) | None) {}
        })
        .await
        .expect("disconnection noticed");
        let server = rebind(server_kind, &address).await;
        client.send(vec!["two".into()]).await.expect("send");
        let got = recv(&server).await;
        assert_eq!(got.last(), Some(&Bytes::from("two")), "{client_kind:?}");
        assert!(client.stats().connected >= 2, "{:?}", client.stats());
        server.close().await;
        client.close().await;
    }
}

#[tokio::test]
async fn messages_sent_while_the_peer_is_away_arrive_once_it_is_back() {
    let port = rylm_testkit::free_port();
    let address = format!("tcp://127.0.0.1:{port}");
    let client = Socket::new(Kind::Push, &Options::default()).expect("push");
    client.connect(&address).await.expect("connect");
    for i in 0..10 {
        client
            .send(vec![Bytes::from(format!("early {i}"))])
            .await
            .expect("queued");
    }
    let server = rebind(Kind::Pull, &address).await;
    for i in 0..10 {
        assert_eq!(recv(&server).await, vec![Bytes::from(format!("early {i}"))]);
    }
}

#[tokio::test]
async fn a_graceful_close_flushes_what_was_accepted() {
    let server = Socket::new(Kind::Pull, &Options::default()).expect("pull");
    let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");
    let client = Socket::new(Kind::Push, &Options::default()).expect("push");
    client.connect(&address).await.expect("connect");
    for i in 0..500 {
        client
            .send(vec![Bytes::from(format!("{i}"))])
            .await
            .expect("queued");
    }
    client.close().await;
    for i in 0..500 {
        assert_eq!(recv(&server).await, vec![Bytes::from(format!("{i}"))]);
    }
}

#[tokio::test]
async fn a_send_with_no_peer_fails_after_its_deadline() {
    let server = Socket::new(Kind::Push, &Options::default()).expect("push");
    server.bind("tcp://127.0.0.1:0").await.expect("bind");
    let error = server
        .send_within(vec!["nobody".into()], Duration::from_millis(100))
        .await
        .expect_err("no peer");
    assert!(
        matches!(error, rylm_transport::Error::SendTimeout { .. }),
        "{error}"
    );
}
