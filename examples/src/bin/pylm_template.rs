//! pylm's "template" example: a server built by hand from a router and parts.
//!
//! A PULL service takes messages from clients; a blocking component of our own (a counter that
//! numbers every message) answers each; its feedback is routed on to a PUB service, which
//! publishes it to the client. The cache is not needed: the client here is built from parts too.
//!
//! `cargo run -p rylm-examples --bin pylm_template`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rylm_components::parts::{Emit, Endpoint, Listen, Transport};
use rylm_core_router::{Mode, OutboundQueue, Router};
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::{Kind, Options, Socket};

#[tokio::main]
async fn main() -> Result<()> {
    let codec: Arc<dyn Codec> = Arc::new(NativeCodec::default());
    let loopback = || Endpoint::Bind("tcp://127.0.0.1:0".into());
    let transport = Transport::default();

    // The parts: a PULL service in, a PUB service out (topic: the client's id).
    let pull = Listen::pull(&loopback(), &transport, codec.clone()).await?;
    let publish = Emit::publish(
        &loopback(),
        Arc::new(|m: &Message| vec![m.client.clone()]),
        &transport,
        codec.clone(),
    )
    .await?;
    let (pull_address, pub_address) = (pull.address().to_owned(), publish.address().to_owned());

    // A component of our own: numbers each message, many at once.
    let counter = Arc::new(AtomicU64::new(0));
    let numbering = move |mut queue: OutboundQueue| async move {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!("#{n}: {}", String::from_utf8_lossy(&message.payload));
            responder.send(Ok(Some(message.reply(text))));
        }
        Ok(())
    };

    // The router: pull -> numbering (blocking) -> publish.
    let router = Router::builder()
        .outbound("publish", move |q| publish.run(q), None, Mode::NonBlocking)
        .outbound("numbering", numbering, Some("publish"), Mode::Blocking)
        .inbound(
            "pull",
            move |link| pull.run(link),
            "numbering",
            Mode::NonBlocking,
        )
        .start()?;
    println!("== a hand-built server: PULL {pull_address} -> numbering -> PUB {pub_address}");

    // A client from parts: SUB to its own id, then PUSH.
    let sub = Socket::new(Kind::Sub, &Options::default())?;
    sub.subscribe("client-1").await?;
    sub.connect(&pub_address).await?;
    let push = Socket::new(Kind::Push, &Options::default())?;
    push.connect(&pull_address).await?;
    // Raw PUB/SUB cannot tell when a subscription has reached the publisher (the slow-joiner
    // race); `rylm_components::Client` settles it with a handshake. Built from parts, wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for text in ["first", "second", "third"] {
        let message = Message::call("template.number", text).with_client("client-1");
        push.send(codec.encode_frames(&message)?).await?;
        let received = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .context("no answer")??;
        let answer = codec.decode_frames(received.get(1..).unwrap_or_default())?;
        println!(
            "sent {text:?} -> published {:?}",
            String::from_utf8_lossy(&answer.payload)
        );
    }
    router.shutdown().await?;
    Ok(())
}
