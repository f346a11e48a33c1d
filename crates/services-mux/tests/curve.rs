//! A service behind CURVE: callers with an allowed key call it; a caller with an unknown key,
//! or with none, never reaches a handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rylm_services_mux::{Call, ClientConfig, Method, Service, ServiceClient, ServiceResponse};
use rylm_transport::{Keypair, Options, Security};

fn caller(transport: Options) -> ServiceClient {
    ServiceClient::with_config(ClientConfig {
        heartbeat_interval: Duration::from_millis(100),
        transport,
        ..ClientConfig::default()
    })
}

#[tokio::test]
async fn only_callers_with_allowed_keys_reach_a_handler() {
    let (server, friend, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handle = Service::new("curved", "secret")
        .route(r"^/hello$", Method::Get, move |_| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                ServiceResponse::new(200, "hello")
            }
        })
        .expect("route")
        .with_transport(Options::default().security(Security::CurveServer {
            keypair: server.clone(),
            allowed: Some(vec![friend.public]),
        }))
        .serve("tcp://127.0.0.1:0")
        .await
        .expect("serves");

    let as_client = |keys: &Keypair| {
        Options::default().security(Security::CurveClient {
            keypair: keys.clone(),
            server: server.public,
        })
    };
    for intruder in [caller(as_client(&stranger)), caller(Options::default())] {
        intruder.register("curved", &[handle.address()], "secret");
        let outcome = intruder
            .call(
                "curved",
                Call::new("/hello").method(Method::Get),
                Some(Duration::from_secs(1)),
            )
            .await;
        assert!(outcome.is_err(), "an intruder was answered: {outcome:?}");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "an intruder reached the handler"
    );

    let friendly = caller(as_client(&friend));
    friendly.register("curved", &[handle.address()], "secret");
    let reply = friendly
        .call(
            "curved",
            Call::new("/hello").method(Method::Get),
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("the allowed caller is answered");
    assert_eq!(reply.response.status, 200);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    handle.shutdown().await;
}
