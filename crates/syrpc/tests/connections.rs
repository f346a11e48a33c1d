//! Connections closed by the broker, alone in its binary: `close_all_connections` would close
//! the connections of any test running beside it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    DEADLINE, end_stream, rabbitmqctl, serve_in_background, settings, steady_calls, wrong_answers,
};
use rylm_syrpc::{Client, Handlers, Server};
use serde_json::Value;

/// How long each call's handler takes: calls are always in flight when the connections go.
const HANDLER: Duration = Duration::from_millis(300);

/// The broker closes every connection (as a network fault would) under a steady stream of
/// transient calls whose handlers take a while. Nothing is lost on the broker, so a call that
/// was in flight is published again (its caller's connection was replaced) while its first copy
/// is still queued or running: the server may answer it twice, and its caller still gets one
/// answer, its own, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_under_calls_in_flight_answer_each_call_once() {
    let Some(settings) = settings("closed") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("connections_closed_under_calls_in_flight") else {
        return;
    };
    let settings = settings
        .with_connect_timeouts(Duration::from_secs(10), None)
        .with_prefetch(32);
    let server = Server::connect(settings.clone()).await.expect("server");
    let counters = server.counters();
    let (_stop, _serving) = serve_in_background(
        server,
        Handlers::new().on("echo", |data: Value| async move {
            tokio::time::sleep(HANDLER).await;
            Ok::<_, String>(data)
        }),
    );
    let client = Client::connect(settings).await.expect("client");

    let (stop_stream, stream) = steady_calls(client.clone(), Duration::from_millis(20), DEADLINE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&ctl, &["close_all_connections", "closed by the test"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = end_stream(stop_stream, stream, DEADLINE).await;
    let failed = wrong_answers(&answers);
    let stats = client.stats();
    let republished = stats.republished.load(Ordering::Relaxed);
    let duplicates = stats.duplicates_dropped.load(Ordering::Relaxed);
    let answered = counters.answered.load(Ordering::Relaxed);
    eprintln!(
        "connections closed: {} calls, {} failed; {republished} published again, {answered} results published by the server, {duplicates} second copies dropped by the client",
        answers.len(),
        failed.len(),
    );
    assert!(answers.len() > 100, "the stream ran: {}", answers.len());
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert!(
        republished > 0,
        "calls were in flight when the connections closed, so some were published again"
    );
}
