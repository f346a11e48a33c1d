//! Servers chained into a pipeline, a Sink fed by two servers, and a Hub after a Server.

use std::time::Duration;

use bytes::Bytes;
use rylm_components::{Client, Functions, Master, Server, Worker};

const DEADLINE: Duration = Duration::from_secs(10);

fn upper() -> Functions {
    Functions::new().add("upper", |p: Bytes| async move {
        Ok::<_, String>(Bytes::from(p.to_ascii_uppercase()))
    })
}

fn exclaim() -> Functions {
    Functions::new().add("exclaim", |p: Bytes| async move {
        let mut v = p.to_vec();
        v.push(b'!');
        Ok::<_, String>(Bytes::from(v))
    })
}

#[tokio::test]
async fn a_server_and_a_pipeline_stage_run_a_list_of_stages() {
    let first = Server::builder("first")
        .functions(upper())
        .start()
        .await
        .expect("starts");
    let second = Server::pipeline("second", first.stream_address(), "first")
        .functions(exclaim())
        .start()
        .await
        .expect("starts");
    // The client pushes to the first server and takes results from the last.
    let client =
        Client::connect_with_results_from(first.db_address(), Some(second.db_address()), DEADLINE)
            .await
            .expect("connects through the chain");
    for i in 0..20 {
        let result = client
            .eval_stages(&["first.upper", "second.exclaim"], format!("hey {i}"))
            .await
            .expect("answered by the last stage");
        assert_eq!(result, Bytes::from(format!("HEY {i}!")));
    }
    second.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_sink_takes_the_streams_of_two_servers() {
    let left = Server::builder("left")
        .functions(upper())
        .start()
        .await
        .expect("starts");
    let right = Server::builder("right")
        .functions(upper())
        .start()
        .await
        .expect("starts");
    let sink = Server::sink("sink")
        .subscribe_to(left.stream_address(), &["left"])
        .subscribe_to(right.stream_address(), &["right"])
        .functions(exclaim())
        .start()
        .await
        .expect("starts");
    let via_left =
        Client::connect_with_results_from(left.db_address(), Some(sink.db_address()), DEADLINE)
            .await
            .expect("connects");
    let via_right =
        Client::connect_with_results_from(right.db_address(), Some(sink.db_address()), DEADLINE)
            .await
            .expect("connects");
    let a = via_left
        .eval_stages(&["left.upper", "sink.exclaim"], "from left")
        .await
        .expect("answered");
    let b = via_right
        .eval_stages(&["right.upper", "sink.exclaim"], "from right")
        .await
        .expect("answered");
    assert_eq!(&a[..], b"FROM LEFT!");
    assert_eq!(&b[..], b"FROM RIGHT!");
    sink.shutdown().await.expect("clean");
    left.shutdown().await.expect("clean");
    right.shutdown().await.expect("clean");
}

#[tokio::test]
async fn a_hub_farms_out_a_previous_servers_stream_to_workers() {
    let first = Server::builder("first")
        .functions(upper())
        .start()
        .await
        .expect("starts");
    let hub = Master::builder("hub")
        .subscribe_to(first.stream_address(), &["first"])
        .start()
        .await
        .expect("starts");
    let worker = Worker::builder(exclaim())
        .connect_via_cache(hub.db_address(), DEADLINE)
        .await
        .expect("connects");
    let client =
        Client::connect_with_results_from(first.db_address(), Some(hub.db_address()), DEADLINE)
            .await
            .expect("connects");
    let result = client
        .eval_stages(&["first.upper", "hub.exclaim"], "hub")
        .await
        .expect("answered");
    assert_eq!(&result[..], b"HUB!");
    worker.shutdown().await;
    hub.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}
