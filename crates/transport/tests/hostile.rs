//! Hostile and broken peers on real TCP sockets: a socket survives them, drops and counts
//! them, and goes on serving a legitimate peer.

use std::time::Duration;

use bytes::Bytes;
use rylm_transport::{Kind, Options, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);

/// A ZMTP 3.0 greeting for the NULL mechanism, as a client.
fn greeting() -> Vec<u8> {
    let mut greeting = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    greeting.extend(mechanism);
    greeting.push(0); // as-server
    greeting.resize(64, 0);
    greeting
}

/// A long frame header declaring `size` bytes.
fn long_frame(size: u64) -> Vec<u8> {
    let mut header = vec![0x02];
    header.extend(size.to_be_bytes());
    header
}

/// A READY command for a DEALER, to complete the NULL handshake by hand.
fn ready_dealer() -> Vec<u8> {
    let mut body = vec![5];
    body.extend(b"READY");
    body.push(11);
    body.extend(b"Socket-Type");
    body.extend(6u32.to_be_bytes());
    body.extend(b"DEALER");
    let mut command = vec![0x04, body.len() as u8];
    command.extend(body);
    command
}

async fn echo_server(options: Options) -> (Socket, String, tokio::task::JoinHandle<()>) {
    let server = Socket::new(Kind::Router, &options).expect("router");
    let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");
    let echo = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Ok(frames) = server.recv().await {
                if server.send(frames).await.is_err() {
                    return;
                }
            }
        })
    };
    (server, address, echo)
}

async fn round_trip(client: &Socket, text: &str) {
    client
        .send(vec![Bytes::from(text.to_owned())])
        .await
        .expect("send");
    let reply = tokio::time::timeout(DEADLINE, client.recv())
        .await
        .expect("a reply in time")
        .expect("receive");
    assert_eq!(reply, vec![Bytes::from(text.to_owned())]);
}

fn tcp_port(address: &str) -> String {
    address.trim_start_matches("tcp://").to_owned()
}

/// Reads until the peer closes; true when it did within the deadline.
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_frame_declaring_2_to_the_46_bytes_before_any_handshake_is_dropped() {
    let (server, address, _echo) = echo_server(Options::default()).await;
    for size in [1u64 << 46, 1 << 35, 1 << 33, 100 << 20] {
        let mut hostile = TcpStream::connect(tcp_port(&address)).await.expect("tcp");
        let mut bytes = greeting();
        bytes.extend(long_frame(size));
        assert_eq!(bytes.len(), 73);
        // The peer may close before all is written; what matters is that it closes.
        let _ = hostile.write_all(&bytes).await;
        assert!(
            closed_by_peer(&mut hostile, DEADLINE).await,
            "a peer declaring {size} bytes was not dropped"
        );
    }
    let client = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    client.connect(&address).await.expect("connect");
    round_trip(&client, "still serving").await;
    drop(server);
}

#[tokio::test]
async fn a_frame_over_the_limit_after_the_handshake_drops_that_peer_and_is_counted() {
    let limit = 64 * 1024;
    let (server, address, _echo) = echo_server(Options::default().max_message_size(limit)).await;

    // By hand: greeting, READY, then a data frame header over the limit.
    let mut hostile = TcpStream::connect(tcp_port(&address)).await.expect("tcp");
    hostile.write_all(&greeting()).await.expect("greeting");
    hostile.write_all(&ready_dealer()).await.expect("ready");
    hostile
        .write_all(&long_frame(limit as u64 * 4))
        .await
        .expect("header");
    let _ = hostile.write_all(&vec![0u8; 4096]).await;
    assert!(closed_by_peer(&mut hostile, DEADLINE).await, "not dropped");

    // A real socket whose own limit is higher sends a message too large for the server.
    let big = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    big.connect(&address).await.expect("connect");
    big.send(vec![Bytes::from(vec![7u8; limit * 2])])
        .await
        .expect("queued");

    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server.stats().dropped < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drops not counted: {:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    client.connect(&address).await.expect("connect");
    round_trip(&client, "after the oversized ones").await;
}

#[tokio::test]
async fn five_thousand_silent_connections_are_closed_while_a_client_is_served() {
    let options = Options::default()
        .handshake_timeout(Duration::from_millis(800))
        .max_pending_handshakes(512);
    let (server, address, _echo) = echo_server(options).await;
    let client = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    client.connect(&address).await.expect("connect");
    round_trip(&client, "before").await;

    let mut silent = Vec::new();
    for _ in 0..5_000 {
        match TcpStream::connect(tcp_port(&address)).await {
            Ok(stream) => silent.push(stream),
            // A full accept queue may refuse some: that is a closed connection too.
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused),
        }
    }
    // The legitimate client, already connected, is served while the silent ones wait.
    for i in 0..20 {
        round_trip(&client, &format!("meanwhile {i}")).await;
    }
    let opened = silent.len();
    let mut closed = 0;
    for stream in &mut silent {
        if closed_by_peer(stream, Duration::from_secs(60)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, opened, "silent connections left open");
    // And a new client gets in once they are gone.
    let late = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    late.connect(&address).await.expect("connect");
    round_trip(&late, "after").await;
    assert!(server.stats().handshake_failed > 0, "{:?}", server.stats());
}

#[tokio::test]
async fn garbage_instead_of_a_greeting_is_dropped() {
    let (_server, address, _echo) = echo_server(Options::default()).await;
    let mut hostile = TcpStream::connect(tcp_port(&address)).await.expect("tcp");
    let _ = hostile
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let _ = hostile.write_all(&[0u8; 200]).await;
    assert!(closed_by_peer(&mut hostile, DEADLINE).await, "not dropped");
    let client = Socket::new(Kind::Dealer, &Options::default()).expect("dealer");
    client.connect(&address).await.expect("connect");
    round_trip(&client, "still serving").await;
}
