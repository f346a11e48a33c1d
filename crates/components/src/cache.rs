//! The cache: a key-value store served on REP, beside the router (a bypass part).
//!
//! A request is a message whose method is `set`, `get` or `delete` (any server part):
//! `set` stores the payload under the message's `cache` key (a new id when empty) and answers
//! the key; `get` and `delete` take the key as payload and answer the value. A missing key is
//! answered with an empty payload and the header `missing`; an unknown method with an error
//! reply. The cache never stops answering because of a bad request.

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

/// The store, shared by the server that owns it.
#[derive(Clone, Debug, Default)]
pub struct CacheStore {
    map: Arc<std::sync::Mutex<HashMap<String, Bytes>>>,
    raw_replies: bool,
}

impl CacheStore {
    /// Answers with the raw bytes (the key, or the value, empty when missing) rather than a
    /// message, as pylm's cache does for pylm peers.
    pub fn with_raw_replies(mut self) -> Self {
        self.raw_replies = true;
        self
    }

    /// Sets `key`.
    pub fn set(&self, key: &str, value: impl Into<Bytes>) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), value.into());
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Answers one cache request.
    pub fn answer(&self, request: &Message) -> Message {
        let key = String::from_utf8_lossy(&request.payload).into_owned();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let found = |value: Option<Bytes>| match value {
            Some(value) => request.reply(value),
            None => request.reply(Bytes::new()).with_header(MISSING, "true"),
        };
        match request.method() {
            Some("set") => {
                let key = if request.cache.is_empty() {
                    rylm_message::new_id()
                } else {
                    request.cache.clone()
                };
                map.insert(key.clone(), request.payload.clone());
                request.reply(Bytes::from(key))
            }
            Some("get") => found(map.get(&key).cloned()),
            Some("delete") => found(map.remove(&key)),
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
