//! The ground every rylm crate stands on, at work on loopback.
//!
//! 1. Framed envelopes through a real ZeroMQ DEALER/ROUTER pair: the ROUTER answers each
//!    native message, and answers a frame in another protocol (pylm's) with a clear error
//!    instead of garbage.
//! 2. A JSON-encoded envelope stored in and read back from Redis.
//! 3. A native envelope through a RabbitMQ queue.
//!
//! Run it with `cargo xtask demo`, which starts private Redis and RabbitMQ servers and passes
//! their URLs in `RYLM_REDIS_URL` and `RYLM_AMQP_URL`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use rylm_message::{Codec, JsonCodec, Message, NativeCodec, PylmCodec, new_id};
use rylm_transport::{Kind, Options, Socket};

/// Every wait in this demo has this deadline.
const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    zeromq_round_trips().await.context("the ZeroMQ part")?;
    redis_round_trip().await.context("the Redis part")?;
    amqp_round_trip().await.context("the RabbitMQ part")?;
    println!("\nground: all three round trips done");
    Ok(())
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, future)
        .await
        .with_context(|| format!("{what} did not happen within {DEADLINE:?}"))
}

fn env_url(variable: &str) -> Result<String> {
    std::env::var(variable).with_context(|| {
        format!(
            "{variable} is not set: run this demo with `cargo xtask demo`, which starts the servers"
        )
    })
}

/// The ROUTER side: answer each native message with its payload in upper case; answer
/// anything else with an error message whose `error` header says what was wrong.
async fn serve(router: Socket, requests: usize) -> Result<()> {
    let codec = NativeCodec::default();
    for _ in 0..requests {
        let mut frames = within("a request", router.recv()).await??;
        if frames.is_empty() {
            continue;
        }
        let identity = frames.remove(0);
        let reply = match codec.decode_frames(&frames) {
            Ok(request) => request.reply(request.payload.to_ascii_uppercase()),
            Err(error) => Message::call("ground.error", "").with_header("error", error.to_string()),
        };
        let mut answer = vec![identity];
        answer.extend(codec.encode_frames(&reply)?);
        within("sending a reply", router.send(answer)).await??;
    }
    Ok(())
}

async fn zeromq_round_trips() -> Result<()> {
    println!("== 1. envelopes over a real ZeroMQ DEALER/ROUTER pair (tcp, loopback)");
    let router = Socket::new(Kind::Router, &Options::default())?;
    let endpoint = router.bind("tcp://127.0.0.1:0").await?;
    println!("ROUTER bound at {endpoint}");
    let texts = ["hello", "rylm", "messages"];
    let server = tokio::spawn(serve(router, texts.len() + 1));

    let dealer = Socket::new(Kind::Dealer, &Options::default())?;
    within("connecting", dealer.connect(&endpoint)).await??;
    let codec = NativeCodec::default();
    let client = new_id();
    for text in texts {
        let request = Message::call("ground.upper", text)
            .with_client(&client)
            .with_pipeline(new_id());
        let frames = codec.encode_frames(&request)?;
        let sizes: Vec<usize> = frames.iter().map(Bytes::len).collect();
        within("sending", dealer.send(frames)).await??;
        let reply = codec.decode_frames(&within("a reply", dealer.recv()).await??)?;
        if reply.pipeline != request.pipeline
            || &reply.payload[..] != text.to_ascii_uppercase().as_bytes()
        {
            bail!("unexpected reply {reply:?} to {request:?}");
        }
        println!(
            "sent {text:?} as frames of {sizes:?} bytes -> reply {:?} for the same stream",
            String::from_utf8_lossy(&reply.payload)
        );
    }

    // A peer in another protocol: one pylm PalmMessage frame.
    let foreign = PylmCodec::default().encode(&Message::call("ground.upper", "from pylm"))?;
    within("sending", dealer.send(vec![foreign])).await??;
    let reply = codec.decode_frames(&within("a reply", dealer.recv()).await??)?;
    let error = reply
        .header("error")
        .context("the answer to a foreign frame carries an error")?;
    println!("sent a pylm frame -> refused with: {error}");
    within("the ROUTER task", server).await???;
    Ok(())
}

async fn redis_round_trip() -> Result<()> {
    use fred::prelude::*;
    println!("\n== 2. a JSON envelope through the provisioned Redis");
    let url = env_url("RYLM_REDIS_URL")?;
    let client = Builder::from_config(Config::from_url(&url)?).build()?;
    within("connecting to Redis", client.init()).await??;
    let message = Message::call("ground.store", "kept in redis")
        .with_client(new_id())
        .with_header("content-type", "text/plain");
    let body = JsonCodec::default().encode(&message)?;
    let key = format!("rylm-ground-{}", new_id());
    let _: () = within(
        "SET",
        client.set(&key, body.to_vec(), Some(Expiration::EX(60)), None, false),
    )
    .await??;
    let stored: Option<Vec<u8>> = within("GET", client.get(&key)).await??;
    let stored = stored.context("the key was just set")?;
    let back = JsonCodec::default().decode(Bytes::from(stored))?;
    if back != message {
        bail!("Redis gave back another message: {back:?}");
    }
    println!(
        "{url}: SET {key} ({} bytes of JSON), GET -> the same message, payload {:?}",
        body.len(),
        String::from_utf8_lossy(&back.payload)
    );
    let _: i64 = within("DEL", client.del(&key)).await??;
    within("QUIT", client.quit()).await??;
    Ok(())
}

async fn amqp_round_trip() -> Result<()> {
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    println!("\n== 3. a native envelope through the provisioned RabbitMQ");
    let url = env_url("RYLM_AMQP_URL")?;
    let connection = within(
        "connecting to RabbitMQ",
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await??;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?;
    let message = Message::call("ground.queue", "through rabbitmq").with_client(new_id());
    let body = NativeCodec::default().encode(&message)?;
    let confirm = within(
        "the broker's confirm",
        channel
            .basic_publish(
                "".into(),
                queue.name().as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/x-rylm-msgpack".into()),
            )
            .await?,
    )
    .await??;
    if !confirm.is_ack() {
        bail!("the broker did not acknowledge the message");
    }
    let delivered = within("the delivery", async {
        loop {
            match channel
                .basic_get(
                    queue.name().as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await?
            {
                Some(got) => return anyhow::Ok(got),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await??;
    let back = NativeCodec::default().decode(Bytes::from(delivered.delivery.data))?;
    if back != message {
        bail!("RabbitMQ gave back another message: {back:?}");
    }
    println!(
        "{url}: published {} bytes to {} with a confirm, got back the same message, payload {:?}",
        body.len(),
        queue.name(),
        String::from_utf8_lossy(&back.payload)
    );
    connection.close(200, "done".into()).await?;
    Ok(())
}
