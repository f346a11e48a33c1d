//! A long broker outage, alone in its binary: it stops the broker's application, which would
//! pull the broker from under any test running beside it.

mod common;

use std::time::{Duration, Instant};

use common::{end_stream, rabbitmqctl, serve_in_background, settings, steady_calls, wrong_answers};
use rylm_syrpc::{Client, Handlers, Server, Settings};
use serde_json::Value;

/// Longer than the 60 s after which servers used to give up for good.
const OUTAGE: Duration = Duration::from_secs(90);
/// Each call's deadline: it must outlast the outage.
const CALL_DEADLINE: Duration = Duration::from_secs(240);

/// The broker is down for 90 s under a steady stream of calls: the server and the client
/// reconnect by themselves (no reconnect limit is set, the default), and every call, made
/// before, during or after the outage, is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_second_outage_under_a_steady_stream_loses_nothing() {
    let Some(settings) = settings("outage") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("a_ninety_second_outage_under_a_steady_stream")
    else {
        return;
    };
    let settings = Settings::with_connect_timeouts(settings, Duration::from_secs(10), None)
        .with_timeout(Some(CALL_DEADLINE))
        .with_prefetch(8);
    let server = Server::connect(settings.clone()).await.expect("server");
    let (_stop, _serving) = serve_in_background(
        server,
        Handlers::new().on("echo", |data: Value| async move { Ok::<_, String>(data) }),
    );
    let client = Client::connect(settings).await.expect("client");

    // A call every 100 ms until a while after the broker is back.
    let (stop_stream, stream) =
        steady_calls(client.clone(), Duration::from_millis(100), CALL_DEADLINE);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let down = Instant::now();
    rabbitmqctl(&ctl, &["stop_app"]).await;
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    rabbitmqctl(&ctl, &["start_app"]).await;
    let up = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answers = end_stream(stop_stream, stream, CALL_DEADLINE).await;
    let failed = wrong_answers(&answers);
    // When the calls made before the broker was back were all answered, from `start_app`.
    let caught_up = answers
        .iter()
        .filter(|(_, _, started, _)| *started < up)
        .map(|(_, _, _, finished)| finished.saturating_duration_since(up))
        .max()
        .unwrap_or_default();
    eprintln!(
        "outage of {:?}: {} calls, {} failed; every call answered {caught_up:?} after start_app",
        up - down,
        answers.len(),
        failed.len(),
    );
    assert!(answers.len() > 900, "the stream ran: {}", answers.len());
    assert!(failed.is_empty(), "calls failed: {failed:?}");
}
