//! A broker restart, alone in its binary: it stops the broker's application, which would pull
//! the broker from under any test running beside it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{DEADLINE, rabbitmqctl, rabbitmqctl_output, serve_in_background, settings};
use rylm_syrpc::{Client, Handlers, Server};
use serde_json::{Value, json};

fn demo_handlers() -> Handlers {
    Handlers::new().on("echo", |data: Value| async move { Ok::<_, String>(data) })
}

/// A broker restart: the client and the server reconnect, and a request accepted before the
/// restart is answered after it: a persistent one (`put_request`) because the broker kept it,
/// a transient one (`call`, by default) because its waiting caller published it again.
#[tokio::test]
async fn requests_survive_a_broker_restart() {
    let Some(settings) = settings("restart") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("requests_survive_a_broker_restart") else {
        return;
    };
    let settings = settings.with_connect_timeouts(Duration::from_secs(10), None);
    let client = Client::connect(settings.clone()).await.expect("client");
    let server = Server::connect(settings.clone()).await.expect("server");

    // Accepted (confirmed by the broker) before the restart; nobody serves it yet.
    let before = client
        .put_request("echo", &"before the restart")
        .await
        .expect("put");
    let waiting = {
        let client = client.clone();
        let before = before.clone();
        tokio::spawn(async move {
            client
                .get_result(&before, Some(Duration::from_secs(60)))
                .await
        })
    };
    // A call, transient by default: the broker forgets its request with the restart.
    let calling = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("echo", &"called before", Some(Duration::from_secs(60)))
                .await
        })
    };
    // Both requests confirmed and queued (a call's confirm is not observable: wait until the
    // queue holds two messages).
    wait_for_queued(&ctl, &format!("{}_request", settings.app_name), 2).await;
    assert_eq!(client.stats().republished.load(Ordering::Relaxed), 0);

    rabbitmqctl(&ctl, &["stop_app"]).await;
    rabbitmqctl(&ctl, &["start_app"]).await;

    let (_stop, _serving) = serve_in_background(server, demo_handlers());
    let result = waiting
        .await
        .expect("task")
        .expect("answered after the restart");
    assert_eq!(result, json!("before the restart"));
    let called = calling
        .await
        .expect("task")
        .expect("the call is answered after the restart");
    assert_eq!(called, json!("called before"));
    assert!(
        client.stats().republished.load(Ordering::Relaxed) >= 1,
        "the call's request went with the restart and was published again"
    );
    // And new calls work on the new connections.
    assert_eq!(
        client
            .call("echo", &"after", Some(DEADLINE))
            .await
            .expect("after"),
        json!("after")
    );
}

/// Waits (bounded) until `queue` holds at least `count` messages, as `rabbitmqctl` counts.
async fn wait_for_queued(ctl: &str, queue: &str, count: u64) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let listed = rabbitmqctl_output(
            ctl,
            &["list_queues", "-q", "name", "messages"],
            Duration::from_secs(30),
        )
        .await;
        let queued = listed.ok().and_then(|text| {
            text.lines()
                .filter_map(|line| line.split_once('\t'))
                .find(|(name, _)| name.trim() == queue)
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        });
        if queued.is_some_and(|n| n >= count) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} never held {count} messages: {queued:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
