//! The Master in pylm's layout: PalmMessage frames, a PUSH to the workers and a PULL from
//! them (`scatter` runs on the way in, `gather` on the way back), a raw-bytes cache with pylm's
//! preset keys, and a publisher that waits for pylm's late subscriptions.

use std::sync::Arc;
use std::time::Duration;

use rylm_core_router::{Mode, Router};
use rylm_message::Message;
use tokio::sync::watch;

use super::{Either, Master, MasterBuilder, default_topic};
use crate::Error;
use crate::cache::CacheStore;
use crate::discovery::advertised;
use crate::parts::{Emit, Endpoint, HeldPublisher, Listen};

impl MasterBuilder {
    pub(super) async fn start_pylm(self) -> Result<Master, Error> {
        let codec = self.codec.clone();
        let (stop, stopped) = watch::channel(false);
        // A Hub's input is the previous server's stream; a Master's, its clients' PUSH.
        let clients = match &self.previous {
            Some((endpoint, topics)) => {
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                Either::Sub(Listen::sub(endpoint, &topics, &self.transport, codec.clone()).await?)
            }
            None => {
                Either::Pull(Listen::pull(&self.clients, &self.transport, codec.clone()).await?)
            }
        };
        // A Master's clients all reach it directly: a subscription stays good until a new client
        // connection arrives (see `HeldPublisher`). A Hub's clients reach an earlier server.
        // pylm's hooks: `scatter` on the way to the workers, `gather` on the way back.
        let clients = match (clients, self.scatter.clone()) {
            (Either::Pull(listen), Some(scatter)) => {
                Either::Pull(listen.with_hook(scatter, "scatter"))
            }
            (Either::Sub(listen), Some(scatter)) => {
                Either::Sub(listen.with_hook(scatter, "scatter"))
            }
            (clients, None) => clients,
        };
        let (clients, connections) = match clients {
            Either::Pull(listen) => {
                let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
                (
                    Either::Pull(listen.count_connections(counter.clone())),
                    Some(counter),
                )
            }
            sub => (sub, None),
        };
        let to_workers = Emit::push(&self.workers, &self.transport, codec.clone()).await?;
        // Workers answer on the host they take work from, wherever that is.
        let beside = Endpoint::Bind(crate::beside(to_workers.address()));
        let mut from_workers = Listen::pull(&beside, &self.transport, codec.clone()).await?;
        if let Some(gather) = self.gather.clone() {
            from_workers = from_workers.with_hook(gather, "gather");
        }
        let name = self.name.clone();
        let hook = self.handle_stream.unwrap_or_else(|| {
            let name = name.clone();
            Arc::new(move |message: &Message| default_topic(&name, message))
        });
        let mut publish = HeldPublisher::xpub(
            &self.stream,
            Arc::new(move |message: &Message| vec![hook(message)]),
            &self.transport,
            codec.clone(),
            Duration::from_millis(50),
        )
        .await?;
        if let Some(counter) = connections {
            publish = publish.cleared_until_new_connection(counter);
        }
        let advertise = self.advertise.as_deref();
        let (pull_address, worker_push_address, worker_pull_address, pub_address) = (
            advertised(
                match &clients {
                    Either::Pull(listen) => listen.address(),
                    Either::Sub(listen) => listen.address(),
                },
                advertise,
            )?,
            advertised(to_workers.address(), advertise)?,
            advertised(from_workers.address(), advertise)?,
            advertised(publish.address(), advertise)?,
        );
        let store = CacheStore::default().with_raw_replies();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, codec, stopped)
            .await?;
        let db_address = advertised(&db_address, advertise)?;
        for (key, value) in [
            ("name", self.name.as_str()),
            ("pull_address", &pull_address),
            ("pub_address", &pub_address),
            ("worker_push_address", &worker_push_address),
            ("worker_pull_address", &worker_pull_address),
            ("db_address", &db_address),
        ] {
            store.preset(key, value.to_owned());
        }
        let router = Router::builder()
            .outbound(
                "workers",
                move |q| to_workers.run(q),
                None,
                Mode::NonBlocking,
            )
            .outbound("publish", move |q| publish.run(q), None, Mode::NonBlocking)
            .inbound(
                "clients",
                move |link| async move {
                    match clients {
                        Either::Pull(listen) => listen.run(link).await,
                        Either::Sub(listen) => listen.run(link).await,
                    }
                },
                "workers",
                Mode::NonBlocking,
            )
            .inbound(
                "from-workers",
                move |link| from_workers.run(link),
                "publish",
                Mode::NonBlocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %pull_address, %pub_address, %worker_push_address, %worker_pull_address, %db_address, "pylm-mode master started");
        Ok(Master {
            name: self.name,
            client_address: pull_address,
            stream_address: pub_address,
            worker_address: worker_push_address,
            db_address,
            router,
            stop,
            cache_task,
            status: Arc::default(),
        })
    }
}
