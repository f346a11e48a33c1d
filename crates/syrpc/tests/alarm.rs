//! A broker under a memory alarm, alone in its binary: the alarm blocks every publisher of the
//! broker, which would stall any test running beside it. The tests here take turns.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{DEADLINE, rabbitmqctl, serve_in_background, settings};
use rylm_syrpc::{Client, Error, Handlers, Server};
use serde_json::{Value, json};

/// One alarm at a time: the tests of this binary share the broker.
static ALARM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The broker's memory alarm, raised while this lives: dropped (a test's end, or its panic),
/// it clears the alarm, so that a failed test does not leave the shared broker blocked.
struct Alarm {
    ctl: String,
    raised: bool,
}

impl Alarm {
    async fn raise(ctl: &str) -> Alarm {
        rabbitmqctl(ctl, &["set_vm_memory_high_watermark", "absolute", "1"]).await;
        Alarm {
            ctl: ctl.to_owned(),
            raised: true,
        }
    }

    async fn clear(mut self) {
        rabbitmqctl(&self.ctl, &["set_vm_memory_high_watermark", "0.4"]).await;
        self.raised = false;
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if self.raised {
            let _ = std::process::Command::new(&self.ctl)
                .args(["set_vm_memory_high_watermark", "0.4"])
                .status();
        }
    }
}

/// With the broker's memory alarm raised, publishers are blocked: `put_request` fails with
/// its deadline instead of hanging, and works again once the alarm is cleared.
#[tokio::test]
async fn a_blocked_broker_fails_puts_at_their_deadline() {
    let _turn = ALARM.lock().await;
    let Some(settings) = settings("alarm") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("a_blocked_broker_fails_puts_at_their_deadline")
    else {
        return;
    };
    let limit = Duration::from_secs(2);
    let client = Client::connect(settings.with_timeout(Some(limit)))
        .await
        .expect("client");
    client
        .put_request("echo", &"before")
        .await
        .expect("put before the alarm");

    let alarm = Alarm::raise(&ctl).await;
    let started = Instant::now();
    let blocked = client.put_request("echo", &"during").await;
    let waited = started.elapsed();
    alarm.clear().await;
    assert!(
        matches!(blocked, Err(Error::PublishTimeout { .. })),
        "{blocked:?}"
    );
    assert!(waited < limit + Duration::from_secs(2), "waited {waited:?}");

    // The alarm cleared, the same client publishes again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match client.put_request("echo", &json!("after")).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("still blocked after the alarm: {error}"),
        }
    }
}

/// Settings for `test` whose publishes wait 2 s for a confirm within a 60 s deadline, and the
/// broker's `rabbitmqctl`; `None` when the broker is not provisioned.
fn unconfirmed_setup(test: &str) -> Option<(rylm_syrpc::Settings, String)> {
    let settings = settings(test)?
        .with_timeout(Some(Duration::from_secs(60)))
        .with_limits(Duration::from_secs(30), Duration::from_secs(2));
    Some((settings, rylm_testkit::rabbitmqctl(test)?))
}

/// Waits until `retried` counts a publish made again, while `publishing` (the task that
/// publishes) is still running, or fails the test after [`DEADLINE`].
async fn await_retry<T>(retried: impl Fn() -> u64, publishing: &tokio::task::JoinHandle<T>) {
    let retried_by = Instant::now() + DEADLINE;
    while retried() == 0 {
        assert!(
            Instant::now() < retried_by && !publishing.is_finished(),
            "no retry after the confirm timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A publish whose confirm does not come within `confirm_timeout` (here: the alarm holds it)
/// is made once more on a new channel within the call's deadline, so a broker that confirms
/// late, or a quorum queue that lost the first copy with its leader, does not fail the put.
/// The request is then served.
#[tokio::test]
async fn a_publish_unconfirmed_in_time_is_made_again_on_a_new_channel() {
    let _turn = ALARM.lock().await;
    let Some((settings, ctl)) =
        unconfirmed_setup("a_publish_unconfirmed_in_time_is_made_again_on_a_new_channel")
    else {
        return;
    };
    let client = Client::connect(settings.clone()).await.expect("client");

    let alarm = Alarm::raise(&ctl).await;
    let put = tokio::spawn({
        let client = client.clone();
        async move { client.put_request("echo", &"during").await }
    });
    await_retry(
        || client.stats().unconfirmed_retried.load(Ordering::Relaxed),
        &put,
    )
    .await;
    alarm.clear().await;
    let id = put
        .await
        .expect("the put task")
        .expect("the put succeeds on its second publish");
    assert_eq!(
        client.stats().unconfirmed_retried.load(Ordering::Relaxed),
        1
    );

    let server = Server::connect(settings).await.expect("server");
    let (_stop, _serving) = serve_in_background(
        server,
        Handlers::new().on("echo", |data: Value| async move { Ok::<_, String>(data) }),
    );
    assert_eq!(
        client
            .get_result(&id, Some(DEADLINE))
            .await
            .expect("the request is served"),
        json!("during")
    );
}

/// The same for a server's result: a handler finishes while the alarm blocks the broker, the
/// result's confirm does not come within `confirm_timeout`, and the server publishes it once
/// more on a new channel. Once the alarm is cleared, the caller gets the result and the
/// request is acknowledged (not taken again).
#[tokio::test]
async fn a_result_unconfirmed_in_time_is_made_again_on_a_new_channel() {
    let _turn = ALARM.lock().await;
    let Some((settings, ctl)) =
        unconfirmed_setup("a_result_unconfirmed_in_time_is_made_again_on_a_new_channel")
    else {
        return;
    };
    let client = Client::connect(settings.clone()).await.expect("client");
    let server = Server::connect(settings).await.expect("server");
    let id = client
        .put_request("echo", &"held")
        .await
        .expect("put before the alarm");
    let request = server
        .get_request(Some(DEADLINE))
        .await
        .expect("the server takes the request");

    let alarm = Alarm::raise(&ctl).await;
    let publish = tokio::spawn({
        let server = server.clone();
        async move { server.put_result(&request.result_id, &request.data).await }
    });
    await_retry(
        || {
            server
                .counters()
                .unconfirmed_retried
                .load(Ordering::Relaxed)
        },
        &publish,
    )
    .await;
    alarm.clear().await;
    publish
        .await
        .expect("the publishing task")
        .expect("the result is published on its second try");
    assert_eq!(
        server
            .counters()
            .unconfirmed_retried
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        client
            .get_result(&id, Some(DEADLINE))
            .await
            .expect("the caller gets the result"),
        json!("held")
    );
    let counters = server.counters();
    assert_eq!(counters.taken.load(Ordering::Relaxed), 1);
    assert_eq!(counters.publish_failed.load(Ordering::Relaxed), 0);
}
