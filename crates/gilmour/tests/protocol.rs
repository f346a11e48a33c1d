//! The protocol as plain data, held to a `redis-cli MONITOR` trace of a real gilmour-e-go v5 node
//! (`tests/fixtures/gilmour-go-monitor.log`) and to the rules of the spec.

use rylm_gilmour::Error;
use rylm_gilmour::protocol::{self, Composed, Envelope, Step};
use serde_json::{Value, json};

const TRACE: &str = include_str!("fixtures/gilmour-go-monitor.log");

mod common;
use common::command;

fn trace() -> Vec<Vec<String>> {
    TRACE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| command(l).unwrap_or_else(|| panic!("a MONITOR line: {l}")))
        .collect()
}

fn find<'a>(trace: &'a [Vec<String>], cmd: &str, first: &str) -> &'a Vec<String> {
    trace
        .iter()
        .find(|c| c[0] == cmd && c.get(1).map(String::as_str) == Some(first))
        .unwrap_or_else(|| panic!("{cmd} {first} in the trace"))
}

#[test]
fn a_request_and_its_reply_are_the_go_engines_byte_for_byte() {
    let trace = trace();
    let channel = protocol::request_channel("echo");
    let request = find(&trace, "PUBLISH", &channel);
    let envelope = Envelope::decode(request[2].as_bytes());
    assert_eq!(envelope.data, json!("hi"));
    assert_eq!(envelope.code, Some(200));
    let sender = envelope.sender.clone();
    assert_eq!(sender.len(), 36, "Go's sender is a uuid");
    // What rylm would publish for the same request is the same bytes.
    assert_eq!(
        Envelope::request(json!("hi"), sender.clone()).encode(),
        request[2].as_bytes()
    );
    // The requester listened before it published, on the channel rylm derives.
    let response = protocol::response_channel(&sender);
    let position = |cmd: &str, arg: &str| {
        trace
            .iter()
            .position(|c| c[0] == cmd && c[1] == arg)
            .unwrap_or_else(|| panic!("{cmd} {arg}"))
    };
    assert!(position("SUBSCRIBE", &response) < position("PUBLISH", &channel));
    // And asked whether anybody listens first.
    let numsub = trace
        .iter()
        .position(|c| c[0] == "PUBSUB" && c[1] == "NUMSUB" && c[2] == channel)
        .expect("a NUMSUB before the request");
    assert!(numsub < position("SUBSCRIBE", &response));
    // The responder's lock: sender and group, no separator, NX EX 600.
    let lock = protocol::lock_key(&sender, "echoers");
    let set = find(&trace, "SET", &lock);
    assert_eq!(set[2], lock);
    assert_eq!(&set[3..], ["NX", "EX", &protocol::LOCK_SECONDS.to_string()]);
    // The reply, byte for byte.
    let reply = find(&trace, "PUBLISH", &response);
    assert_eq!(
        Envelope::reply(json!("echo:hi"), 200, &sender).encode(),
        reply[2].as_bytes()
    );
    assert_eq!(Envelope::reply(json!("echo:hi"), 0, &sender).code(), 200);
}

#[test]
fn a_timeout_is_499_and_an_ungrouped_service_locks_in_the_default_group() {
    let trace = trace();
    let request = find(&trace, "PUBLISH", &protocol::request_channel("slow"));
    let sender = Envelope::decode(request[2].as_bytes()).sender;
    find(
        &trace,
        "SET",
        &protocol::lock_key(&sender, protocol::DEFAULT_GROUP),
    );
    let reply = Envelope::decode(
        find(&trace, "PUBLISH", &protocol::response_channel(&sender))[2].as_bytes(),
    );
    let ours = Envelope::timed_out(&sender);
    assert!(ours.failed());
    assert_eq!((reply.data, reply.code), (ours.data, ours.code));
}

#[test]
fn slots_health_and_the_404_check_use_the_names_rylm_derives() {
    let trace = trace();
    let pattern = protocol::slot_channel("evt.*");
    assert!(protocol::is_pattern(&pattern));
    find(&trace, "PSUBSCRIBE", &pattern);
    let signal = trace
        .iter()
        .find(|c| c[0] == "PUBLISH" && c[1].starts_with("gilmour.slot."))
        .expect("a signal");
    assert!(protocol::glob_match(&pattern, &signal[1]));
    assert_eq!(protocol::topic_of(&signal[1]), "evt.created");
    assert_eq!(
        Envelope::decode(signal[2].as_bytes()).data,
        json!({"id": 1})
    );

    let hset = find(&trace, "HSET", protocol::HEALTH_HASH);
    let ident = &hset[2];
    assert!(ident.contains("-pid-") && ident.contains("-uuid-"));
    find(&trace, "SUBSCRIBE", &protocol::health_channel(ident));
    find(&trace, "HDEL", protocol::HEALTH_HASH);
    assert!(trace.iter().any(|c| c[0] == "PUBSUB"
        && c[1] == "NUMSUB"
        && c[2] == protocol::request_channel("nobody")));
    // A health channel is requested as it is: no second prefix.
    assert_eq!(
        protocol::request_channel(&protocol::health_channel(ident)),
        protocol::health_channel(ident)
    );
}

#[test]
fn every_payload_in_the_trace_decodes() {
    for c in trace().iter().filter(|c| c[0] == "PUBLISH") {
        let envelope = Envelope::decode(c[2].as_bytes());
        assert!(!envelope.sender.is_empty(), "{c:?}");
        assert!(envelope.code.is_some(), "{c:?}");
    }
}

#[test]
fn bad_and_foreign_payloads_decode_without_failing() {
    // Ruby's requests say code 0 and a 32-hex sender.
    let ruby = Envelope::decode(
        br#"{"data":{"a":1},"code":0,"sender":"0123456789abcdef0123456789abcdef"}"#,
    );
    assert_eq!(ruby.code(), 200);
    assert_eq!(ruby.sender.len(), 32);
    // Not JSON: the raw text is the data.
    let raw = Envelope::decode(b"plain text \xff");
    assert_eq!(raw.data, json!("plain text \u{fffd}"));
    assert_eq!(raw.sender, "");
    // JSON that is not an envelope is the data.
    assert_eq!(Envelope::decode(b"[1,2]").data, json!([1, 2]));
    assert_eq!(Envelope::decode(br#"{"x":1}"#).data, json!({"x": 1}));
    // Wrongly typed fields keep what can be kept.
    let odd = Envelope::decode(br#"{"data":3,"code":"200","sender":7}"#);
    assert_eq!(
        (odd.data, odd.code, odd.sender.as_str()),
        (json!(3), None, "7")
    );
    assert_eq!(Envelope::decode(br#"{"data":1,"code":null}"#).code(), 200);
}

#[test]
fn topics_are_checked() {
    assert!(matches!(
        protocol::service_topic("evt.*"),
        Err(Error::WildcardService(t)) if t == "evt.*"
    ));
    assert!(matches!(
        protocol::service_topic(""),
        Err(Error::EmptyTopic)
    ));
    assert!(matches!(protocol::slot_topic(""), Err(Error::EmptyTopic)));
    assert_eq!(protocol::service_topic("echo").ok(), Some("echo"));
    assert_eq!(protocol::slot_topic("evt.*").ok(), Some("evt.*"));
    assert_eq!(protocol::request_channel("echo"), "gilmour.request.echo");
    assert_eq!(protocol::topic_of("gilmour.request.echo"), "echo");
    assert_eq!(protocol::topic_of("gilmour.health.x"), "gilmour.health.x");
}

#[test]
fn globs_match_as_redis_does() {
    let cases = [
        ("evt.*", "evt.created", true),
        ("evt.*", "evt.a.b", true),
        ("evt.*", "evt", false),
        ("*", "", true),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXbYY", false),
        ("h?llo", "hello", true),
        ("h?llo", "hllo", false),
        ("h[ae]llo", "hallo", true),
        ("h[ae]llo", "hillo", false),
        ("h[^e]llo", "hallo", true),
        ("h[^e]llo", "hello", false),
        ("h[a-c]llo", "hbllo", true),
        ("h[a-c]llo", "hdllo", false),
        ("a\\*b", "a*b", true),
        ("a\\*b", "axb", false),
        ("h[ae", "ha", false),
        ("", "", true),
        ("", "x", false),
    ];
    for (pattern, text, expected) in cases {
        assert_eq!(
            protocol::glob_match(pattern, text),
            expected,
            "{pattern:?} against {text:?}"
        );
    }
}

#[test]
fn a_composition_answers_every_kept_response_with_the_highest_code() {
    let composed = Composed::of(vec![
        Step {
            data: json!("a"),
            code: 200,
        },
        Step {
            data: json!("b"),
            code: 500,
        },
    ]);
    let value = serde_json::to_value(&composed).expect("serializes");
    assert_eq!(
        value,
        json!({"messages": [{"data": "a", "code": 200}, {"data": "b", "code": 500}], "code": 500, "length": 2})
    );
    assert_eq!(composed.as_input(), json!(["a", "b"]));
    let one = Composed::of(vec![Step {
        data: json!({"k": 1}),
        code: 200,
    }]);
    assert_eq!(one.as_input(), json!({"k": 1}));
    assert_eq!(Composed::of(vec![]).code, 200);

    let with = json!({"b": 2, "c": 3});
    let with = with.as_object().expect("a map");
    assert_eq!(
        protocol::merge(&json!({"a": 1, "b": 1}), with),
        json!({"a": 1, "b": 2, "c": 3})
    );
    assert_eq!(protocol::merge(&Value::Null, with), json!({"b": 2, "c": 3}));
    assert_eq!(protocol::merge(&json!("s"), with), json!("s"));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_decode(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let envelope = Envelope::decode(&payload);
            // Whatever came in, what goes back out is an envelope that reads the same.
            prop_assert_eq!(Envelope::decode(&envelope.encode()).data, envelope.data);
        }

        #[test]
        fn envelopes_round_trip(data in "[a-z0-9 ]{0,40}", code in -1000i64..1000, sender in "[a-f0-9-]{1,36}") {
            let envelope = Envelope { data: json!({"text": data}), code: Some(code), sender, traceparent: None };
            prop_assert_eq!(Envelope::decode(&envelope.encode()), envelope);
        }

        #[test]
        fn a_star_matches_any_suffix(prefix in "[a-z.]{0,12}", suffix in "[a-z.*?]{0,12}") {
            let pattern = format!("{prefix}*");
            let text = format!("{prefix}{suffix}");
            prop_assert!(protocol::glob_match(&pattern, &text));
        }
    }
}
