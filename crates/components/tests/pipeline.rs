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

/// A server `first` (upper) and a pipeline stage `second` (exclaim) after it.
async fn first_and_second() -> (Server, Server) {
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
    (first, second)
}

#[tokio::test]
async fn a_server_and_a_pipeline_stage_run_a_list_of_stages() {
    let (first, second) = first_and_second().await;
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

#[tokio::test]
async fn a_stream_feeding_two_stages_sends_each_message_to_the_stage_that_owns_it() {
    let (first, second) = first_and_second().await;
    let tag = Functions::new().add("tag", |p: Bytes| async move {
        Ok::<_, String>(Bytes::from(format!(
            "tagged {}",
            String::from_utf8_lossy(&p)
        )))
    });
    let other = Server::sink("other")
        .subscribe_to(first.stream_address(), &["first"])
        .functions(tag)
        .start()
        .await
        .expect("starts");
    let to_second =
        Client::connect_with_results_from(first.db_address(), Some(second.db_address()), DEADLINE)
            .await
            .expect("connects through the chain");
    let to_other =
        Client::connect_with_results_from(first.db_address(), Some(other.db_address()), DEADLINE)
            .await
            .expect("connects through the chain");
    for i in 0..20 {
        let a = to_second
            .eval_stages(&["first.upper", "second.exclaim"], format!("a{i}"))
            .await
            .expect("answered by second");
        assert_eq!(a, Bytes::from(format!("A{i}!")));
        let b = to_other
            .eval_stages(&["first.upper", "other.tag"], format!("b{i}"))
            .await
            .expect("answered by other");
        assert_eq!(b, Bytes::from(format!("tagged B{i}")));
    }
    other.shutdown().await.expect("clean");
    second.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}
