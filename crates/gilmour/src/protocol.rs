//! Gilmour's wire protocol as plain data: channel and key names, the JSON envelope, codes, and
//! the response of a composition. Nothing here does I/O; the engines and the proxy build on it.
//! The rules are those of the Go and Ruby engines (gilmour-e-go v5, the Ruby gem 0.4.7); where
//! they disagree, or where one of them has a defect, each item says what rylm does.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// What every Gilmour channel and key starts with.
pub const PREFIX: &str = "gilmour.";
/// The hash of live nodes: field the node's ident, value `"true"` (Go) or `"active"` (Ruby).
pub const HEALTH_HASH: &str = "gilmour.known_host.health";
/// Where error records are published (Ruby and the health monitors read this one).
pub const ERROR_CHANNEL: &str = "gilmour.error";
/// The Go engine's error channel, which a node may mirror its records to.
pub const GO_ERROR_CHANNEL: &str = "gilmour.errors";
/// How long an exclusion lock lives, in seconds; it is left to expire.
pub const LOCK_SECONDS: u64 = 600;
/// The group of a service registered without one.
pub const DEFAULT_GROUP: &str = "_default";
/// The group of a node's health responder.
pub const HEALTH_GROUP: &str = "exclusive";
/// The code of a reply.
pub const OK: i64 = 200;
/// The code when nobody subscribes to a request's topic.
pub const NOT_FOUND: i64 = 404;
/// The code of a handler's failure or panic.
pub const HANDLER_FAILED: i64 = 500;
/// The code of a timeout, on either side (Ruby's responder says 504; rylm follows Go).
pub const TIMED_OUT: i64 = 499;
/// The code of a request refused because the node's queue is full.
pub const BUSY: i64 = 503;
/// The data of a timeout.
pub const TIMED_OUT_DATA: &str = "Execution timed out";

/// `topic` with the `gilmour.` prefix and `kind` (`request`, `slot`), unless it already starts
/// with `gilmour.`: that is how a client requests `gilmour.health.<ident>` directly.
fn channel(kind: &str, topic: &str) -> String {
    if topic.starts_with(PREFIX) {
        topic.to_owned()
    } else {
        format!("{PREFIX}{kind}.{topic}")
    }
}

/// The channel a request to `topic` is published on.
pub fn request_channel(topic: &str) -> String {
    channel("request", topic)
}

/// The channel a signal on `topic` is published on (a pattern when `topic` has a wildcard).
pub fn slot_channel(topic: &str) -> String {
    channel("slot", topic)
}

/// The one-shot channel the reply to the request sent by `sender` comes back on.
pub fn response_channel(sender: &str) -> String {
    format!("{PREFIX}response.{sender}")
}

/// The length of every sender rylm makes: a uuid's text, as the Go engine's senders are.
pub const SENDER_LEN: usize = 36;
/// The length of a node's prefix in its shared senders: the first two groups of a uuid.
pub const NODE_PREFIX_LEN: usize = 13;

/// The prefix of a node's shared senders, taken from a fresh uuid: `xxxxxxxx-xxxx`.
pub fn node_prefix(uuid: &str) -> String {
    uuid.chars().take(NODE_PREFIX_LEN).collect()
}

/// The sender of one request of the node whose prefix is `prefix` when its replies share one
/// pattern subscription: the prefix, then the rest of `fresh`, a new random uuid. The sender is
/// shaped like a uuid (36 characters, as every sender rylm makes), so that a lock key, the
/// sender and the group with no separator, cannot be read two ways; and it cannot be guessed
/// from the node's earlier senders, so that no other node can answer in its place.
pub fn shared_sender(prefix: &str, fresh: &str) -> String {
    let rest: String = fresh.chars().skip(NODE_PREFIX_LEN).collect();
    format!("{prefix}{rest}")
}

/// The pattern that receives the replies to every request of the node whose prefix is
/// `prefix`, whose senders are [`shared_sender`]s: `gilmour.response.<prefix>-*`.
pub fn shared_response_pattern(prefix: &str) -> String {
    response_channel(&format!("{prefix}-*"))
}

/// Whether `topic` names a channel that only the protocol itself publishes on: the replies
/// (`gilmour.response.*`) and the health pings (`gilmour.health.*`). A proxy refuses them from
/// its nodes, so that no node can answer in another's place.
pub fn is_reserved(topic: &str) -> bool {
    topic.starts_with("gilmour.response.") || topic.starts_with("gilmour.health.")
}

/// The channel a node answers health pings on.
pub fn health_channel(ident: &str) -> String {
    format!("{PREFIX}health.{ident}")
}

/// The exclusion lock for one message in one group: sender and group, no separator, as the
/// engines make it. rylm's senders are all [`SENDER_LEN`] long, so its keys cannot collide.
pub fn lock_key(sender: &str, group: &str) -> String {
    format!("{sender}{group}")
}

/// Whether `topic` is a Redis glob pattern (subscribed with PSUBSCRIBE).
pub fn is_pattern(topic: &str) -> bool {
    topic.contains(['*', '?', '['])
}

/// Checks a topic a service is registered under: not empty, and no wildcard (services answer
/// one topic; only slots take patterns).
pub fn service_topic(topic: &str) -> Result<&str, Error> {
    if topic.is_empty() {
        return Err(Error::EmptyTopic);
    }
    if is_pattern(topic) {
        return Err(Error::WildcardService(topic.to_owned()));
    }
    Ok(topic)
}

/// Checks a slot's topic: not empty (patterns are welcome).
pub fn slot_topic(topic: &str) -> Result<&str, Error> {
    if topic.is_empty() {
        return Err(Error::EmptyTopic);
    }
    Ok(topic)
}

/// The topic a message came for, from the channel it came on (the inverse of
/// [`request_channel`] and [`slot_channel`]; other `gilmour.` channels come back whole).
pub fn topic_of(channel: &str) -> &str {
    for kind in ["gilmour.request.", "gilmour.slot."] {
        if let Some(topic) = channel.strip_prefix(kind) {
            return topic;
        }
    }
    channel
}

/// Redis's glob match (`*`, `?`, `[abc]`, `[^a-z]`, `\` escapes), as PSUBSCRIBE applies it:
/// `*` matches dots too. Used to dispatch a pattern message to the slots whose pattern it
/// matched.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob(pattern.as_bytes(), text.as_bytes())
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: its position in the pattern, and in the text.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class(pattern, p, text[t]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(p + 2),
            Some(c) => (*c == text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((sp, st))) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

/// Matches `c` against the class opening at `pattern[open]`; the position after the class when
/// it matches. An unclosed class matches nothing.
fn class(pattern: &[u8], open: usize, c: u8) -> Option<usize> {
    let mut i = open + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while let Some(&b) = pattern.get(i) {
        if b == b']' && !first {
            return (matched != negate).then_some(i + 1);
        }
        first = false;
        let (low, next) = if b == b'\\' {
            (*pattern.get(i + 1)?, i + 2)
        } else {
            (b, i + 1)
        };
        if pattern.get(next) == Some(&b'-') && pattern.get(next + 1).is_some_and(|e| *e != b']') {
            let high = pattern[next + 1];
            let (low, high) = if low <= high {
                (low, high)
            } else {
                (high, low)
            };
            matched |= (low..=high).contains(&c);
            i = next + 2;
        } else {
            matched |= low == c;
            i = next;
        }
    }
    None
}

/// The JSON object every PUBLISH carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Any JSON.
    #[serde(default)]
    pub data: Value,
    /// Go requests say 200, Ruby's 0; replies carry their status. Absent or null is `None`.
    #[serde(default)]
    pub code: Option<i64>,
    /// A fresh id per request or signal (Go a uuid, Ruby 32 hex digits); ignored on replies.
    #[serde(default)]
    pub sender: String,
    /// W3C trace context of the sender's span: rylm's extra field (written only when set; the
    /// Go and Ruby engines decode envelopes into the three fields above and ignore others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Envelope {
    /// A request or signal from `sender`, with Go's code 200.
    pub fn request(data: Value, sender: impl Into<String>) -> Self {
        Envelope {
            data,
            code: Some(OK),
            sender: sender.into(),
            traceparent: None,
        }
    }

    /// A reply to the request sent by `sender`. A code of 0 (a handler that set none) is 200;
    /// the sender field is the response channel, as Go writes it.
    pub fn reply(data: Value, code: i64, sender: &str) -> Self {
        Envelope {
            data,
            code: Some(if code == 0 { OK } else { code }),
            sender: response_channel(sender),
            traceparent: None,
        }
    }

    /// The timeout reply (code 499).
    pub fn timed_out(sender: &str) -> Self {
        Envelope::reply(Value::from(TIMED_OUT_DATA), TIMED_OUT, sender)
    }

    /// The code, with none read as 200.
    pub fn code(&self) -> i64 {
        match self.code {
            None | Some(0) => OK,
            Some(code) => code,
        }
    }

    /// Whether this is a failure: code 300 or above.
    pub fn failed(&self) -> bool {
        is_failure(self.code())
    }

    /// The bytes to PUBLISH.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of a Value, an integer and a string always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload as the engines do, never failing: a JSON object is an envelope (missing
    /// fields empty); anything else, JSON or not, is the data of an envelope without a sender,
    /// as Ruby takes a payload that is not JSON.
    pub fn decode(payload: &[u8]) -> Self {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map))
                if map.contains_key("data")
                    || map.contains_key("code")
                    || map.contains_key("sender") =>
            {
                serde_json::from_value::<Envelope>(Value::Object(map.clone())).unwrap_or_else(
                    |_| Envelope {
                        data: map.get("data").cloned().unwrap_or(Value::Null),
                        code: map.get("code").and_then(Value::as_i64),
                        sender: map
                            .get("sender")
                            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_owned))
                            .unwrap_or_default(),
                        traceparent: map
                            .get("traceparent")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    },
                )
            }
            Ok(value) => Envelope {
                data: value,
                code: None,
                sender: String::new(),
                traceparent: None,
            },
            Err(_) => Envelope {
                data: Value::from(String::from_utf8_lossy(payload).into_owned()),
                code: None,
                sender: String::new(),
                traceparent: None,
            },
        }
    }
}

/// Whether `code` is a failure (300 or above).
pub fn is_failure(code: i64) -> bool {
    code >= 300
}

/// One response inside a composition's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The step's data.
    pub data: Value,
    /// The step's code.
    pub code: i64,
}

/// The answer of a composition: every response kept, the highest code, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Composed {
    /// The responses, in the order the composition kept them.
    pub messages: Vec<Step>,
    /// The highest code among them (200 when there are none).
    pub code: i64,
    /// `messages.len()`.
    pub length: usize,
}

impl Composed {
    /// The answer made of `messages`.
    pub fn of(messages: Vec<Step>) -> Self {
        let code = messages.iter().map(|m| m.code).max().unwrap_or(OK);
        let length = messages.len();
        Composed {
            messages,
            code,
            length,
        }
    }

    /// What the next step of a `pipe` gets: one message's data as it is, several messages'
    /// datas as one array.
    pub fn as_input(&self) -> Value {
        match self.messages.as_slice() {
            [one] => one.data.clone(),
            many => Value::Array(many.iter().map(|m| m.data.clone()).collect()),
        }
    }
}

/// A step's input for a request with a map to merge: the incoming data's keys, then the step's
/// (which win). Data that is not an object is replaced by the step's map only when it is null.
pub fn merge(input: &Value, with: &serde_json::Map<String, Value>) -> Value {
    match input {
        Value::Object(map) => {
            let mut merged = map.clone();
            merged.extend(with.iter().map(|(k, v)| (k.clone(), v.clone())));
            Value::Object(merged)
        }
        Value::Null => Value::Object(with.clone()),
        other => other.clone(),
    }
}

/// An error record, published in an envelope on [`ERROR_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// The topic of the failed request.
    pub topic: String,
    /// The request's data.
    pub request_data: Value,
    /// What the handler answered.
    pub userdata: Value,
    /// The request's sender.
    pub sender: String,
    /// Always false (the engines' field).
    pub multi_process: bool,
    /// When, in RFC 3339.
    pub timestamp: String,
    /// A backtrace, when there is one.
    pub backtrace: Value,
    /// The reply's code.
    pub code: i64,
}

impl ErrorRecord {
    /// The record of a reply with a failing `code` to the request `request` made on `topic`, at
    /// `now` (time since the Unix epoch).
    pub fn of(topic: &str, request: &Envelope, reply: &Envelope, now: std::time::Duration) -> Self {
        ErrorRecord {
            topic: topic.to_owned(),
            request_data: request.data.clone(),
            userdata: reply.data.clone(),
            sender: request.sender.clone(),
            multi_process: false,
            timestamp: rfc3339(now),
            backtrace: Value::Null,
            code: reply.code(),
        }
    }

    /// The envelope it is published in: the record as data, the reply's code, the request's
    /// sender.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            data: serde_json::to_value(self).unwrap_or(Value::Null),
            code: Some(self.code),
            sender: self.sender.clone(),
            traceparent: None,
        }
    }
}

/// `since_epoch` as an RFC 3339 UTC timestamp with milliseconds: `2026-11-22T06:30:00.123Z`.
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let seconds = since_epoch.as_secs();
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let of_day = seconds % 86_400;
    // Days to a civil date (the proleptic Gregorian calendar), in 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_millis()
    )
}
