//! Following a Sentinel failover. fred finds the primary through the sentinels when it
//! connects, but a primary that is demoted (`SENTINEL FAILOVER`, or a failover that finds the
//! old primary still running) keeps its connections: the node would go on publishing to a
//! replica. As the Redis documentation asks of clients, the node listens to the sentinels'
//! `+switch-master` announcements and, when its service moves, reconnects both of its
//! connections, which then ask the sentinels again; the subscriber subscribes again to
//! everything it had. Commands refused `READONLY` in the meantime make fred reconnect too.

use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::prelude::*;
use fred::types::config::{Server, ServerConfig};

/// Listens to the sentinels at `hosts` (the first that answers, then the next on failure) and
/// reconnects `commands` and `subscriber` whenever `service` changes primary. Runs as long as
/// the node.
pub(crate) async fn follow(
    hosts: Vec<Server>,
    service: String,
    commands: Client,
    subscriber: SubscriberClient,
    delay: Duration,
) {
    let mut next = 0;
    loop {
        let Some(host) = hosts.get(next % hosts.len().max(1)).cloned() else {
            return;
        };
        next += 1;
        if let Err(error) = listen(&host, &service, &commands, &subscriber).await {
            tracing::warn!(sentinel = %host, %error, "lost the sentinel; trying the next one");
        }
        tokio::time::sleep(delay.max(Duration::from_millis(50))).await;
    }
}

/// Follows one sentinel until its connection fails.
async fn listen(
    host: &Server,
    service: &str,
    commands: &Client,
    subscriber: &SubscriberClient,
) -> Result<(), fred::error::Error> {
    let config = Config {
        server: ServerConfig::Centralized {
            server: host.clone(),
        },
        ..Config::default()
    };
    let sentinel = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(5))
        .build_subscriber_client()?;
    let connection = sentinel.init().await?;
    let mut announcements = sentinel.message_rx();
    let outcome = async {
        sentinel.subscribe("+switch-master").await?;
        loop {
            let message = match announcements.recv().await {
                Ok(message) => message,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(fred::error::Error::new(
                        fred::error::ErrorKind::IO,
                        "the sentinel connection closed",
                    ));
                }
            };
            // `<service> <old ip> <old port> <new ip> <new port>`
            let text = message.value.as_string().unwrap_or_default();
            if text.split(' ').next() != Some(service) {
                continue;
            }
            tracing::info!(%text, "the primary moved; reconnecting to the new one");
            for reconnected in [
                commands.force_reconnection().await,
                subscriber.force_reconnection().await,
            ] {
                if let Err(error) = reconnected {
                    tracing::warn!(%error, "could not reconnect after a failover");
                }
            }
        }
    }
    .await;
    let _ = sentinel.quit().await;
    connection.abort();
    outcome
}
