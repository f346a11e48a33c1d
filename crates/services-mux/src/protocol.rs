//! The native wire protocol as plain data: methods, requests and responses, frames, MACs and
//! the replay guard. No sockets, no clock (times are passed in).
//!
//! A frame is a ZeroMQ multipart message after the routing identity:
//!
//! | frame | content |
//! |---|---|
//! | 1 | the marker `RYLM-SVC` and the protocol version (1) |
//! | 2 | the kind, one byte: `Q` request, `R` response, `P` ping, `O` pong, `D` discover, `L` route list, `X` refusal |
//! | 3 | the body, MessagePack with named fields |
//! | 4 | HMAC-SHA256 keyed by the shared secret (absent on `X`), see below |
//!
//! The secret never travels. The MAC covers the kind, the body and, for requests and responses,
//! a [`Binding`]: the service's name and the id of the instance, which changes at every start
//! and which a caller learns from the instance's pong. So a captured request is refused by
//! another instance and by the same one after a restart (its MAC does not match), and within
//! one instance's life its id and timestamp are checked by the [`ReplayGuard`]. The MAC is
//! checked over the raw bytes before anything of the body is parsed: an unauthenticated frame
//! costs its bytes and one pass that looks for its id, nothing more. A refusal (`X`) cannot
//! carry a valid MAC (the caller's secret is the wrong one), so a caller accepts it only for a
//! call it is waiting on, and it can only fail that call.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, Bytes};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::Error;

/// The start of every services-mux message: `RYLM-SVC` and the wire version.
pub const MARKER: &[u8] = b"RYLM-SVC\x02";
/// What every version's marker starts with.
const MARKER_NAME: &[u8] = b"RYLM-SVC";
/// The length of the HMAC-SHA256 that ends every message but a refusal.
const MAC_LEN: usize = 32;
/// The largest body a peer accepts: 16 MiB.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request, caller to service.
    Request,
    /// A response, service to caller.
    Response,
    /// A heartbeat, caller to service.
    Ping,
    /// The answer to a heartbeat.
    Pong,
    /// A request for the service's routes.
    Discover,
    /// The service's routes.
    Routes,
    /// A refusal (401): the frame could not be authenticated or was replayed. Not MAC'd.
    Refusal,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Request => b'Q',
            Kind::Response => b'R',
            Kind::Ping => b'P',
            Kind::Pong => b'O',
            Kind::Discover => b'D',
            Kind::Routes => b'L',
            Kind::Refusal => b'X',
        }
    }

    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            b'Q' => Kind::Request,
            b'R' => Kind::Response,
            b'P' => Kind::Ping,
            b'O' => Kind::Pong,
            b'D' => Kind::Discover,
            b'L' => Kind::Routes,
            b'X' => Kind::Refusal,
            _ => return None,
        })
    }
}

/// The eight methods of Brubeck services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `get`
    Get,
    /// `post`
    Post,
    /// `put`
    Put,
    /// `delete`
    Delete,
    /// `options`
    Options,
    /// `connect`
    Connect,
    /// `response`: what a service's answer carries.
    Response,
    /// `request`: the default method of a call.
    Request,
}

impl Method {
    /// Every method, in a fixed order.
    pub const ALL: [Method; 8] = [
        Method::Get,
        Method::Post,
        Method::Put,
        Method::Delete,
        Method::Options,
        Method::Connect,
        Method::Response,
        Method::Request,
    ];

    /// The lower-case name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
            Method::Options => "options",
            Method::Connect => "connect",
            Method::Response => "response",
            Method::Request => "request",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(name: &str) -> Result<Method, Error> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::UnknownMethod(name.to_owned()))
    }
}

/// A request on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRequest {
    /// Correlates the response; also the replay nonce.
    pub id: String,
    /// When the caller sent it, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The path the service routes on.
    pub path: String,
    /// The method, lower case.
    pub method: String,
    /// Named arguments (a JSON object).
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body, opaque bytes.
    #[serde(default, with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A response on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireResponse {
    /// The request's id.
    pub id: String,
    /// When the service sent it, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The request's path.
    pub path: String,
    /// HTTP-like status code.
    pub status: u16,
    /// The status message.
    pub status_msg: String,
    /// Headers; `METHOD` is `response`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The payload the handler built (a JSON object).
    #[serde(default)]
    pub payload: Map<String, Value>,
}

/// A [`WireRequest`] of borrowed fields, for writing.
#[derive(Serialize)]
pub(crate) struct RequestView<'a> {
    pub id: &'a str,
    pub ts: u64,
    pub path: &'a str,
    pub method: &'a str,
    pub arguments: &'a Map<String, Value>,
    pub headers: &'a BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    pub body: &'a [u8],
}

/// A [`WireResponse`] of borrowed fields, for writing; its headers gain `METHOD: response`.
#[derive(Serialize)]
pub(crate) struct ResponseView<'a> {
    pub id: &'a str,
    pub ts: u64,
    pub path: &'a str,
    pub status: u16,
    pub status_msg: &'a str,
    pub headers: WithMethod<'a>,
    pub payload: &'a Map<String, Value>,
}

/// Headers written with `METHOD` set to `response`, in key order like the map they come from.
pub(crate) struct WithMethod<'a>(pub &'a BTreeMap<String, String>);

impl Serialize for WithMethod<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        const KEY: &str = "METHOD";
        const VALUE: &str = "response";
        let len = self.0.len() + usize::from(!self.0.contains_key(KEY));
        let mut map = serializer.serialize_map(Some(len))?;
        let mut written = false;
        for (key, value) in self.0 {
            if !written && key.as_str() >= KEY {
                map.serialize_entry(KEY, VALUE)?;
                written = true;
            }
            if key != KEY {
                map.serialize_entry(key, value)?;
            }
        }
        if !written {
            map.serialize_entry(KEY, VALUE)?;
        }
        map.end()
    }
}

/// A heartbeat or its answer, a discovery request, or a refusal.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WireControl {
    /// A nonce (the call id for a refusal).
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
    /// For a refusal: why.
    #[serde(default)]
    pub reason: String,
    /// For a pong: the service's name, to which requests are bound.
    #[serde(default)]
    pub service: String,
    /// For a pong: the instance's id (new at every start), to which requests are bound.
    #[serde(default)]
    pub instance: String,
}

/// What a request's or response's MAC covers beyond the frame: the service's name and the
/// instance's id. Control frames (pings, pongs, discovery) are not bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The service's name, as the instance reports it.
    pub service: String,
    /// The instance's id, new at every start.
    pub instance: String,
}

/// One route as discovery lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The path pattern (a regular expression).
    pub pattern: String,
    /// The methods it serves.
    pub methods: Vec<String>,
}

/// The answer to a discovery request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRoutes {
    /// The discovery request's id.
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
    /// The service's name.
    pub service: String,
    /// Its routes, in matching order.
    pub routes: Vec<RouteInfo>,
}

/// A decoded, authenticated frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A request.
    Request(WireRequest),
    /// A response.
    Response(WireResponse),
    /// A heartbeat.
    Ping(WireControl),
    /// A heartbeat's answer.
    Pong(WireControl),
    /// A discovery request.
    Discover(WireControl),
    /// A route list.
    Routes(WireRoutes),
    /// A refusal (not authenticated; see the module documentation).
    Refusal(WireControl),
}

impl Frame {
    /// The id the frame carries.
    pub fn id(&self) -> &str {
        match self {
            Frame::Request(r) => &r.id,
            Frame::Response(r) => &r.id,
            Frame::Routes(r) => &r.id,
            Frame::Ping(c) | Frame::Pong(c) | Frame::Discover(c) | Frame::Refusal(c) => &c.id,
        }
    }

    /// The frame's timestamp.
    pub fn ts(&self) -> u64 {
        match self {
            Frame::Request(r) => r.ts,
            Frame::Response(r) => r.ts,
            Frame::Routes(r) => r.ts,
            Frame::Ping(c) | Frame::Pong(c) | Frame::Discover(c) | Frame::Refusal(c) => c.ts,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Frame::Request(_) => Kind::Request,
            Frame::Response(_) => Kind::Response,
            Frame::Ping(_) => Kind::Ping,
            Frame::Pong(_) => Kind::Pong,
            Frame::Discover(_) => Kind::Discover,
            Frame::Routes(_) => Kind::Routes,
            Frame::Refusal(_) => Kind::Refusal,
        }
    }
}

/// A shared secret, kept out of `Debug` output. It holds the HMAC already keyed with it, so
/// that a MAC costs the frame's bytes and not the key schedule; clones share both.
#[derive(Clone)]
pub struct Secret(std::sync::Arc<(Vec<u8>, HmacSha256)>);

impl Secret {
    /// The secret from its bytes.
    pub fn new(secret: impl AsRef<[u8]>) -> Secret {
        let bytes = secret.as_ref().to_vec();
        // HMAC takes keys of any length; this cannot fail.
        let keyed = <HmacSha256 as Mac>::new_from_slice(&bytes)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        Secret(std::sync::Arc::new((bytes, keyed)))
    }

    /// Whether `candidate` is this secret, compared in constant time (for Brubeck's
    /// passphrase, which travels in clear text).
    pub(crate) fn matches(&self, candidate: &[u8]) -> bool {
        let bytes = &self.0.0;
        bytes.len() == candidate.len()
            && bytes
                .iter()
                .zip(candidate)
                .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                == 0
    }

    fn mac(&self) -> HmacSha256 {
        self.0.1.clone()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The MAC of a frame of `kind` with `body`, bound to `binding` for requests and responses.
fn mac_of(secret: &Secret, kind: Kind, binding: &Binding, body: &[u8]) -> HmacSha256 {
    let mut mac = secret.mac();
    mac.update(&[kind.byte()]);
    if matches!(kind, Kind::Request | Kind::Response) {
        for part in [&binding.service, &binding.instance] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part.as_bytes());
        }
    }
    mac.update(body);
    mac
}

/// Writes the MessagePack body of `frame` into `out`.
fn write_body(frame: &Frame, out: &mut impl std::io::Write) -> Result<(), Error> {
    let written = match frame {
        Frame::Request(r) => rmp_serde::encode::write_named(out, r),
        Frame::Response(r) => rmp_serde::encode::write_named(out, r),
        Frame::Routes(r) => rmp_serde::encode::write_named(out, r),
        Frame::Ping(c) | Frame::Pong(c) | Frame::Discover(c) | Frame::Refusal(c) => {
            rmp_serde::encode::write_named(out, c)
        }
    };
    written.map_err(|e| Error::Malformed(format!("cannot encode: {e}")))
}

/// The frames of `frame`, MAC'd with `secret` and (requests and responses) bound to `binding`;
/// a refusal is not MAC'd.
pub fn encode(frame: &Frame, secret: &Secret, binding: &Binding) -> Result<Vec<Bytes>, Error> {
    encode_to(None, frame, secret, binding)
}

/// [`encode`], after a routing identity when there is one (a ROUTER's reply).
pub(crate) fn encode_to(
    identity: Option<Bytes>,
    frame: &Frame,
    secret: &Secret,
    binding: &Binding,
) -> Result<Vec<Bytes>, Error> {
    seal(identity, frame.kind(), secret, binding, |out| {
        write_body(frame, out)
    })
}

/// The frames of a request, written from borrowed fields (the caller keeps its call): the
/// same bytes as [`encode`] of the owned [`WireRequest`].
pub(crate) fn encode_request(
    request: &RequestView<'_>,
    secret: &Secret,
    binding: &Binding,
) -> Result<Vec<Bytes>, Error> {
    seal(None, Kind::Request, secret, binding, |out| {
        rmp_serde::encode::write_named(out, request)
            .map_err(|e| Error::Malformed(format!("cannot encode: {e}")))
    })
}

/// The frames of a response to `identity`, written from borrowed fields, with the `METHOD`
/// header set to `response` whatever the handler put there: the same bytes as [`encode_to`]
/// of the owned [`WireResponse`] after that header's insertion.
pub(crate) fn encode_response(
    identity: Bytes,
    response: &ResponseView<'_>,
    secret: &Secret,
    binding: &Binding,
) -> Result<Vec<Bytes>, Error> {
    seal(Some(identity), Kind::Response, secret, binding, |out| {
        rmp_serde::encode::write_named(out, response)
            .map_err(|e| Error::Malformed(format!("cannot encode: {e}")))
    })
}

/// Writes the message of `kind` in one buffer: the marker, the kind, the body `write` writes,
/// then its MAC; after a routing identity when there is one.
fn seal(
    identity: Option<Bytes>,
    kind: Kind,
    secret: &Secret,
    binding: &Binding,
    write: impl FnOnce(&mut bytes::buf::Writer<bytes::BytesMut>) -> Result<(), Error>,
) -> Result<Vec<Bytes>, Error> {
    // Room for most messages: a request with a trace header is about 300 bytes.
    let mut buffer = bytes::BytesMut::with_capacity(512);
    buffer.extend_from_slice(MARKER);
    buffer.extend_from_slice(&[kind.byte()]);
    let start = buffer.len();
    let mut writer = buffer.writer();
    write(&mut writer)?;
    let mut buffer = writer.into_inner();
    if kind != Kind::Refusal {
        let mac = mac_of(secret, kind, binding, &buffer[start..]);
        buffer.extend_from_slice(&mac.finalize().into_bytes());
    }
    let mut frames = Vec::with_capacity(2);
    frames.extend(identity);
    frames.push(buffer.freeze());
    Ok(frames)
}

/// A message put together by hand: the marker, `kind`, `body`, then `mac` (empty for a
/// refusal). For tests and tools that need frames no encoder writes.
pub fn assemble(kind: u8, body: &[u8], mac: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(MARKER.len() + 1 + body.len() + mac.len());
    frame.extend_from_slice(MARKER);
    frame.push(kind);
    frame.extend_from_slice(body);
    frame.extend_from_slice(mac);
    Bytes::from(frame)
}

/// What reading a frame gave.
#[derive(Debug)]
pub enum Decoded {
    /// A well-formed frame whose MAC checks out (or a refusal, which has none), and the index
    /// of the secret that checked it (answer with the same one).
    Frame(Frame, usize),
    /// A well-formed frame whose MAC does not match: answer it with a refusal for `id`.
    BadMac {
        /// The id the frame claims, for the refusal.
        id: String,
    },
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(body).map_err(|e| Error::Malformed(format!("bad body: {e}")))
}

/// The longest id a refusal echoes.
const MAX_REFUSED_ID: usize = 128;

/// The id of a frame that failed its MAC, for the refusal: read without keeping anything
/// else of the body (other fields are skipped, not built).
fn unauthenticated_id(body: &[u8]) -> Result<String, Error> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: String,
    }
    let IdOnly { mut id } = parse(body)?;
    if id.len() > MAX_REFUSED_ID {
        id = String::new();
    }
    Ok(id)
}

/// Reads the frames after the routing identity (one: marker, kind, body, MAC): checks the MAC
/// (in constant time, against each of `secrets` in turn, requests and responses bound to
/// `binding`) over the raw bytes, and only then parses the body.
pub fn decode<F: AsRef<[u8]>>(
    frames: &[F],
    secrets: &[Secret],
    binding: &Binding,
) -> Result<Decoded, Error> {
    let [frame] = frames else {
        if let Some(first) = frames
            .first()
            .filter(|f| f.as_ref().starts_with(MARKER_NAME))
        {
            return Err(other_version(first.as_ref(), frames.len()));
        }
        return Err(Error::Malformed(format!(
            "expected 1 frame, got {}",
            frames.len()
        )));
    };
    let Some(rest) = frame.as_ref().strip_prefix(MARKER) else {
        if frame.as_ref().starts_with(MARKER_NAME) {
            return Err(other_version(frame.as_ref(), 1));
        }
        return Err(Error::Malformed(
            "not a services-mux frame (wrong marker)".into(),
        ));
    };
    let Some((&byte, rest)) = rest.split_first() else {
        return Err(Error::Malformed("a frame without a kind".into()));
    };
    let kind = Kind::from_byte(byte)
        .ok_or_else(|| Error::Malformed(format!("unknown kind {byte:#04x}")))?;
    let (body, tag) = if kind == Kind::Refusal {
        (rest, &[][..])
    } else {
        let Some(at) = rest.len().checked_sub(MAC_LEN) else {
            return Err(Error::Malformed("a MAC is required".into()));
        };
        rest.split_at(at)
    };
    if body.len() > MAX_BODY {
        return Err(Error::Malformed(format!(
            "body of {} bytes is above {MAX_BODY}",
            body.len()
        )));
    }
    if kind == Kind::Refusal {
        return Ok(Decoded::Frame(Frame::Refusal(parse(body)?), 0));
    }
    let Some(secret) = secrets.iter().position(|secret| {
        mac_of(secret, kind, binding, body)
            .verify_slice(tag)
            .is_ok()
    }) else {
        return Ok(Decoded::BadMac {
            id: unauthenticated_id(body)?,
        });
    };
    let frame = match kind {
        Kind::Request => Frame::Request(parse(body)?),
        Kind::Response => Frame::Response(parse(body)?),
        Kind::Routes => Frame::Routes(parse(body)?),
        Kind::Ping => Frame::Ping(parse(body)?),
        Kind::Pong => Frame::Pong(parse(body)?),
        Kind::Discover => Frame::Discover(parse(body)?),
        Kind::Refusal => Frame::Refusal(parse(body)?),
    };
    Ok(Decoded::Frame(frame, secret))
}

/// The error for a message of another wire version (version 1 sent four frames), naming the
/// version its first frame's marker carries; the log shows it.
fn other_version(first: &[u8], frames: usize) -> Error {
    let version = first
        .get(MARKER_NAME.len())
        .map_or_else(|| "?".to_owned(), u8::to_string);
    Error::Malformed(format!(
        "a services-mux message of wire version {version} ({frames} frames); this build speaks version {} (one frame): upgrade the peer",
        MARKER[MARKER_NAME.len()]
    ))
}

/// Refuses replayed and stale frames: each id once, timestamps within a window of now. It
/// forgets an id only once the id's timestamp is out of the window (then the timestamp check
/// refuses it); when it holds `capacity` ids still inside the window, it refuses new ones
/// rather than forget any.
///
/// An id is kept as its 64-bit SipHash under a key drawn at random for this guard: nothing is
/// allocated per id, and a peer cannot choose ids that collide. Two different ids share a
/// digest with a probability of about `capacity / 2^64` per request (below 1e-13 with a
/// million ids held); such an id would be refused as a replay, never accepted twice.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    key: std::hash::RandomState,
    /// The digests of the ids inside the window.
    seen: HashSet<u64, std::hash::BuildHasherDefault<Digest>>,
    /// When each digest was seen, oldest first.
    order: VecDeque<(u64, u64)>,
}

/// Hashes what is already a keyed digest: as it is.
#[derive(Debug, Default)]
struct Digest(u64);

impl std::hash::Hasher for Digest {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl ReplayGuard {
    /// A guard accepting timestamps within `window_ms` of now, remembering up to `capacity`
    /// ids.
    pub fn new(window_ms: u64, capacity: usize) -> ReplayGuard {
        ReplayGuard {
            window_ms,
            capacity: capacity.max(1),
            key: std::hash::RandomState::new(),
            seen: HashSet::default(),
            order: VecDeque::new(),
        }
    }

    /// Accepts `id` sent at `ts` if it is fresh and new; `now` in ms since the epoch.
    pub fn check(&mut self, id: &str, ts: u64, now: u64) -> Result<(), Error> {
        if ts.abs_diff(now) > self.window_ms {
            return Err(Error::Replayed(format!(
                "timestamp {ts} is {} ms from now, outside the {} ms window",
                ts.abs_diff(now),
                self.window_ms
            )));
        }
        // An id seen at `seen_at` was sent within the window of it: once `seen_at` is two
        // windows old, its timestamp is out of the window of now, and it can go.
        while let Some((seen_at, _)) = self.order.front() {
            if now.saturating_sub(*seen_at) > 2 * self.window_ms {
                if let Some((_, old)) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            } else {
                break;
            }
        }
        let digest = std::hash::BuildHasher::hash_one(&self.key, id);
        if self.seen.contains(&digest) {
            return Err(Error::Replayed(format!("id {id} was already seen")));
        }
        if self.seen.len() >= self.capacity {
            return Err(Error::Replayed(format!(
                "the replay guard holds {} ids inside its window; try again shortly",
                self.capacity
            )));
        }
        self.seen.insert(digest);
        self.order.push_back((now, digest));
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Frame {
        Frame::Request(WireRequest {
            id: "id-1".into(),
            ts: 1_000,
            path: "/service/slow".into(),
            method: "request".into(),
            arguments: serde_json::json!({"RETURN_DATA": "ü"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            headers: BTreeMap::from([("k".into(), "v".into())]),
            body: b"raw".to_vec(),
        })
    }

    fn bound(instance: &str) -> Binding {
        Binding {
            service: "svc".into(),
            instance: instance.into(),
        }
    }

    #[test]
    fn frames_round_trip_with_a_mac() {
        let secret = Secret::new("s3cret");
        let frames = encode(&request(), &secret, &bound("i1")).expect("encodes");
        assert_eq!(frames.len(), 1);
        assert!(frames[0].starts_with(b"RYLM-SVC\x02Q"));
        match decode(&frames, &[secret], &bound("i1")).expect("decodes") {
            Decoded::Frame(frame, 0) => assert_eq!(frame, request()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn borrowed_views_write_the_bytes_of_the_owned_frames() {
        let (secret, binding) = (Secret::new("k"), bound("i1"));
        let Frame::Request(owned) = request() else {
            unreachable!("a request")
        };
        let view = RequestView {
            id: &owned.id,
            ts: owned.ts,
            path: &owned.path,
            method: &owned.method,
            arguments: &owned.arguments,
            headers: &owned.headers,
            body: &owned.body,
        };
        assert_eq!(
            encode_request(&view, &secret, &binding).expect("encodes"),
            encode(&Frame::Request(owned.clone()), &secret, &binding).expect("encodes")
        );
        // Responses gain `METHOD: response` in key order, replacing what the handler set.
        let payload = serde_json::json!({"a": 1})
            .as_object()
            .cloned()
            .unwrap_or_default();
        for given in [
            vec![],
            vec![("A", "1")],
            vec![("Z", "1")],
            vec![("A", "1"), ("METHOD", "request"), ("Z", "2")],
        ] {
            let headers: BTreeMap<String, String> = given
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let view = ResponseView {
                id: "id-1",
                ts: 5,
                path: "/p",
                status: 200,
                status_msg: "OK",
                headers: WithMethod(&headers),
                payload: &payload,
            };
            let mut with_method = headers.clone();
            with_method.insert("METHOD".into(), "response".into());
            let owned = Frame::Response(WireResponse {
                id: "id-1".into(),
                ts: 5,
                path: "/p".into(),
                status: 200,
                status_msg: "OK".into(),
                headers: with_method,
                payload: payload.clone(),
            });
            let identity = Bytes::from_static(b"peer");
            assert_eq!(
                encode_response(identity.clone(), &view, &secret, &binding).expect("encodes"),
                encode_to(Some(identity), &owned, &secret, &binding).expect("encodes"),
                "{given:?}"
            );
        }
    }

    #[test]
    fn the_secret_never_travels_and_a_wrong_one_is_detected() {
        let frames =
            encode(&request(), &Secret::new("my_shared_secret"), &bound("i1")).expect("encodes");
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        assert!(!wire.windows(16).any(|w| w == b"my_shared_secret"));
        match decode(&frames, &[Secret::new("another")], &bound("i1")).expect("well formed") {
            Decoded::BadMac { id } => assert_eq!(id, "id-1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_bound_to_one_instance_is_refused_by_another_and_by_another_service() {
        let secret = Secret::new("k");
        let frames = encode(&request(), &secret, &bound("before-restart")).expect("encodes");
        for binding in [
            bound("after-restart"),
            Binding {
                service: "other".into(),
                instance: "before-restart".into(),
            },
        ] {
            assert!(matches!(
                decode(&frames, std::slice::from_ref(&secret), &binding),
                Ok(Decoded::BadMac { .. })
            ));
        }
        // Control frames are not bound: a pong reaches a caller that has no binding yet.
        let ping = Frame::Ping(WireControl::default());
        let frames = encode(&ping, &secret, &bound("x")).expect("encodes");
        assert!(matches!(
            decode(&frames, &[secret], &Binding::default()),
            Ok(Decoded::Frame(_, 0))
        ));
    }

    #[test]
    fn the_next_secret_is_accepted_beside_the_current_one() {
        let (current, next) = (Secret::new("current"), Secret::new("next"));
        let frames = encode(&request(), &next, &bound("i")).expect("encodes");
        assert!(matches!(
            decode(&frames, &[current, next], &bound("i")),
            Ok(Decoded::Frame(_, 1))
        ));
    }

    #[test]
    fn an_unauthenticated_body_is_not_parsed() {
        // A body of a million MessagePack nils under one key: parsed, it would be a million
        // JSON values; refused, it costs one pass over the bytes.
        let mut body = vec![0x82, 0xa2, b'i', b'd', 0xa1, b'x', 0xa1, b'a', 0xdd];
        body.extend(1_000_000u32.to_be_bytes());
        body.extend(std::iter::repeat_n(0xc0, 1_000_000));
        let frames = [assemble(b'Q', &body, &[0; 32])];
        match decode(&frames, &[Secret::new("k")], &bound("i")).expect("well formed") {
            Decoded::BadMac { id } => assert_eq!(id, "x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tampering_is_detected() {
        let secret = Secret::new("k");
        let mut frames = encode(&request(), &secret, &bound("i")).expect("encodes");
        let mut frame = frames[0].to_vec();
        // The body's last byte, just before the MAC.
        let last = frame.len() - 33;
        frame[last] ^= 1;
        frames[0] = Bytes::from(frame);
        assert!(matches!(
            decode(&frames, &[secret], &bound("i")),
            Ok(Decoded::BadMac { .. })
        ));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let secret = Secret::new("k");
        let good = encode(&request(), &secret, &bound("i")).expect("encodes");
        let good = good[0].clone();
        let version_one = vec![
            Bytes::from_static(b"RYLM-SVC\x01"),
            Bytes::from_static(b"Q"),
            good.slice(MARKER.len() + 1..good.len() - 32),
            good.slice(good.len() - 32..),
        ];
        let told = decode(&version_one, std::slice::from_ref(&secret), &bound("i"))
            .expect_err("version 1")
            .to_string();
        assert!(told.contains("wire version 1"), "{told}");
        let with_byte = |at: usize, value: u8| {
            let mut frame = good.to_vec();
            frame[at] = value;
            vec![Bytes::from(frame)]
        };
        for frames in [
            vec![],
            vec![Bytes::from_static(b"x")],
            vec![good.clone(), good.clone()],
            with_byte(0, b'r'),
            // The marker's version, the kind, and the body's first byte.
            with_byte(MARKER.len() - 1, 1),
            with_byte(MARKER.len(), b'Z'),
            with_byte(MARKER.len() + 1, 0xc1),
            vec![good.slice(..MARKER.len())],
            vec![good.slice(..MARKER.len() + 20)],
            // The four frames of wire version 1.
            version_one.clone(),
        ] {
            assert!(
                matches!(
                    decode(&frames, std::slice::from_ref(&secret), &bound("i")),
                    Err(Error::Malformed(_))
                ),
                "{frames:?}"
            );
        }
    }

    #[test]
    fn replay_guard_refuses_repeats_and_stale_times() {
        let mut guard = ReplayGuard::new(1_000, 100);
        assert!(guard.check("a", 10_000, 10_100).is_ok());
        assert!(guard.check("a", 10_000, 10_200).is_err(), "repeat");
        assert!(guard.check("b", 8_000, 10_200).is_err(), "stale");
        assert!(guard.check("c", 12_000, 10_200).is_err(), "from the future");
        assert!(guard.check("d", 10_150, 10_200).is_ok());
    }

    #[test]
    fn a_full_replay_guard_refuses_instead_of_forgetting() {
        let mut guard = ReplayGuard::new(1_000, 2);
        assert!(guard.check("a", 10_000, 10_000).is_ok());
        assert!(guard.check("b", 10_000, 10_000).is_ok());
        assert!(guard.check("c", 10_000, 10_000).is_err(), "full");
        assert!(
            guard.check("a", 10_000, 10_500).is_err(),
            "still remembered"
        );
        // Two windows later the old ids are out of the window, and forgotten.
        assert!(guard.check("c", 12_100, 12_100).is_ok());
    }

    #[test]
    fn methods_parse_case_insensitively() {
        assert_eq!("GET".parse::<Method>().expect("known"), Method::Get);
        assert!("patch".parse::<Method>().is_err());
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().expect("round trip"), m);
        }
    }
}
