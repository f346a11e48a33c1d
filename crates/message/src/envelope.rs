//! The envelope itself: [`Message`] and [`Function`].

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A fresh random id (a UUID version 4 in its hyphenated form), as pylm uses for streams,
/// clients and cache keys.
///
/// ```
/// let id = rylm_message::new_id();
/// assert_eq!(id.len(), 36);
/// assert_ne!(id, rylm_message::new_id());
/// ```
pub fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// The function a message calls: one name, or a list of stages that run one after another.
///
/// Names have the form `server.method`; a worker looks only at the method part (see
/// [`Function::method_at`]). With [`Function::Stages`], [`Message::stage`] says which stage is
/// current, and a pipeline moves the message on with [`Message::next_stage`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    /// One function, the same at every stage.
    Single(String),
    /// A pipeline of functions, indexed by the message's stage.
    Stages(Vec<String>),
}

impl Default for Function {
    fn default() -> Self {
        Function::Single(String::new())
    }
}

impl Function {
    /// A pipeline of functions from any list of names.
    ///
    /// ```
    /// use rylm_message::Function;
    /// let f = Function::stages(["a.parse", "b.store"]);
    /// assert_eq!(f.at(1), Some("b.store"));
    /// assert_eq!(f.at(2), None);
    /// ```
    pub fn stages<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Function::Stages(names.into_iter().map(Into::into).collect())
    }

    /// The full name (`server.method`) of the function to call at `stage`, if there is one.
    pub fn at(&self, stage: u32) -> Option<&str> {
        match self {
            Function::Single(name) => Some(name.as_str()),
            Function::Stages(names) => names.get(usize::try_from(stage).ok()?).map(String::as_str),
        }
    }

    /// The method part of the name at `stage`: what follows the first `.`, or the whole name
    /// when it has no server part.
    ///
    /// ```
    /// use rylm_message::Function;
    /// assert_eq!(Function::from("server.echo").method_at(0), Some("echo"));
    /// assert_eq!(Function::from("echo").method_at(0), Some("echo"));
    /// ```
    pub fn method_at(&self, stage: u32) -> Option<&str> {
        let name = self.at(stage)?;
        Some(name.split_once('.').map_or(name, |(_, method)| method))
    }

    /// How many stages the function has (1 for a single name).
    pub fn len(&self) -> usize {
        match self {
            Function::Single(_) => 1,
            Function::Stages(names) => names.len(),
        }
    }

    /// True for an empty list of stages or an empty single name.
    pub fn is_empty(&self) -> bool {
        match self {
            Function::Single(name) => name.is_empty(),
            Function::Stages(names) => names.is_empty(),
        }
    }
}

impl From<&str> for Function {
    fn from(name: &str) -> Self {
        Function::Single(name.to_owned())
    }
}

impl From<String> for Function {
    fn from(name: String) -> Self {
        Function::Single(name)
    }
}

impl From<Vec<String>> for Function {
    fn from(names: Vec<String>) -> Self {
        Function::Stages(names)
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Function::Single(name) => f.write_str(name),
            Function::Stages(names) => f.write_str(&names.join(" ")),
        }
    }
}

// On the wire a single name is a string and a list of stages an array of strings.
impl Serialize for Function {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Function::Single(name) => serializer.serialize_str(name),
            Function::Stages(names) => names.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Function {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FunctionVisitor;

        impl<'de> Visitor<'de> for FunctionVisitor {
            type Value = Function;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a function name or a list of function names")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Function, E> {
                Ok(Function::Single(name.to_owned()))
            }

            fn visit_string<E: de::Error>(self, name: String) -> Result<Function, E> {
                Ok(Function::Single(name))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Function, A::Error> {
                // Never trust a length prefix from the wire for a pre-allocation.
                let mut names = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(Function::Stages(names))
            }
        }

        deserializer.deserialize_any(FunctionVisitor)
    }
}

/// The envelope every rylm part passes on.
///
/// Fields are public so that matching and updating are plain Rust; the builder methods make the
/// common cases one line:
///
/// ```
/// use rylm_message::Message;
///
/// let msg = Message::call("server.upper", "some text")
///     .with_client("client-7")
///     .with_header("content-type", "text/plain");
/// assert_eq!(msg.method(), Some("upper"));
/// assert_eq!(msg.header("content-type"), Some("text/plain"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The stream this message belongs to (pylm's `pipeline`): one id per client session.
    pub pipeline: String,
    /// The client that started the stream; also the topic its results are published on.
    pub client: String,
    /// The current stage, an index into [`Message::function`] when it is a list.
    pub stage: u32,
    /// What to call.
    pub function: Function,
    /// A cache key: the key a cache `set` stores under, or a per-message id set by inbound parts.
    pub cache: String,
    /// Free-form metadata: HTTP headers and query parameters, tracing context, error details.
    pub headers: BTreeMap<String, String>,
    /// The opaque payload. Cloning the message never copies it.
    pub payload: Bytes,
}

impl Message {
    /// A message that calls `function` with `payload`; every other field is empty.
    pub fn call(function: impl Into<Function>, payload: impl Into<Bytes>) -> Self {
        Message {
            function: function.into(),
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// Sets the stream id.
    pub fn with_pipeline(mut self, pipeline: impl Into<String>) -> Self {
        self.pipeline = pipeline.into();
        self
    }

    /// Sets the client id.
    pub fn with_client(mut self, client: impl Into<String>) -> Self {
        self.client = client.into();
        self
    }

    /// Sets the stage.
    pub fn with_stage(mut self, stage: u32) -> Self {
        self.stage = stage;
        self
    }

    /// Sets the cache key.
    pub fn with_cache(mut self, cache: impl Into<String>) -> Self {
        self.cache = cache.into();
        self
    }

    /// Sets one header, replacing an earlier value of the same name.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces the payload.
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The answer to this message: the same envelope with a new payload, as a worker sends back.
    pub fn reply(&self, payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..self.clone()
        }
    }

    /// The full name of the function to call at the current stage.
    pub fn function_name(&self) -> Option<&str> {
        self.function.at(self.stage)
    }

    /// The method part of the function to call at the current stage.
    pub fn method(&self) -> Option<&str> {
        self.function.method_at(self.stage)
    }

    /// The value of header `name`, if set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Moves the message to its next stage. Returns false, and leaves the stage as it is, when
    /// the current stage is the last one (or the stage counter would overflow).
    ///
    /// ```
    /// use rylm_message::{Function, Message};
    /// let mut msg = Message::call(Function::stages(["a.one", "b.two"]), "x");
    /// assert!(msg.next_stage());
    /// assert_eq!(msg.method(), Some("two"));
    /// assert!(!msg.next_stage());
    /// ```
    pub fn next_stage(&mut self) -> bool {
        let Some(next) = self.stage.checked_add(1) else {
            return false;
        };
        if usize::try_from(next).is_ok_and(|next| next < self.function.len()) {
            self.stage = next;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_function_is_the_same_at_every_stage() {
        let f = Function::from("s.m");
        assert_eq!(f.at(0), Some("s.m"));
        assert_eq!(f.at(3), Some("s.m"));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn method_strips_only_the_server_part() {
        let f = Function::from("srv.ns.method");
        assert_eq!(f.method_at(0), Some("ns.method"));
    }

    #[test]
    fn reply_keeps_the_envelope() {
        let msg = Message::call("s.m", "a")
            .with_pipeline("p")
            .with_client("c")
            .with_cache("k")
            .with_header("h", "v");
        let reply = msg.reply("b");
        assert_eq!(reply.pipeline, "p");
        assert_eq!(reply.client, "c");
        assert_eq!(reply.cache, "k");
        assert_eq!(reply.header("h"), Some("v"));
        assert_eq!(&reply.payload[..], b"b");
        assert_eq!(&msg.payload[..], b"a");
    }

    #[test]
    fn next_stage_stops_at_the_last_and_at_overflow() {
        let mut msg = Message::call("one", "").with_stage(0);
        assert!(!msg.next_stage());
        let mut msg = Message::call(Function::stages(["a", "b"]), "").with_stage(u32::MAX);
        assert!(!msg.next_stage());
        assert_eq!(msg.stage, u32::MAX);
    }

    #[test]
    fn ids_are_unique_uuids() {
        let a = new_id();
        assert!(uuid::Uuid::parse_str(&a).is_ok());
        assert_ne!(a, new_id());
    }
}
