//! SyRPC's wire protocol as plain data: names, buckets, message bodies, settings. No I/O.

use std::fmt;
use std::hash::Hasher;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use siphasher::sip::SipHasher24;

use crate::Error;

/// The SipHash key every SyRPC implementation uses to pick a result queue.
pub const HASH_KEY: [u8; 16] = *b"EdaeYa6eesh3ahSh";
/// Content type of every SyRPC message.
pub const CONTENT_TYPE: &str = "application/json";
/// Content encoding of every SyRPC message.
pub const CONTENT_ENCODING: &str = "utf-8";

/// The id under which a result is published and fetched.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResultId(String);

impl ResultId {
    /// A fresh id (a UUID version 4), as the Python and JavaScript clients make.
    pub fn new() -> Self {
        ResultId(rylm_message::new_id())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ResultId {
    fn default() -> Self {
        ResultId::new()
    }
}

impl fmt::Display for ResultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for ResultId {
    fn from(id: String) -> Self {
        ResultId(id)
    }
}

impl From<&str> for ResultId {
    fn from(id: &str) -> Self {
        ResultId(id.to_owned())
    }
}

/// SipHash-2-4 of the id's UTF-8 bytes with [`HASH_KEY`].
pub fn siphash(result_id: &str) -> u64 {
    let mut hasher = SipHasher24::new_with_key(&HASH_KEY);
    // `write`, not `Hash::hash`: the latter appends a terminator byte the peers do not hash.
    hasher.write(result_id.as_bytes());
    hasher.finish()
}

/// The result queue (`0..num_queues`) that carries the result of `result_id`.
///
/// ```
/// assert_eq!(rylm_syrpc::protocol::bucket("huhu", 64), 34);
/// ```
pub fn bucket(result_id: &str, num_queues: u32) -> u32 {
    // The peers keep the low 31 bits (JavaScript's signed 32-bit view, made non-negative).
    let low = (siphash(result_id) & 0x7FFF_FFFF) as u32;
    low % num_queues.max(1)
}

/// What to do with a request once a server has taken it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Acknowledge after the result is published: a server that dies mid-request leaves the
    /// request to another server (at-least-once; a handler may run twice).
    #[default]
    AfterResult,
    /// Acknowledge on receipt, as the published implementations do: a server that dies
    /// mid-request loses it (at-most-once).
    OnReceipt,
}

/// The kind of the app's request and result queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QueueType {
    /// RabbitMQ's classic queues, as the published implementations declare them.
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type: quorum`), replicated over a RabbitMQ cluster: a request
    /// or result the broker confirmed survives the loss of a minority of the nodes. Every peer
    /// of the app must use them (the broker refuses to declare a queue again as another type),
    /// so the published peers cannot join such an app.
    Quorum,
}

impl QueueType {
    /// The name RabbitMQ gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Connection and protocol settings, with the published implementations' defaults.
///
/// ```
/// use std::time::Duration;
/// use rylm_syrpc::Settings;
///
/// let settings = Settings::new("billing", "amqp://guest:guest@127.0.0.1:5672/%2F")
///     .with_timeout(Some(Duration::from_secs(5)))
///     .with_prefetch(4);
/// assert_eq!(settings.request_exchange(), "billing_request");
/// assert_eq!(settings.result_queue(3), "billing_result_queue_3");
/// ```
#[derive(Clone)]
pub struct Settings {
    /// Every server with the same app name must serve the same request types.
    pub app_name: String,
    /// The broker, as an AMQP URI (`amqp://user:password@host:port/vhost`).
    pub url: String,
    /// Other nodes of the same broker (a cluster), tried in turn when the current one cannot
    /// be reached.
    pub fallback_urls: Vec<String>,
    /// The kind of the request and result queues; default classic.
    pub queue_type: QueueType,
    /// How long an unused result queue lives (`x-expires`); default 3 hours.
    pub ttl: Duration,
    /// How long a result waits in its queue (`x-message-ttl`); default 10 seconds.
    pub msg_ttl: Duration,
    /// How many result queues results are spread over; default 64.
    pub num_queues: u32,
    /// The default deadline of `get_result` (and of `call`); default 60 seconds. `None` waits
    /// until the result comes, however long.
    pub timeout: Option<Duration>,
    /// How many requests a server holds unacknowledged at once; default 1, so that idle
    /// servers share the work.
    pub prefetch: u16,
    /// When a server acknowledges a request.
    pub ack_mode: AckMode,
    /// A time to live for requests, so that a request whose caller gave up is dropped by the
    /// broker instead of running late. `None` (the default) keeps requests until served, as
    /// the published implementations do.
    pub request_ttl: Option<Duration>,
    /// How long the first connection may take before `connect` fails; default 10 seconds.
    pub connect_timeout: Duration,
    /// How long to keep trying to reconnect after the connection is lost; `None` (the
    /// default) keeps trying for as long as the client or server runs.
    pub reconnect_for: Option<Duration>,
    /// How long a publish may wait for the broker's confirm (a broker under a memory or disk
    /// alarm blocks publishers); default 30 seconds.
    pub confirm_timeout: Duration,
    /// How long a handler of [`crate::Server::serve`] may run; past it, the caller gets an
    /// `exception` result and the request is acknowledged. Default 5 minutes.
    pub handler_timeout: Duration,
    /// How long a client keeps a result meant for another caller before handing it back to
    /// the broker for others; default 1 second.
    pub hold_foreign_for: Duration,
    /// Whether `call` publishes its request (and so the server its result) persistent.
    /// Default `false`: transient, kept in the broker's memory, and the waiting caller
    /// publishes the request again whenever its connection is replaced, which covers what a
    /// broker restart loses. `put_request` is always persistent (whoever fetches the result
    /// may not be connected through the restart).
    pub persistent_calls: bool,
}

impl Settings {
    /// Settings for `app_name` on the broker at `url`, with every other value at its default.
    pub fn new(app_name: impl Into<String>, url: impl Into<String>) -> Self {
        Settings {
            app_name: app_name.into(),
            url: url.into(),
            fallback_urls: Vec::new(),
            queue_type: QueueType::Classic,
            ttl: Duration::from_secs(3 * 60 * 60),
            msg_ttl: Duration::from_secs(10),
            num_queues: 64,
            timeout: Some(Duration::from_secs(60)),
            prefetch: 1,
            ack_mode: AckMode::AfterResult,
            request_ttl: None,
            connect_timeout: Duration::from_secs(10),
            reconnect_for: None,
            confirm_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(300),
            hold_foreign_for: Duration::from_secs(1),
            persistent_calls: false,
        }
    }

    /// Settings from the fields the Python and JavaScript packages take (`amq_host`,
    /// `amq_virtualhost`, `amq_user`, `amq_password`); the port is AMQP's 5672 unless `host`
    /// names one (`host:port`). The user, the password and the virtual host are
    /// percent-encoded, so any character may appear in them.
    pub fn from_parts(
        app_name: &str,
        host: &str,
        virtualhost: &str,
        user: &str,
        password: &str,
    ) -> Self {
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:5672")
        };
        let encode = |part: &str| {
            percent_encoding::utf8_percent_encode(part, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        let (user, password, vhost) = (encode(user), encode(password), encode(virtualhost));
        Settings::new(app_name, format!("amqp://{user}:{password}@{host}/{vhost}"))
    }

    /// Sets several nodes of one broker cluster: the first is tried first, the others in turn
    /// whenever the current one cannot be reached. An empty list changes nothing.
    pub fn with_urls<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
        let mut urls = urls.into_iter().map(Into::into);
        if let Some(first) = urls.next() {
            self.url = first;
            self.fallback_urls = urls.collect();
        }
        self
    }

    /// Sets the kind of the request and result queues (every peer of the app must agree).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Every node to connect to, the first one first.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.fallback_urls.iter().map(String::as_str))
    }

    /// Sets the default deadline of `get_result`.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how many requests a server holds at once.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets when a server acknowledges a request.
    pub fn with_ack_mode(mut self, ack_mode: AckMode) -> Self {
        self.ack_mode = ack_mode;
        self
    }

    /// Sets the number of result queues.
    pub fn with_num_queues(mut self, num_queues: u32) -> Self {
        self.num_queues = num_queues;
        self
    }

    /// Sets the queue and message times to live.
    pub fn with_ttls(mut self, ttl: Duration, msg_ttl: Duration) -> Self {
        self.ttl = ttl;
        self.msg_ttl = msg_ttl;
        self
    }

    /// Sets a time to live for requests.
    pub fn with_request_ttl(mut self, request_ttl: Option<Duration>) -> Self {
        self.request_ttl = request_ttl;
        self
    }

    /// Sets whether `call` publishes persistent requests (see `persistent_calls`).
    pub fn with_persistent_calls(mut self, persistent: bool) -> Self {
        self.persistent_calls = persistent;
        self
    }

    /// Sets how long connecting may take, and how long reconnecting may go on (`None`: for as
    /// long as the client or server runs).
    pub fn with_connect_timeouts(
        mut self,
        connect_timeout: Duration,
        reconnect_for: Option<Duration>,
    ) -> Self {
        self.connect_timeout = connect_timeout;
        self.reconnect_for = reconnect_for;
        self
    }

    /// Sets how long a handler may run, and how long a publish may wait for its confirm.
    pub fn with_limits(mut self, handler_timeout: Duration, confirm_timeout: Duration) -> Self {
        self.handler_timeout = handler_timeout;
        self.confirm_timeout = confirm_timeout;
        self
    }

    /// Sets how long a client holds a result meant for another caller.
    pub fn with_hold_foreign_for(mut self, hold: Duration) -> Self {
        self.hold_foreign_for = hold;
        self
    }

    /// Checks the settings; every constructor of a client or server calls it.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |what: String| Err(Error::InvalidSettings(what));
        if self.app_name.is_empty() || self.app_name.contains(char::is_whitespace) {
            return invalid(format!(
                "app_name {:?} must be non-empty and without spaces",
                self.app_name
            ));
        }
        for url in self.urls() {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return invalid(format!(
                    "url {:?} is not an AMQP URI (amqp://user:password@host:port/vhost)",
                    redact(url)
                ));
            }
        }
        if self.num_queues == 0 {
            return invalid("num_queues must be at least 1".into());
        }
        if self.prefetch == 0 {
            return invalid("prefetch must be at least 1".into());
        }
        for (name, value) in [
            ("confirm_timeout", self.confirm_timeout),
            ("handler_timeout", self.handler_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{name} must be above zero"));
            }
        }
        for (name, value) in [("ttl", self.ttl), ("msg_ttl", self.msg_ttl)] {
            if millis_i32(value).is_none() || value.is_zero() {
                return invalid(format!(
                    "{name} must be between 1 ms and 2^31-1 ms, got {value:?}"
                ));
            }
        }
        Ok(())
    }

    /// `{app}_request`: the request exchange, queue and routing key.
    pub fn request_exchange(&self) -> String {
        format!("{}_request", self.app_name)
    }

    /// `{app}_result_exchange`.
    pub fn result_exchange(&self) -> String {
        format!("{}_result_exchange", self.app_name)
    }

    /// `{app}_result_queue_{i}`.
    pub fn result_queue(&self, bucket: u32) -> String {
        format!("{}_result_queue_{bucket}", self.app_name)
    }

    /// The bucket of `result_id` under these settings.
    pub fn bucket(&self, result_id: &str) -> u32 {
        bucket(result_id, self.num_queues)
    }

    /// The arguments of every result queue, in milliseconds, as AMQP type `I` (signed 32-bit)
    /// wants them: (`x-expires`, `x-message-ttl`). Redeclaring with other values is an error
    /// on the broker, so they must match the peers' exactly.
    pub fn result_queue_arguments(&self) -> (i32, i32) {
        (
            millis_i32(self.ttl).unwrap_or(i32::MAX),
            millis_i32(self.msg_ttl).unwrap_or(i32::MAX),
        )
    }
}

impl fmt::Debug for Settings {
    /// Every field, the URL's password replaced.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("app_name", &self.app_name)
            .field("url", &redact(&self.url))
            .field(
                "fallback_urls",
                &self
                    .fallback_urls
                    .iter()
                    .map(|u| redact(u))
                    .collect::<Vec<_>>(),
            )
            .field("queue_type", &self.queue_type)
            .field("ttl", &self.ttl)
            .field("msg_ttl", &self.msg_ttl)
            .field("num_queues", &self.num_queues)
            .field("timeout", &self.timeout)
            .field("prefetch", &self.prefetch)
            .field("ack_mode", &self.ack_mode)
            .field("request_ttl", &self.request_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_for", &self.reconnect_for)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("handler_timeout", &self.handler_timeout)
            .field("hold_foreign_for", &self.hold_foreign_for)
            .field("persistent_calls", &self.persistent_calls)
            .finish()
    }
}

fn millis_i32(value: Duration) -> Option<i32> {
    i32::try_from(value.as_millis()).ok()
}

/// The URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A request body: `{"result_id": ..., "type": ..., "data": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestBody {
    /// Where the result goes.
    pub result_id: ResultId,
    /// The request type: which function to run.
    #[serde(rename = "type")]
    pub type_: String,
    /// The argument, any JSON.
    #[serde(default)]
    pub data: Value,
}

/// A result body: `{"result_id": ..., "data": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultBody {
    /// The request this answers.
    pub result_id: ResultId,
    /// The result, any JSON; an object with an `exception` member is a remote error.
    #[serde(default)]
    pub data: Value,
}

/// Encodes a request; the type is trimmed of surrounding whitespace, as the peers do.
pub fn encode_request(result_id: &ResultId, type_: &str, data: &Value) -> Result<Vec<u8>, Error> {
    let body = RequestBody {
        result_id: result_id.clone(),
        type_: type_.trim().to_owned(),
        data: data.clone(),
    };
    serde_json::to_vec(&body).map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes a request body.
pub fn decode_request(body: &[u8]) -> Result<RequestBody, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Malformed {
        what: "request",
        reason: e.to_string(),
    })
}

/// Encodes a result.
pub fn encode_result(result_id: &ResultId, data: &Value) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&ResultBody {
        result_id: result_id.clone(),
        data: data.clone(),
    })
    .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes a result body.
pub fn decode_result(body: &[u8]) -> Result<ResultBody, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Malformed {
        what: "result",
        reason: e.to_string(),
    })
}

/// The remote error a result carries, if its data is an object with an `exception` member.
pub fn exception_of(data: &Value) -> Option<&Value> {
    data.as_object().and_then(|object| object.get("exception"))
}

/// The data of a result that reports `message` as a remote error.
pub fn exception(message: impl Into<String>) -> Value {
    serde_json::json!({ "exception": message.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's test vectors, shared by the Python and JavaScript implementations.
    #[test]
    fn siphash_and_buckets_match_the_peers() {
        assert_eq!(siphash("huhu"), 0x7b10c0dcecefb2e2);
        assert_eq!(siphash("fasel"), 0xbb6051a7bf9d7f99);
        assert_eq!(siphash("huhü"), 0xe42abc89685839b5);
        assert_eq!(siphash("THX™"), 0xb7b433ec33f28fb6);
        for (id, expected) in [
            ("huhu", 34),
            ("fasel", 25),
            ("huhü", 53),
            ("THX™", 54),
            ("foo-bar-baz", 28),
            ("fixed-result-id", 24),
        ] {
            assert_eq!(bucket(id, 64), expected, "bucket of {id}");
        }
    }

    #[test]
    fn names_and_queue_arguments() {
        let s = Settings::new("app", "amqp://guest:guest@127.0.0.1:5672/%2F");
        assert_eq!(s.request_exchange(), "app_request");
        assert_eq!(s.result_exchange(), "app_result_exchange");
        assert_eq!(s.result_queue(63), "app_result_queue_63");
        assert_eq!(s.result_queue_arguments(), (10_800_000, 10_000));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn settings_from_the_peers_fields() {
        let s = Settings::from_parts("a", "localhost", "/", "u", "p");
        assert_eq!(s.url, "amqp://u:p@localhost:5672/%2F");
        let s = Settings::from_parts("a", "10.0.0.1:5673", "prod", "u", "p");
        assert_eq!(s.url, "amqp://u:p@10.0.0.1:5673/prod");
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let base = Settings::new("app", "amqp://h/");
        for bad in [
            Settings {
                app_name: "a b".into(),
                ..base.clone()
            },
            Settings {
                url: "http://h/".into(),
                ..base.clone()
            },
            Settings {
                num_queues: 0,
                ..base.clone()
            },
            Settings {
                prefetch: 0,
                ..base.clone()
            },
            Settings {
                ttl: Duration::from_secs(30 * 24 * 3600),
                ..base.clone()
            },
        ] {
            let err = bad.validate().expect_err("refused");
            assert!(matches!(err, Error::InvalidSettings(_)), "{err}");
        }
    }

    #[test]
    fn bodies_round_trip_and_type_is_trimmed() {
        let id = ResultId::from("r-1");
        let body = encode_request(&id, "  echo ", &serde_json::json!({"v": "ü"})).expect("encodes");
        let back = decode_request(&body).expect("decodes");
        assert_eq!(back.type_, "echo");
        assert_eq!(back.result_id, id);
        assert_eq!(back.data["v"], "ü");
        let result = decode_result(&encode_result(&id, &exception("boom")).expect("encodes"))
            .expect("decodes");
        assert_eq!(exception_of(&result.data), Some(&Value::from("boom")));
        assert!(decode_request(b"{\"type\": 1}").is_err());
        assert!(decode_result(b"not json").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact("amqp://h/v"), "amqp://h/v");
        let settings = Settings::from_parts("a", "h", "/", "u", "p@ss:w/rd");
        let printed = format!("{settings:?}");
        assert!(
            !printed.contains("p@ss") && !printed.contains("p%40ss"),
            "{printed}"
        );
        assert!(printed.contains("u:***@h:5672"), "{printed}");
    }

    #[test]
    fn reserved_characters_in_credentials_are_percent_encoded() {
        let s = Settings::from_parts("a", "h", "/", "us er", "p%a/s?s#w@rd:");
        assert_eq!(s.url, "amqp://us%20er:p%25a%2Fs%3Fs%23w%40rd%3A@h:5672/%2F");
        let uri: lapin::uri::AMQPUri = s.url.parse().expect("lapin parses it");
        assert_eq!(uri.authority.userinfo.username, "us er");
        assert_eq!(uri.authority.userinfo.password, "p%a/s?s#w@rd:");
        assert_eq!(uri.vhost, "/");
    }
}
