//! The router's behaviour: routes and feedback, many messages in flight, isolation of a stuck
//! route, backpressure, errors, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rylm_core_router::{Error, InboundLink, Mode, OutboundQueue, Router};
use rylm_message::Message;
use tokio::sync::{Barrier, mpsc};

const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("within the deadline")
}

/// A blocking component that appends `tag` to the payload, handling each message in a task.
fn tagger(
    tag: &'static str,
) -> impl FnOnce(
    OutboundQueue,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>> {
    move |mut queue: OutboundQueue| {
        Box::pin(async move {
            while let Some(delivery) = queue.recv().await {
                tokio::spawn(async move {
                    let (message, responder) = delivery.into_parts();
                    let mut payload = message.payload.to_vec();
                    payload.extend_from_slice(tag.as_bytes());
                    responder.send(Ok(Some(message.reply(payload))));
                });
            }
            Ok(())
        })
    }
}

/// A non-blocking component that forwards every message it gets.
fn collector(
    out: mpsc::UnboundedSender<Message>,
) -> impl FnOnce(
    OutboundQueue,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>> {
    move |mut queue: OutboundQueue| {
        Box::pin(async move {
            while let Some(delivery) = queue.recv().await {
                let (message, _) = delivery.into_parts();
                let _ = out.send(message);
            }
            Ok(())
        })
    }
}

/// An inbound component that hands its link to the test.
fn handing_out(
    links: mpsc::UnboundedSender<InboundLink>,
) -> impl FnOnce(
    InboundLink,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>> {
    move |mut link: InboundLink| {
        Box::pin(async move {
            let _ = links.send(link.clone());
            link.stopping().await;
            Ok(())
        })
    }
}

#[tokio::test]
async fn feedback_is_rerouted_to_any_depth_and_ends_at_the_collector() {
    let (out, mut collected) = mpsc::unbounded_channel();
    let (links, mut link) = mpsc::unbounded_channel();
    let router = Router::builder()
        .outbound("a", tagger("a"), Some("b"), Mode::Blocking)
        .outbound("b", tagger("b"), Some("c"), Mode::Blocking)
        .outbound("c", tagger("c"), Some("sink"), Mode::Blocking)
        .outbound("sink", collector(out), None, Mode::NonBlocking)
        .inbound("in", handing_out(links), "a", Mode::NonBlocking)
        .start()
        .expect("a valid table");
    let link = within(link.recv()).await.expect("a link");
    for i in 0..50 {
        assert_eq!(
            link.submit(Message::call("f", format!("{i}:"))).await,
            Ok(None)
        );
    }
    let mut payloads = Vec::new();
    for _ in 0..50 {
        let message = within(collected.recv()).await.expect("collected");
        payloads.push(String::from_utf8_lossy(&message.payload).into_owned());
    }
    payloads.sort_by_key(|p| p.split(':').next().and_then(|n| n.parse::<u32>().ok()));
    assert_eq!(payloads[0], "0:abc");
    assert_eq!(payloads[49], "49:abc");
    router.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_blocking_inbound_gets_the_feedback_of_the_last_blocking_component() {
    let (links, mut link) = mpsc::unbounded_channel();
    let router = Router::builder()
        .outbound("a", tagger("a"), Some("b"), Mode::Blocking)
        .outbound("b", tagger("b"), None, Mode::Blocking)
        .inbound("in", handing_out(links), "a", Mode::Blocking)
        .start()
        .expect("a valid table");
    let link = within(link.recv()).await.expect("a link");
    let feedback = link
        .submit(Message::call("f", "x").with_client("c1"))
        .await
        .expect("routed");
    let feedback = feedback.expect("feedback");
    assert_eq!(&feedback.payload[..], b"xab");
    assert_eq!(
        feedback.client, "c1",
        "the envelope travels with the feedback"
    );
    router.shutdown().await.expect("clean");
}

/// Fifty messages must be inside the component at once for any of them to be answered: a
/// router that handled one message at a time would never get there.
#[tokio::test]
async fn many_messages_are_in_flight_at_once() {
    const AT_ONCE: usize = 50;
    let barrier = Arc::new(Barrier::new(AT_ONCE));
    let gated = {
        let barrier = barrier.clone();
        move |mut queue: OutboundQueue| async move {
            while let Some(delivery) = queue.recv().await {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let (message, responder) = delivery.into_parts();
                    responder.send(Ok(Some(message)));
                });
            }
            Ok(())
        }
    };
    let (links, mut link) = mpsc::unbounded_channel();
    let router = Router::builder()
        .outbound("gated", gated, None, Mode::Blocking)
        .inbound("in", handing_out(links), "gated", Mode::Blocking)
        .start()
        .expect("a valid table");
    let link = within(link.recv()).await.expect("a link");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..AT_ONCE {
        let link = link.clone();
        calls.spawn(async move { link.submit(Message::call("f", format!("{i}"))).await });
    }
    let mut answered = 0;
    while let Some(done) = within(calls.join_next()).await {
        assert!(done.expect("task").expect("routed").is_some());
        answered += 1;
    }
    assert_eq!(answered, AT_ONCE);
    router.shutdown().await.expect("clean");
}

/// A component that never answers stalls only the messages routed to it.
#[tokio::test]
async fn a_stuck_route_does_not_stop_the_others() {
    let (held_sender, _held) = mpsc::unbounded_channel();
    let stuck = move |mut queue: OutboundQueue| async move {
        while let Some(delivery) = queue.recv().await {
            let _ = held_sender.send(delivery); // kept, never answered
        }
        Ok(())
    };
    let (links_a, mut link_a) = mpsc::unbounded_channel();
    let (links_b, mut link_b) = mpsc::unbounded_channel();
    let _router = Router::builder()
        .capacity(4)
        .outbound("stuck", stuck, None, Mode::Blocking)
        .outbound("fast", tagger("!"), None, Mode::Blocking)
        .inbound("to-stuck", handing_out(links_a), "stuck", Mode::Blocking)
        .inbound("to-fast", handing_out(links_b), "fast", Mode::Blocking)
        .start()
        .expect("a valid table");
    let (link_a, link_b) = (
        within(link_a.recv()).await.expect("a"),
        within(link_b.recv()).await.expect("b"),
    );
    for i in 0..20 {
        let link = link_a.clone();
        tokio::spawn(async move { link.submit(Message::call("f", format!("{i}"))).await });
    }
    for i in 0..100 {
        let feedback = within(link_b.submit(Message::call("f", format!("{i}")))).await;
        assert!(feedback.expect("routed").is_some());
    }
}

/// Queues are bounded: with nobody reading, submitting stops being accepted.
#[tokio::test]
async fn a_full_route_pushes_back() {
    let (never_read, _keep) = mpsc::unbounded_channel::<OutboundQueue>();
    let idle = move |queue: OutboundQueue| async move {
        let _ = never_read.send(queue); // alive, never read
        Ok(())
    };
    let (links, mut link) = mpsc::unbounded_channel();
    let _router = Router::builder()
        .capacity(4)
        .outbound("idle", idle, None, Mode::NonBlocking)
        .inbound("in", handing_out(links), "idle", Mode::NonBlocking)
        .start()
        .expect("a valid table");
    let link = within(link.recv()).await.expect("a link");
    let mut accepted = 0;
    for i in 0..100 {
        let submit = link.submit(Message::call("f", format!("{i}")));
        match tokio::time::timeout(Duration::from_millis(200), submit).await {
            Ok(Ok(None)) => accepted += 1,
            Ok(other) => panic!("{other:?}"),
            Err(_) => break, // backpressure: the caller waits
        }
    }
    // Four queued plus four travelling on their own, give or take the one being handed over.
    assert!(
        (4..=10).contains(&accepted),
        "accepted {accepted} before pushing back"
    );
}

#[tokio::test]
async fn errors_reach_the_submitter() {
    let failing = |mut queue: OutboundQueue| async move {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            if &message.payload[..] == b"drop" {
                drop(responder);
            } else {
                responder.send(Err(Error::Component {
                    component: "failing".into(),
                    reason: "no such function".into(),
                }));
            }
        }
        Ok(())
    };
    let (links, mut link) = mpsc::unbounded_channel();
    let router = Router::builder()
        .outbound("failing", failing, None, Mode::Blocking)
        .inbound("in", handing_out(links), "failing", Mode::Blocking)
        .start()
        .expect("a valid table");
    let link = within(link.recv()).await.expect("a link");
    match link.submit(Message::call("f", "x")).await {
        Err(Error::Component { reason, .. }) => assert_eq!(reason, "no such function"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        link.submit(Message::call("f", "drop")).await,
        Err(Error::NoFeedback("failing".into()))
    );
    router.shutdown().await.expect("clean");
    assert_eq!(
        link.submit(Message::call("f", "late")).await,
        Err(Error::Closed)
    );
}

/// Shutdown carries every accepted message to the end of its route before stopping.
#[tokio::test]
async fn shutdown_drains_what_was_accepted() {
    let (out, mut collected) = mpsc::unbounded_channel();
    let slow = |mut queue: OutboundQueue| async move {
        while let Some(delivery) = queue.recv().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let (message, responder) = delivery.into_parts();
                responder.send(Ok(Some(message)));
            });
        }
        Ok(())
    };
    let submitted = Arc::new(AtomicUsize::new(0));
    let source = {
        let submitted = submitted.clone();
        move |mut link: InboundLink| async move {
            for i in 0..200 {
                if link.is_stopping() {
                    break;
                }
                link.submit(Message::call("f", format!("{i}"))).await?;
                submitted.fetch_add(1, Ordering::SeqCst);
            }
            link.stopping().await;
            Ok(())
        }
    };
    let router = Router::builder()
        .outbound("slow", slow, Some("sink"), Mode::Blocking)
        .outbound("sink", collector(out), None, Mode::NonBlocking)
        .inbound("source", source, "slow", Mode::NonBlocking)
        .start()
        .expect("a valid table");
    tokio::time::sleep(Duration::from_millis(30)).await;
    within(router.shutdown()).await.expect("clean");
    let accepted = submitted.load(Ordering::SeqCst);
    let mut delivered = 0;
    while collected.try_recv().is_ok() {
        delivered += 1;
    }
    assert!(accepted > 0);
    assert_eq!(
        delivered, accepted,
        "every accepted message reached the end of its route"
    );
}

#[tokio::test]
async fn a_component_that_fails_is_reported_at_shutdown() {
    let broken = |_queue: OutboundQueue| async move {
        Err(Error::Component {
            component: "broken".into(),
            reason: "could not bind".into(),
        })
    };
    let router = Router::builder()
        .outbound("broken", broken, None, Mode::NonBlocking)
        .start()
        .expect("a valid table");
    match router.shutdown().await {
        Err(Error::ComponentStopped { component, reason }) => {
            assert_eq!(component, "broken");
            assert!(reason.contains("could not bind"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_shutdown_with_a_deadline_gives_up_on_a_component_that_never_answers() {
    let (held_sender, _held) = mpsc::unbounded_channel();
    let stuck = move |mut queue: OutboundQueue| async move {
        while let Some(delivery) = queue.recv().await {
            let _ = held_sender.send(delivery);
        }
        Ok(())
    };
    let source = |link: InboundLink| async move {
        link.submit(Message::call("f", "never answered")).await?;
        Ok(())
    };
    let router = Router::builder()
        .outbound("stuck", stuck, None, Mode::Blocking)
        .inbound("source", source, "stuck", Mode::NonBlocking)
        .start()
        .expect("a valid table");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let outcome = within(router.shutdown_within(Duration::from_millis(300))).await;
    assert!(
        matches!(outcome, Err(Error::ShutdownTimedOut(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_table_with_a_loop_is_refused_before_anything_starts() {
    let outcome = Router::builder()
        .outbound("a", tagger("a"), Some("b"), Mode::Blocking)
        .outbound("b", tagger("b"), Some("a"), Mode::Blocking)
        .start();
    assert!(matches!(outcome, Err(Error::RouteLoop(_))));
}

/// An inbound component that submits nothing and ends when told to stop.
async fn until_stopping(mut link: InboundLink) -> Result<(), Error> {
    link.stopping().await;
    Ok(())
}

#[tokio::test]
async fn a_component_that_ends_or_panics_while_running_is_reported() {
    let router = Router::builder()
        .outbound(
            "quits",
            |_queue: OutboundQueue| async move { Err(Error::ComponentGone("on purpose".into())) },
            None,
            Mode::NonBlocking,
        )
        .inbound("waits", until_stopping, "quits", Mode::NonBlocking)
        .start()
        .expect("starts");
    let what = within(router.died()).await;
    assert!(
        what.contains("quits") && what.contains("on purpose"),
        "{what}"
    );
    let _ = router.shutdown_within(DEADLINE).await;

    let router = Router::builder()
        .outbound(
            "panics",
            |_queue: OutboundQueue| async move {
                if DEADLINE > Duration::ZERO {
                    panic!("a bug");
                }
                Ok(())
            },
            None,
            Mode::NonBlocking,
        )
        .inbound("waits", until_stopping, "panics", Mode::NonBlocking)
        .start()
        .expect("starts");
    let what = within(router.died()).await;
    assert!(what.contains("panics") && what.contains("a bug"), "{what}");
    let _ = router.shutdown_within(DEADLINE).await;
}

#[tokio::test]
async fn a_graceful_shutdown_is_not_a_death() {
    let router = Router::builder()
        .outbound("tagger", tagger("!"), None, Mode::Blocking)
        .inbound("waits", until_stopping, "tagger", Mode::Blocking)
        .start()
        .expect("starts");
    let outcome = tokio::time::timeout(Duration::from_millis(200), router.died()).await;
    assert!(outcome.is_err(), "nothing died: {outcome:?}");
    router.shutdown().await.expect("clean");
}
