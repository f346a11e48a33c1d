//! rylm's layout: answers return over the caller's own connection, admission is bounded with
//! an explicit `busy`, and the stream between servers pushes back instead of dropping.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_components::rylm_transport::{Kind, Options, Socket};
use rylm_components::{Client, ClientOptions, Error, Functions, Server, Transport};
use rylm_message::{Codec, Message, NativeCodec};

const DEADLINE: Duration = Duration::from_secs(10);

fn slow(millis: u64) -> Functions {
    Functions::new().add("slow", move |p: Bytes| async move {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        Ok::<_, String>(p)
    })
}

#[tokio::test]
async fn an_answer_goes_to_the_connection_it_came_from_whatever_the_message_claims() {
    let server = Server::builder("s")
        .functions(slow(0))
        .start()
        .await
        .expect("starts");
    let victim = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    // A peer that claims to be the victim in its message gets the answer itself.
    let options = Options::default().identity(Bytes::from("impostor"));
    let impostor = Socket::new(Kind::Dealer, &options).expect("a socket");
    impostor
        .connect(server.client_address())
        .await
        .expect("connects");
    let codec = NativeCodec::default();
    let forged = Message::call("s.slow", "stolen?")
        .with_client(victim.id())
        .with_cache("0");
    impostor
        .send(codec.encode_frames(&forged).expect("encodes"))
        .await
        .expect("sends");
    let frames = tokio::time::timeout(DEADLINE, impostor.recv())
        .await
        .expect("answered in time")
        .expect("answered");
    let answer = codec.decode_frames(&frames).expect("decodes");
    assert_eq!(&answer.payload[..], b"stolen?");
    assert_eq!(
        answer.client, "impostor",
        "stamped with the connection's identity"
    );
    assert_eq!(
        &victim.eval("slow", "mine").await.expect("eval")[..],
        b"mine"
    );
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn beyond_what_a_server_admits_callers_get_busy_at_once_or_wait_if_they_chose() {
    let server = Server::builder("s")
        .functions(slow(300))
        .max_in_flight(4)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (client.eval("slow", i.to_string()).await, started.elapsed())
            })
        })
        .collect();
    let (mut busy, mut answered) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            (Err(Error::Remote { kind, .. }), took) if kind == "busy" => {
                assert!(took < Duration::from_millis(250), "busy after {took:?}");
                busy += 1;
            }
            (Ok(_), _) => answered += 1,
            (other, _) => panic!("{other:?}"),
        }
    }
    assert_eq!((busy, answered), (16, 4));
    assert_eq!(server.counters().busy.load(Ordering::Relaxed), 16);

    let patient = Client::connect_with(
        server.db_address(),
        ClientOptions {
            retry_busy: true,
            deadline: DEADLINE,
            ..ClientOptions::default()
        },
    )
    .await
    .expect("connects");
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let patient = patient.clone();
            tokio::spawn(async move { patient.eval("slow", i.to_string()).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("task").expect("answered in the end");
        assert_eq!(answer, Bytes::from(i.to_string()));
    }
    server.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_slow_next_stage_pushes_back_and_loses_nothing() {
    let first = Server::builder("first")
        .functions(Functions::new().add("pass", |p: Bytes| async move { Ok::<_, String>(p) }))
        .start()
        .await
        .expect("starts");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = {
        let runs = runs.clone();
        Functions::new().add("count", move |p: Bytes| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, String>(p)
            }
        })
    };
    let second = Server::pipeline("second", first.stream_address(), "first")
        .functions(counted)
        .max_in_flight(8)
        .start()
        .await
        .expect("starts");
    let client = Client::connect_with_results_from(
        first.db_address(),
        Some(second.db_address()),
        Duration::from_secs(60),
    )
    .await
    .expect("connects through the chain");
    let calls: Vec<_> = (0..500)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .eval_stages(&["first.pass", "second.count"], i.to_string())
                    .await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("task").expect("answered");
        assert_eq!(answer, Bytes::from(i.to_string()));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 500, "each ran once");
    let counters = first.counters();
    // The client's handshake went down the stream too.
    assert_eq!(counters.streamed.load(Ordering::Relaxed), 501);
    assert_eq!(counters.stream_refused.load(Ordering::Relaxed), 0);
    second.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_missing_next_stage_is_an_error_answer_not_a_silent_loss() {
    let mut transport = Transport::default();
    transport.bound.send_timeout = Duration::from_millis(300);
    let lonely = Server::builder("first")
        .functions(Functions::new().add("pass", |p: Bytes| async move { Ok::<_, String>(p) }))
        .transport(transport)
        .start()
        .await
        .expect("starts");
    let client = Client::connect(lonely.db_address(), DEADLINE)
        .await
        .expect("connects");
    match client.eval_stages(&["first.pass", "gone.away"], "x").await {
        Err(Error::Remote { kind, .. }) => assert_eq!(kind, "next-stage-unavailable"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lonely.counters().stream_refused.load(Ordering::Relaxed), 1);
    lonely.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_result_too_large_to_send_becomes_an_error_answer() {
    let server = Server::builder("s")
        .functions(Functions::new().add("huge", |_p: Bytes| async move {
            Ok::<_, String>(Bytes::from(vec![1u8; 17 << 20]))
        }))
        .start()
        .await
        .expect("starts");
    let client = Client::connect(server.db_address(), DEADLINE)
        .await
        .expect("connects");
    for _ in 0..3 {
        match client.eval("huge", "").await {
            Err(Error::Remote { kind, .. }) => assert_eq!(kind, "unencodable"),
            other => panic!("{other:?}"),
        }
    }
    server.shutdown().await.expect("clean");
}
