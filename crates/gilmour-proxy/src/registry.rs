//! The registered nodes: each node's handlers and whether they are subscribed, its status and
//! its token; registering (a node that registers again from the same host and port replaces
//! its old registration), adding and removing handlers, and forgetting a node for good.
//!
//! Every node's subscriptions are made on the proxy's one Gilmour [`Node`], so that a node
//! costs its handlers and a watchdog, not connections: two HTTP nodes serving one topic in one
//! group take turns behind one lock, as two Gilmour processes would share the work.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rylm_gilmour::node::{Node, Reply, Subscription};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::Error;
use crate::api::{Handler, Role, Status};
use crate::calls::NodeCall;
use crate::server::Shared;

/// At most this many ids of forgotten `dirty` nodes are remembered, to answer them 410.
const DIRTY_REMEMBERED: usize = 4096;

pub(crate) struct Live {
    pub(crate) handler: Handler,
    pub(crate) subscription: Option<Subscription>,
}

pub(crate) struct Inner {
    pub(crate) status: Status,
    pub(crate) failures: u32,
    pub(crate) refused: u32,
    pub(crate) slots: Vec<Live>,
    pub(crate) services: Vec<Live>,
}

impl Inner {
    /// The node's slots or services.
    pub(crate) fn list(&mut self, role: Role) -> &mut Vec<Live> {
        match role {
            Role::Slot => &mut self.slots,
            Role::Service => &mut self.services,
        }
    }
}

/// One registered node.
pub(crate) struct Entry {
    pub(crate) id: String,
    /// Its own token, for its own routes.
    pub(crate) token: String,
    pub(crate) host: IpAddr,
    pub(crate) port: u16,
    pub(crate) health_check: String,
    pub(crate) inner: tokio::sync::Mutex<Inner>,
    pub(crate) watchdog: Mutex<Option<tokio::task::AbortHandle>>,
    /// Calls to this node at once.
    pub(crate) calls: Arc<Semaphore>,
}

impl Entry {
    pub(crate) fn url(&self, path: &str) -> String {
        match self.host {
            IpAddr::V4(ip) => format!("http://{ip}:{}{path}", self.port),
            IpAddr::V6(ip) => format!("http://[{ip}]:{}{path}", self.port),
        }
    }

    pub(crate) async fn describe(&self, full: bool) -> Value {
        let inner = self.inner.lock().await;
        let mut out = serde_json::json!({
            "id": self.id,
            "host": self.host.to_string(),
            "port": self.port,
            "health_check": self.health_check,
            "status": inner.status,
        });
        if full {
            out["slots"] = handlers(&inner.slots);
            out["services"] = handlers(&inner.services);
        }
        out
    }
}

pub(crate) fn handlers(live: &[Live]) -> Value {
    Value::from(
        live.iter()
            .map(|l| serde_json::to_value(&l.handler).unwrap_or(Value::Null))
            .collect::<Vec<_>>(),
    )
}

/// The nodes, by id and by address, and the ids of recently forgotten dirty nodes.
#[derive(Default)]
pub(crate) struct Registry {
    by_id: HashMap<String, Arc<Entry>>,
    by_address: HashMap<(IpAddr, u16), String>,
    dirty: VecDeque<String>,
}

impl Registry {
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.by_id.get(id).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Entry>> {
        self.by_id.values().cloned().collect()
    }

    /// Whether `id` was a node forgotten because it went dirty.
    pub(crate) fn was_dirty(&self, id: &str) -> bool {
        self.dirty.iter().any(|d| d == id)
    }

    /// The node registered from `host` and `port`, if any.
    pub(crate) fn at(&self, host: IpAddr, port: u16) -> Option<Arc<Entry>> {
        self.by_address
            .get(&(host, port))
            .and_then(|id| self.by_id.get(id))
            .cloned()
    }

    /// Adds `entry`; gives back the node it replaces at the same address, if any.
    fn insert(&mut self, entry: Arc<Entry>) -> Option<Arc<Entry>> {
        let old = self
            .by_address
            .insert((entry.host, entry.port), entry.id.clone())
            .and_then(|id| self.by_id.remove(&id));
        self.by_id.insert(entry.id.clone(), entry);
        old
    }

    /// Forgets the node `id`; gives it back when it was there. The maps shrink when most of
    /// their room is unused, so that a proxy that once held many nodes does not keep their room.
    pub(crate) fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let entry = self.by_id.remove(id)?;
        if self.by_address.get(&(entry.host, entry.port)) == Some(&entry.id) {
            self.by_address.remove(&(entry.host, entry.port));
        }
        Some(entry)
    }

    /// Forgets a dirty node, remembering its id for a while.
    pub(crate) fn forget_dirty(&mut self, id: &str) -> Option<Arc<Entry>> {
        let entry = self.remove(id)?;
        if self.dirty.len() >= DIRTY_REMEMBERED {
            self.dirty.pop_front();
        }
        self.dirty.push_back(entry.id.clone());
        Some(entry)
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        locked(&self.registry)
    }
}

/// A new node's entry, nothing subscribed yet.
pub(crate) fn entry(
    shared: &Shared,
    host: IpAddr,
    port: u16,
    health_check: String,
    slots: Vec<Handler>,
    services: Vec<Handler>,
) -> Arc<Entry> {
    let unsubscribed = |handlers: Vec<Handler>| {
        handlers
            .into_iter()
            .map(|handler| Live {
                handler,
                subscription: None,
            })
            .collect()
    };
    Arc::new(Entry {
        id: uuid::Uuid::new_v4().to_string(),
        token: uuid::Uuid::new_v4().simple().to_string(),
        host,
        port,
        health_check,
        inner: tokio::sync::Mutex::new(Inner {
            status: Status::Ok,
            failures: 0,
            refused: 0,
            slots: unsubscribed(slots),
            services: unsubscribed(services),
        }),
        watchdog: Mutex::new(None),
        calls: Arc::new(Semaphore::new(shared.config.node_concurrency.max(1))),
    })
}

/// Puts a checked and subscribed node in the registry, retiring the one it replaces.
pub(crate) async fn admit(shared: &Arc<Shared>, entry: Arc<Entry>) {
    let old = shared.registry().insert(entry.clone());
    if let Some(old) = old {
        tracing::info!(old = %old.id, new = %entry.id, node = %entry.url(""), "a node registered again: the old registration is gone");
        retire(&shared.gilmour, &old).await;
    }
}

/// Removes a node's watchdog and subscriptions. Calls already made finish.
pub(crate) async fn retire(gilmour: &Node, entry: &Entry) {
    if let Some(watchdog) = locked(&entry.watchdog).take() {
        watchdog.abort();
    }
    let mut inner = entry.inner.lock().await;
    if let Err(error) = unsubscribe_all(gilmour, &mut inner).await {
        tracing::warn!(id = %entry.id, %error, "could not unsubscribe every handler of a node");
    }
}

pub(crate) async fn subscribe_all(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    inner: &mut Inner,
) -> Result<(), Error> {
    for (role, list) in [
        (Role::Slot, &mut inner.slots),
        (Role::Service, &mut inner.services),
    ] {
        for live in list.iter_mut().filter(|l| l.subscription.is_none()) {
            live.subscription = Some(subscribe(shared, entry, role, &live.handler).await?);
        }
    }
    Ok(())
}

/// Unsubscribes every handler; the handlers that could not be stay marked subscribed, and the
/// first failure is the answer.
pub(crate) async fn unsubscribe_all(gilmour: &Node, inner: &mut Inner) -> Result<(), Error> {
    let mut first = None;
    for live in inner.slots.iter_mut().chain(inner.services.iter_mut()) {
        if let Some(subscription) = live.subscription {
            match gilmour.remove(subscription).await {
                Ok(_) => live.subscription = None,
                Err(error) => {
                    first.get_or_insert(error);
                }
            }
        }
    }
    first.map_or(Ok(()), |error| Err(error.into()))
}

/// Subscribes one slot or service of a node: each request or signal becomes a POST to the
/// node's path.
pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    entry: &Arc<Entry>,
    role: Role,
    handler: &Handler,
) -> Result<Subscription, Error> {
    let call = Arc::new(NodeCall {
        http: shared.http.clone(),
        metrics: shared.metrics.clone(),
        url: entry.url(&handler.path),
        timeout: handler.timeout(),
        max: shared.config.max_body,
        kind: role.name(),
        calls: entry.calls.clone(),
    });
    let subscription = match role {
        Role::Service => {
            let group = handler.group.clone().unwrap_or_default();
            shared
                .gilmour
                .reply_to_with(&handler.topic, &group, call.timeout, move |incoming| {
                    let call = call.clone();
                    async move {
                        let step = call.run(incoming).await;
                        Reply {
                            data: step.data,
                            code: step.code,
                        }
                    }
                })
                .await?
        }
        Role::Slot => {
            shared
                .gilmour
                .slot_with(&handler.topic, handler.group.as_deref(), move |incoming| {
                    let call = call.clone();
                    async move {
                        // A slot's answer is ignored; its failures show in the metrics.
                        call.run(incoming).await;
                    }
                })
                .await?
        }
    };
    Ok(subscription)
}

/// Removes the handlers of a node on `topic` (and `path`, when given): whether there were any.
/// A handler whose unsubscription fails stays in the list, subscribed, and the failure is the
/// answer, so that success means that nothing of it still listens.
pub(crate) async fn remove(
    gilmour: &Node,
    entry: &Entry,
    role: Role,
    topic: &str,
    path: Option<&str>,
) -> Result<bool, Error> {
    let mut inner = entry.inner.lock().await;
    let list = inner.list(role);
    let (gone, kept): (Vec<Live>, Vec<Live>) = list
        .drain(..)
        .partition(|l| l.handler.topic == topic && path.is_none_or(|p| l.handler.path == p));
    *list = kept;
    let found = !gone.is_empty();
    let mut failure = None;
    for live in gone {
        if let Some(subscription) = live.subscription
            && let Err(error) = gilmour.remove(subscription).await
        {
            failure.get_or_insert(error);
            inner.list(role).push(live);
        }
    }
    failure.map_or(Ok(found), |error| Err(error.into()))
}
