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
