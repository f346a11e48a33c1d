//! The Server in pylm's layout: PULL from clients, PUB of results under pylm's topics (held
//! until pylm's late subscriptions arrive), PalmMessage frames, a raw-bytes cache, and `b"0"`
//! for a failed function.

use std::sync::Arc;

use rylm_core_router::{Mode, Router};
use rylm_message::Message;
use tokio::sync::watch;

use super::{Server, ServerBuilder};
use crate::cache::CacheStore;
use crate::discovery::advertised;
use crate::parts::{HeldPublisher, Listen, TopicFn};
use crate::{Error, SYNC_FUNCTION};

impl ServerBuilder {
    pub(super) async fn start_pylm(self) -> Result<Server, Error> {
        let (stop, stopped) = watch::channel(false);
        // A client's handshake travels down a pipeline: each stage publishes it to the client
        // and under its own name, for the next stage.
        let (hook, name) = (self.handle_stream, self.name.clone());
        let topics: TopicFn = Arc::new(move |message: &Message| {
            let topic = hook(message);
            if message.function_name() == Some(SYNC_FUNCTION) && topic != name {
                vec![topic, name.clone()]
            } else {
                vec![topic]
            }
        });
        // pylm clients subscribe just before they send: hold their results until the
        // subscription arrives. When every client reaches this server directly, a subscription
        // stays good until a new client connection arrives (see `HeldPublisher`).
        let connections = (self.takes_requests && self.previous.is_empty())
            .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let grace = std::time::Duration::from_millis(50);
        let mut publish = HeldPublisher::xpub(
            &self.stream,
            topics,
            &self.transport,
            self.codec.clone(),
            grace,
        )
        .await?;
        if let Some(counter) = &connections {
            publish = publish.cleared_until_new_connection(counter.clone());
        }
        let pub_address = publish.address().to_owned();
        let mut builder = Router::builder().capacity(self.max_in_flight).outbound(
            "publish",
            move |queue| publish.run(queue),
            None,
            Mode::NonBlocking,
        );
        let mut pull_address = String::new();
        if self.takes_requests {
            let mut pull = Listen::pull(&self.clients, &self.transport, self.codec.clone()).await?;
            if let Some(counter) = &connections {
                pull = pull.count_connections(counter.clone());
            }
            pull_address = pull.address().to_owned();
            builder = builder.inbound(
                "clients",
                move |link| pull.run(link),
                "functions",
                Mode::NonBlocking,
            );
        }
        for (i, (endpoint, topics)) in self.previous.iter().enumerate() {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            let sub = Listen::sub(endpoint, &topics, &self.transport, self.codec.clone()).await?;
            builder = builder.inbound(
                &format!("previous-{i}"),
                move |link| sub.run(link),
                "functions",
                Mode::NonBlocking,
            );
        }
        let store = CacheStore::default()
            .with_limits(self.cache_limits.clone())
            .with_raw_replies();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, self.codec.clone(), stopped)
            .await?;
        let advertise = self.advertise.as_deref();
        let pull_address = if pull_address.is_empty() {
            pull_address
        } else {
            advertised(&pull_address, advertise)?
        };
        let pub_address = advertised(&pub_address, advertise)?;
        let db_address = advertised(&db_address, advertise)?;
        store.preset("name", self.name.clone());
        store.preset("pull_address", pull_address.clone());
        store.preset("pub_address", pub_address.clone());
        store.preset("db_address", db_address.clone());
        let functions = self.functions.failure_payload("0");
        let name = self.name.clone();
        let router = builder
            .outbound(
                "functions",
                move |queue| functions.run(name, queue),
                Some("publish"),
                Mode::Blocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %pull_address, %pub_address, %db_address, "pylm-mode server started");
        Ok(Server {
            name: self.name,
            client_address: pull_address,
            stream_address: pub_address,
            db_address,
            router,
            stop,
            cache_task,
            store,
            counters: Arc::default(),
        })
    }
}
