//! The proxy's HTTP API as plain data: the bodies it reads, checked, with the message that
//! says what is wrong; the bodies it sends to a node; and how a node's HTTP answer becomes a
//! Gilmour reply. No I/O here.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use rylm_gilmour::compose;
use rylm_gilmour::protocol::{self, Step};

/// The handler timeout when a slot or service does not give one, in seconds.
pub const DEFAULT_HANDLER_TIMEOUT: f64 = 60.0;

/// What the proxy accepts from its nodes, past the checks of the protocol itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The steps of one composition, nested ones included. Default 1,000.
    pub max_steps: usize,
    /// The longest timeout a request, a composition step or a handler may ask for. Default
    /// one hour.
    pub max_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 1000,
            max_timeout: Duration::from_secs(3600),
        }
    }
}

/// Why a body is refused, and the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// 400 (malformed), 403 (a topic a node may not publish on), 422 (past a limit).
    pub status: u16,
    /// What is wrong.
    pub message: String,
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused {
            status: 400,
            message,
        }
    }
}

impl From<&str> for Refused {
    fn from(message: &str) -> Self {
        Refused::from(message.to_owned())
    }
}

fn too_long(what: &str, limits: &Limits) -> Refused {
    Refused {
        status: 422,
        message: format!(
            "{what} is longer than this proxy allows ({} s)",
            limits.max_timeout.as_secs()
        ),
    }
}

/// Refuses a topic a node may not publish on (see [`protocol::is_reserved`]).
fn publishable(topic: &str) -> Result<(), Refused> {
    if protocol::is_reserved(topic) {
        return Err(Refused {
            status: 403,
            message: format!(
                "{topic:?}: nodes may not publish on gilmour.response.* or gilmour.health.*"
            ),
        });
    }
    Ok(())
}

/// A node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It answers its health check; its subscriptions are live.
    Ok,
    /// Its health check failed: subscriptions removed until it answers again.
    Unavailable,
    /// Its listener cannot be reached: nothing more is done for it until it registers anew.
    Dirty,
}

/// A slot or a service of a node: a topic, its group, the path on the node that handles it,
/// and the seconds after which the proxy gives up on the handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handler {
    /// The topic (a slot's may be a wildcard).
    pub topic: String,
    /// The exclusion group (a service's is mandatory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The path on the node, from `/`.
    pub path: String,
    /// Seconds.
    pub timeout: f64,
}

impl Handler {
    /// The timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// Which of the two a [`Handler`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Heard signals; may be a wildcard, group optional.
    Slot,
    /// Answers requests; no wildcard, group mandatory.
    Service,
}

impl Role {
    /// `slot` or `service`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Slot => "slot",
            Role::Service => "service",
        }
    }
}

/// A `POST /nodes` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The port the node listens on.
    pub port: u16,
    /// The path of its health check.
    pub health_check: String,
    /// Its slots.
    pub slots: Vec<Handler>,
    /// Its services.
    pub services: Vec<Handler>,
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{what} is a JSON object"))
}

fn path_of(value: Option<&Value>, what: &str) -> Result<String, String> {
    match value.and_then(Value::as_str) {
        Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
            Ok(path.to_owned())
        }
        _ => Err(format!("{what} is a path on the node, such as \"/echo\"")),
    }
}

/// Reads a slot or a service.
pub fn handler(value: &Value, role: Role, limits: &Limits) -> Result<Handler, Refused> {
    let what = role.name();
    let map = object(value, what)?;
    let Some(topic) = map.get("topic").and_then(Value::as_str) else {
        return Err(format!("a {what} needs a \"topic\"").into());
    };
    match role {
        Role::Slot => protocol::slot_topic(topic),
        Role::Service => protocol::service_topic(topic),
    }
    .map_err(|e| e.to_string())?;
    let group = match map.get("group") {
        None | Some(Value::Null) => None,
        Some(Value::String(group)) if group.is_empty() => None,
        Some(Value::String(group)) => Some(group.clone()),
        Some(_) => return Err(format!("the {what}'s \"group\" is a string").into()),
    };
    if role == Role::Service && group.is_none() {
        return Err(Refused::from(format!(
            "the service {topic:?} needs a \"group\": services always answer in an exclusion group"
        )));
    }
    let path = path_of(map.get("path"), &format!("the {what}'s \"path\""))?;
    let timeout = match map.get("timeout") {
        None | Some(Value::Null) => DEFAULT_HANDLER_TIMEOUT,
        Some(seconds) => compose::seconds_of(seconds)
            .ok_or_else(|| format!("the {what}'s \"timeout\" is a positive number of seconds"))?
            .as_secs_f64(),
    };
    if timeout > limits.max_timeout.as_secs_f64() {
        return Err(too_long(&format!("the {what}'s \"timeout\""), limits));
    }
    Ok(Handler {
        topic: topic.to_owned(),
        group,
        path,
        timeout,
    })
}

/// Reads a `POST /nodes` body.
pub fn registration(value: &Value, limits: &Limits) -> Result<Registration, Refused> {
    let map = object(value, "a registration")?;
    let port = map
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or("a registration needs the node's \"port\", 1 to 65535")?;
    let health_check = match map.get("health_check") {
        None | Some(Value::Null) => "/health".to_owned(),
        given => path_of(given, "\"health_check\"")?,
    };
    let list = |name: &str, role: Role| -> Result<Vec<Handler>, Refused> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) if items.len() > limits.max_steps => Err(Refused {
                status: 422,
                message: format!("\"{name}\" has more than {} entries", limits.max_steps),
            }),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    handler(item, role, limits).map_err(|e| Refused {
                        status: e.status,
                        message: format!("{name}[{i}]: {}", e.message),
                    })
                })
                .collect(),
            Some(_) => Err(Refused::from(format!("\"{name}\" is a list"))),
        }
    };
    let slots = list("slots", Role::Slot)?;
    let services = list("services", Role::Service)?;
    for (i, service) in services.iter().enumerate() {
        if services[..i]
            .iter()
            .any(|s| s.topic == service.topic && s.group == service.group)
        {
            return Err(Refused::from(format!(
                "services[{i}]: {:?} is served twice in the same group",
                service.topic
            )));
        }
    }
    Ok(Registration {
        port,
        health_check,
        slots,
        services,
    })
}

/// What the node asks of `POST /request/:id`: one topic or a composition.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A request to one service.
    Topic(String),
    /// A composition, whose lambdas are paths on the node.
    Composition(compose::Composition<String>),
}

/// A `POST /request/:id` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// What to send to.
    pub target: Target,
    /// The data (`message`).
    pub message: Value,
    /// The deadline, when given.
    pub timeout: Option<Duration>,
}

/// Reads a `POST /request/:id` body: `{topic, message, timeout}` or
/// `{composition, message, timeout}`.
pub fn request(value: &Value, limits: &Limits) -> Result<Publish, Refused> {
    let map = object(value, "a request")?;
    let target = match (map.get("topic"), map.get("composition")) {
        (Some(topic), None) => {
            let topic = topic.as_str().ok_or("\"topic\" is a string")?;
            protocol::service_topic(topic).map_err(|e| e.to_string())?;
            publishable(topic)?;
            Target::Topic(topic.to_owned())
        }
        (None, Some(composition)) => {
            let composition = compose::from_json(composition)?;
            if composition.size() > limits.max_steps {
                return Err(Refused {
                    status: 422,
                    message: format!(
                        "the composition has {} steps; this proxy runs at most {}",
                        composition.size(),
                        limits.max_steps
                    ),
                });
            }
            for (topic, timeout) in composition.requests() {
                publishable(topic)?;
                if timeout.is_some_and(|t| t > limits.max_timeout) {
                    return Err(too_long(
                        &format!("the timeout of the step {topic:?}"),
                        limits,
                    ));
                }
            }
            Target::Composition(composition)
        }
        _ => return Err("a request has either a \"topic\" or a \"composition\"".into()),
    };
    let timeout = timeout_of(map)?;
    if timeout.is_some_and(|t| t > limits.max_timeout) {
        return Err(too_long("\"timeout\"", limits));
    }
    Ok(Publish {
        target,
        message: map.get("message").cloned().unwrap_or(Value::Null),
        timeout,
    })
}

/// Reads a `POST /signal/:id` body: `{topic, message}`; the topic and the data.
pub fn signal(value: &Value) -> Result<(String, Value), Refused> {
    let map = object(value, "a signal")?;
    let topic = map
        .get("topic")
        .and_then(Value::as_str)
        .ok_or("a signal needs a \"topic\"")?;
    protocol::service_topic(topic).map_err(|e| format!("signals go to one topic: {e}"))?;
    publishable(topic)?;
    Ok((
        topic.to_owned(),
        map.get("message").cloned().unwrap_or(Value::Null),
    ))
}

fn timeout_of(map: &Map<String, Value>) -> Result<Option<Duration>, String> {
    match map.get("timeout") {
        None | Some(Value::Null) => Ok(None),
        Some(seconds) => compose::seconds_of(seconds)
            .map(Some)
            .ok_or_else(|| "\"timeout\" is a positive number of seconds".to_owned()),
    }
}

/// The body the proxy POSTs to a node's handler (a lambda's topic is null).
pub fn call_body(topic: Option<&str>, sender: &str, data: &Value, timeout: Duration) -> Vec<u8> {
    let seconds = timeout.as_secs_f64();
    let timeout = if seconds.fract() == 0.0 {
        Value::from(timeout.as_secs())
    } else {
        Value::from(seconds)
    };
    serde_json::json!({
        "topic": topic,
        "sender": sender,
        "data": data,
        "timeout": timeout,
    })
    .to_string()
    .into_bytes()
}

/// A node's HTTP answer as a reply: a JSON body as JSON, anything else as a string; a 2xx is
/// 200, a 5xx is 500, another status is its code.
pub fn reply_of(status: u16, body: &[u8]) -> Step {
    let data = serde_json::from_slice::<Value>(body).unwrap_or_else(|_| {
        if body.is_empty() {
            Value::Null
        } else {
            Value::from(String::from_utf8_lossy(body).into_owned())
        }
    });
    let code = match status {
        200..=299 => protocol::OK,
        500..=599 => protocol::HANDLER_FAILED,
        other => i64::from(other),
    };
    Step { data, code }
}

/// The `{status}` body of control answers.
pub fn status_body(status: &str) -> Value {
    serde_json::json!({ "status": status })
}
