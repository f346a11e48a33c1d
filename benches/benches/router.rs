//! The in-process router alone: a message submitted by a blocking inbound component, answered
//! by a blocking outbound component, its feedback handed back; one at a time and 100 at once.
//!
//! The baseline is the bare mechanism underneath, measured in the same run: a bounded tokio
//! channel to a task that answers on a oneshot. Run with `cargo xtask bench router`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rylm_core_router::{Error, InboundLink, Mode, OutboundQueue, Router};
use rylm_message::Message;
use tokio::sync::{mpsc, oneshot};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a runtime: {e}"))
}

/// A router with one echoing blocking outbound component; returns a link to submit with.
fn echo_router(rt: &tokio::runtime::Runtime) -> (Router, InboundLink) {
    rt.block_on(async {
        let echo = |mut queue: OutboundQueue| async move {
            while let Some(delivery) = queue.recv().await {
                let (message, responder) = delivery.into_parts();
                responder.send(Ok(Some(message)));
            }
            Ok::<(), Error>(())
        };
        let (links, mut link) = mpsc::unbounded_channel();
        let inbound = move |mut link: InboundLink| async move {
            let _ = links.send(link.clone());
            link.stopping().await;
            Ok(())
        };
        let router = Router::builder()
            .outbound("echo", echo, None, Mode::Blocking)
            .inbound("in", inbound, "echo", Mode::Blocking)
            .start()
            .unwrap_or_else(|e| panic!("a router: {e}"));
        let link = link.recv().await.unwrap_or_else(|| panic!("a link"));
        (router, link)
    })
}

/// The baseline: a bounded channel to a task that answers on a oneshot.
fn bare_echo(rt: &tokio::runtime::Runtime) -> mpsc::Sender<(Message, oneshot::Sender<Message>)> {
    let (sender, mut receiver) = mpsc::channel::<(Message, oneshot::Sender<Message>)>(1024);
    rt.spawn(async move {
        while let Some((message, reply)) = receiver.recv().await {
            let _ = reply.send(message);
        }
    });
    sender
}

fn bench_router(c: &mut Criterion) {
    let rt = runtime();
    let (_router, link) = echo_router(&rt);
    let bare = bare_echo(&rt);
    let message = Message::call("server.echo", vec![0u8; 64]).with_client("client");

    let mut one = c.benchmark_group("round trip, one at a time");
    one.throughput(Throughput::Elements(1));
    one.bench_function("baseline: mpsc + oneshot", |b| {
        b.to_async(&rt).iter(|| async {
            let (reply, answer) = oneshot::channel();
            let _ = bare.send((message.clone(), reply)).await;
            black_box(answer.await.ok())
        })
    });
    one.bench_function("router: blocking inbound -> blocking outbound", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(link.submit(message.clone()).await) })
    });
    one.finish();

    let mut many = c.benchmark_group("round trips, 100 at once");
    many.throughput(Throughput::Elements(100));
    many.bench_function("baseline: mpsc + oneshot", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..100 {
                let (bare, message) = (bare.clone(), message.clone());
                calls.spawn(async move {
                    let (reply, answer) = oneshot::channel();
                    let _ = bare.send((message, reply)).await;
                    answer.await.ok()
                });
            }
            while let Some(done) = calls.join_next().await {
                let _ = black_box(done);
            }
        })
    });
    many.bench_function("router: blocking inbound -> blocking outbound", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..100 {
                let (link, message) = (link.clone(), message.clone());
                calls.spawn(async move { link.submit(message).await });
            }
            while let Some(done) = calls.join_next().await {
                let _ = black_box(done);
            }
        })
    });
    many.finish();
}

criterion_group!(benches, bench_router);
criterion_main!(benches);
