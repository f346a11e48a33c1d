//! The cache: a key-value store served on REP, beside the router (a bypass part).
//!
//! A request is a message whose method is `set`, `get` or `delete` (any server part):
//! `set` stores the payload under the message's `cache` key (a new id when empty) and answers
//! the key; `get` and `delete` take the key as payload and answer the value. A missing key is
//! answered with an empty payload and the header `missing`; an unknown method with an error
//! reply. The cache never stops answering because of a bad request.
//!
//! Keys a server presets ([`CacheStore::preset`]: its name and the addresses clients and
//! workers discover) are read-only to peers: a `set` or `delete` of one is refused
//! (`read-only`), so nobody can redirect a server's clients. What peers store is bounded
//! ([`CacheLimits`]): a value or key too large is refused (`too-large`), and a new key beyond the
//! count is refused (`cache-full`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rylm_message::{Codec, Message};
use rylm_transport::Kind;
use tokio::sync::watch;

use crate::Error;
use crate::parts::{Endpoint, Transport, error_reply};

/// The header set on the answer to a `get` or `delete` of a missing key.
pub const MISSING: &str = "missing";

/// The bounds of what peers store in a cache.
#[derive(Clone, Debug)]
pub struct CacheLimits {
    /// Keys stored by peers (default 10,000).
    pub max_entries: usize,
    /// Bytes of one value (default 1 MiB).
    pub max_value: usize,
    /// Bytes of one key (default 256).
    pub max_key: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_entries: 10_000,
            max_value: 1 << 20,
            max_key: 256,
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Bytes>,
    /// Preset by the server: peers may read them only.
    presets: std::collections::HashSet<String>,
}

/// The store, shared by the server that owns it.
#[derive(Clone, Debug, Default)]
pub struct CacheStore {
    entries: Arc<std::sync::Mutex<Entries>>,
    raw_replies: bool,
    limits: CacheLimits,
}

impl CacheStore {
    /// Answers with the raw bytes (the key, or the value, empty when missing) rather than a
    /// message, as pylm's cache does for pylm peers.
    pub fn with_raw_replies(mut self) -> Self {
        self.raw_replies = true;
        self
    }

    /// Bounds what peers store (default [`CacheLimits::default`]).
    pub fn with_limits(mut self, limits: CacheLimits) -> Self {
        self.limits = limits;
        self
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `key`, as a peer could.
    pub fn set(&self, key: &str, value: impl Into<Bytes>) {
        self.entries().map.insert(key.to_owned(), value.into());
    }

    /// Sets `key` for good: peers may read it, never change or delete it.
    pub fn preset(&self, key: &str, value: impl Into<Bytes>) {
        let mut entries = self.entries();
        entries.map.insert(key.to_owned(), value.into());
        entries.presets.insert(key.to_owned());
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.entries().map.get(key).cloned()
    }

    /// How many keys it holds (presets included).
    pub fn len(&self) -> usize {
        self.entries().map.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers one cache request.
    pub fn answer(&self, request: &Message) -> Message {
        let key = String::from_utf8_lossy(&request.payload).into_owned();
        let mut entries = self.entries();
        let found = |value: Option<Bytes>| match value {
            Some(value) => request.reply(value),
            None => request.reply(Bytes::new()).with_header(MISSING, "true"),
        };
        let read_only = |key: &str| {
            error_reply(
                request,
                "read-only",
                &format!("{key:?} is set by the server and cannot be changed"),
            )
        };
        match request.method() {
            Some("set") => {
                let key = if request.cache.is_empty() {
                    rylm_message::new_id()
                } else {
                    request.cache.clone()
                };
                if entries.presets.contains(&key) {
                    return read_only(&key);
                }
                if key.len() > self.limits.max_key || request.payload.len() > self.limits.max_value
                {
                    let text = format!(
                        "keys take up to {} bytes and values up to {}",
                        self.limits.max_key, self.limits.max_value
                    );
                    return error_reply(request, "too-large", &text);
                }
                let stored = entries.map.len() - entries.presets.len();
                if !entries.map.contains_key(&key) && stored >= self.limits.max_entries {
                    let text = format!("the cache holds {stored} keys, its most");
                    return error_reply(request, "cache-full", &text);
                }
                entries.map.insert(key.clone(), request.payload.clone());
                request.reply(Bytes::from(key))
            }
            Some("get") => found(entries.map.get(&key).cloned()),
            Some("delete") if entries.presets.contains(&key) => read_only(&key),
            Some("delete") => {
                let removed = entries.map.remove(&key);
                if self.raw_replies {
                    // pylm's cache answers a delete with the key, whether it was there or not.
                    request.reply(Bytes::from(key))
                } else {
                    found(removed)
                }
            }
            other => error_reply(
                request,
                "unknown-function",
                &format!("the cache answers set, get and delete, not {other:?}"),
            ),
        }
    }

    /// Serves the store on a REP socket until `stop` turns true.
    pub async fn serve(
        self,
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(String, tokio::task::JoinHandle<()>), Error> {
        let (socket, address) = transport.open(Kind::Rep, endpoint).await?;
        let served = address.clone();
        let task = tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = stop.changed() => break,
                    received = socket.recv() => received,
                };
                let received = match received {
                    Ok(received) => received,
                    Err(error) if error.is_closed() => return,
                    Err(_) => continue,
                };
                let reply = match codec.decode_frames(&received) {
                    Ok(request) => self.answer(&request),
                    Err(error) => error_reply(&Message::default(), "malformed", &error.to_string()),
                };
                let frames = if self.raw_replies {
                    vec![reply.payload]
                } else {
                    let Ok(frames) = codec.encode_frames(&reply) else {
                        continue;
                    };
                    frames
                };
                if let Err(error) = socket.send(frames).await {
                    tracing::warn!(address = %served, %error, "could not answer a cache request");
                }
            }
            socket.close().await;
        });
        Ok((address, task))
    }
}
