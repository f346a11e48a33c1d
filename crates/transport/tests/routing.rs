//! ROUTER routing: declared identities reach the owner in the `Ready` event, and with
//! `router_mandatory` a send to a peer that is not there fails instead of vanishing.

use std::time::Duration;

use bytes::Bytes;
use rylm_transport::{Event, Kind, Options, Socket};

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_declared_identity_is_reported_and_unknown_peers_fail_when_mandatory() {
    let router =
        Socket::new(Kind::Router, &Options::default().router_mandatory(true)).expect("a socket");
    let mut events = router.events();
    let address = router.bind("tcp://127.0.0.1:0").await.expect("binds");
    let dealer =
        Socket::new(Kind::Dealer, &Options::default().identity("stage-a")).expect("a socket");
    dealer.connect(&address).await.expect("connects");
    let identity = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(Event::Ready { identity, .. }) = events.next().await {
                return identity;
            }
        }
    })
    .await
    .expect("ready in time");
    assert_eq!(identity, Some(Bytes::from("stage-a")));

    router
        .send(vec![Bytes::from("stage-a"), Bytes::from("hello")])
        .await
        .expect("a known peer");
    let frames = tokio::time::timeout(DEADLINE, dealer.recv())
        .await
        .expect("in time")
        .expect("received");
    assert_eq!(frames, vec![Bytes::from("hello")]);
    let unknown = router
        .send(vec![Bytes::from("nobody"), Bytes::from("lost?")])
        .await;
    assert!(unknown.is_err(), "a send to an unknown peer fails");

    let lax = Socket::new(Kind::Router, &Options::default()).expect("a socket");
    lax.bind("tcp://127.0.0.1:0").await.expect("binds");
    let dropped = lax
        .send(vec![Bytes::from("nobody"), Bytes::from("lost")])
        .await;
    assert!(dropped.is_ok(), "without it the send is dropped silently");
}

#[tokio::test]
async fn a_burst_is_taken_without_waiting_and_nothing_is_taken_twice() {
    let router = Socket::new(Kind::Router, &Options::default()).expect("a socket");
    let address = router.bind("tcp://127.0.0.1:0").await.expect("binds");
    assert!(
        router.try_recv_message().expect("no error").is_none(),
        "nothing has come yet"
    );
    let dealer = Socket::new(Kind::Dealer, &Options::default()).expect("a socket");
    dealer.connect(&address).await.expect("connects");
    for n in 0..10u8 {
        dealer.send(vec![Bytes::from(vec![n])]).await.expect("sent");
    }
    // The first with a wait; the others as they are there, in order, each once.
    let mut taken = Vec::new();
    let first = tokio::time::timeout(DEADLINE, router.recv_message())
        .await
        .expect("in time")
        .expect("received");
    taken.push(first.part(1).expect("a body").to_vec());
    let until = tokio::time::Instant::now() + DEADLINE;
    while taken.len() < 10 && tokio::time::Instant::now() < until {
        match router.try_recv_message().expect("no error") {
            Some(received) => taken.push(received.part(1).expect("a body").to_vec()),
            None => tokio::task::yield_now().await,
        }
    }
    let expected: Vec<Vec<u8>> = (0..10u8).map(|n| vec![n]).collect();
    assert_eq!(taken, expected);
    assert!(router.try_recv_message().expect("no error").is_none());
}
