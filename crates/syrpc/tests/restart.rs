//! A broker restart, alone in its binary: it stops the broker's application, which would pull
//! the broker from under any test running beside it.

mod common;

use std::time::Duration;

use common::{DEADLINE, rabbitmqctl, serve_in_background, settings};
use rylm_syrpc::{Client, Handlers, Server};
use serde_json::{Value, json};

fn demo_handlers() -> Handlers {
    Handlers::new().on("echo", |data: Value| async move { Ok::<_, String>(data) })
}

/// A broker restart: the client and the server reconnect, and a request accepted before the
/// restart is answered after it.
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
    tokio::time::sleep(Duration::from_millis(300)).await;

    rabbitmqctl(&ctl, &["stop_app"]).await;
    rabbitmqctl(&ctl, &["start_app"]).await;

    let (_stop, _serving) = serve_in_background(server, demo_handlers());
    let result = waiting
        .await
        .expect("task")
        .expect("answered after the restart");
    assert_eq!(result, json!("before the restart"));
    // And new calls work on the new connections.
    assert_eq!(
        client
            .call("echo", &"after", Some(DEADLINE))
            .await
            .expect("after"),
        json!("after")
    );
}
