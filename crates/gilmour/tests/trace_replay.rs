//! The recorded trace of a real Go engine (`tests/fixtures/gilmour-go-monitor.log`), replayed
//! against rylm on a real Redis: the same node (a responder in group `echoers`, a slow service
//! that times out, a grouped wildcard slot, health on) makes the same requests and signal, while
//! a `MONITOR` connection records what rylm sends. The commands and payloads must be the Go
//! engine's, but for the differences the spec settles:
//!
//! - no `PING` before pooled commands (the Go pool's, not the protocol's);
//! - rylm takes the group's lock for a grouped slot (Go v5 does not: a bug not copied);
//! - rylm's responder answers the handler timeout itself, with the response channel as sender
//!   like every reply (Go's requester publishes a synthetic 499 with the bare sender; receivers
//!   ignore a response's sender), and publishes the error record of that 499 on
//!   `gilmour.error`;
//! - rylm unsubscribes each channel once at shutdown (Go twice).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use rylm_gilmour::node::{Node, NodeOptions};
use rylm_gilmour::protocol::{Envelope, ErrorRecord};
use serde_json::{Value, json};

const TRACE: &str = include_str!("fixtures/gilmour-go-monitor.log");

/// The trace's commands, `PING`s left out and the doubled unsubscriptions of shutdown once.
fn expected() -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for line in TRACE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let command = common::command(line).expect("a MONITOR line");
        if command[0] == "PING" || out.last() == Some(&command) {
            continue;
        }
        out.push(command);
    }
    out
}

/// Puts each `UNSUBSCRIBE gilmour.response.<x>` right after the reply published on that
/// channel. The unsubscription goes out on the subscriber connection while the next request's
/// commands go out on the command connection, so Redis may see them in either order (fred
/// completes an UNSUBSCRIBE when it is written); after the reply is the only order the protocol
/// fixes.
fn canonical(commands: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for command in commands {
        let response = command[0] == "UNSUBSCRIBE"
            && command
                .get(1)
                .is_some_and(|c| c.starts_with("gilmour.response."));
        if !response {
            out.push(command.clone());
            continue;
        }
        let channel = &command[1];
        let reply = out
            .iter()
            .rposition(|c| c[0] == "PUBLISH" && c.get(1) == Some(channel));
        match reply {
            Some(at) => out.insert(at + 1, command.clone()),
            None => out.push(command.clone()),
        }
    }
    out
}

fn is_uuid(s: &[u8]) -> bool {
    s.len() == 36
        && s.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Replaces the node's ident with `IDENT` and every uuid with `U<n>`, numbered by first
/// appearance, so that two runs compare.
fn normalize(commands: &[Vec<String>], ident: &str) -> Vec<Vec<String>> {
    let mut names: HashMap<String, String> = HashMap::new();
    commands
        .iter()
        .map(|command| {
            command
                .iter()
                .map(|arg| {
                    let arg = arg.replace(ident, "IDENT");
                    let bytes = arg.as_bytes();
                    let mut out = String::new();
                    let mut i = 0;
                    while i < bytes.len() {
                        if i + 36 <= bytes.len() && is_uuid(&bytes[i..i + 36]) {
                            let uuid = &arg[i..i + 36];
                            let next = names.len() + 1;
                            out.push_str(
                                names
                                    .entry(uuid.to_owned())
                                    .or_insert_with(|| format!("U{next}")),
                            );
                            i += 36;
                        } else {
                            out.push(char::from(bytes[i]));
                            i += 1;
                        }
                    }
                    out
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn rylm_replays_the_go_engines_trace_command_for_command() {
    let test = "rylm_replays_the_go_engines_trace_command_for_command";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    let monitor = common::Monitor::start(&url).await;
    // Each request on a response channel of its own, as the Go engine makes them.
    let options = NodeOptions {
        shared_responses: false,
        ..NodeOptions::default()
    };
    let node = Node::connect_with(&url, options).await.expect("connects");
    let ident = node.enable_health().await.expect("health");
    node.reply_to(
        "echo",
        "echoers",
        Duration::from_secs(10),
        |data: Value| async move {
            Ok(Value::from(format!(
                "echo:{}",
                data.as_str().unwrap_or_default()
            )))
        },
    )
    .await
    .expect("serves echo");
    node.reply_to("slow", "_default", Duration::from_secs(1), |_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(Value::Null)
    })
    .await
    .expect("serves slow");
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
    node.slot("evt.*", Some("g1"), move |topic, data| {
        let heard = heard.clone();
        async move {
            let _ = heard.send((topic, data));
        }
    })
    .await
    .expect("listens on evt.*");

    let echo = node
        .request("echo", json!("hi"), Duration::from_secs(5))
        .await
        .expect("requests echo");
    assert_eq!((echo.code(), echo.data), (200, json!("echo:hi")));
    let slow = node
        .request("slow", json!("x"), Duration::from_secs(5))
        .await
        .expect("requests slow");
    assert_eq!(
        (slow.code(), slow.data),
        (499, json!("Execution timed out"))
    );
    let receivers = node
        .signal("evt.created", json!({"id": 1}))
        .await
        .expect("signals");
    assert_eq!(receivers, 1);
    let (topic, data) = tokio::time::timeout(Duration::from_secs(5), hearing.recv())
        .await
        .expect("the slot hears the signal")
        .expect("a signal");
    assert_eq!((topic.as_str(), data), ("evt.created", json!({"id": 1})));
    let nobody = node
        .request("nobody", json!(null), Duration::from_secs(5))
        .await
        .expect("requests nobody");
    assert_eq!(nobody.code(), 404);
    // The error record of the 499 is published after the reply; let it through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = monitor.stop().await;

    // rylm's commands: those that name the trace's topics, this node, or a sender of its
    // messages (the shared Redis also serves other tests).
    let mut senders: Vec<String> = Vec::new();
    for command in &seen {
        let [verb, channel, payload] = command.as_slice() else {
            continue;
        };
        let traced = [
            "gilmour.request.echo",
            "gilmour.request.slow",
            "gilmour.request.nobody",
        ]
        .contains(&channel.as_str())
            || channel.starts_with("gilmour.slot.evt.");
        if verb == "PUBLISH" && traced {
            senders.push(Envelope::decode(payload.as_bytes()).sender);
        }
    }
    let needles: Vec<String> = [
        "gilmour.request.echo",
        "gilmour.request.slow",
        "gilmour.request.nobody",
        "gilmour.slot.evt.",
        ident.as_str(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(senders.iter().filter(|s| !s.is_empty()).cloned())
    .collect();
    let mut ours: Vec<Vec<String>> = seen
        .into_iter()
        .filter(|c| c[0] != "PING" && c[1..].iter().any(|a| needles.iter().any(|n| a.contains(n))))
        .collect();

    // The differences the spec settles, each checked before it is set aside.
    let slot_sender = senders.last().expect("the signal's sender").clone();
    let lock_key = format!("{slot_sender}g1");
    let lock = ours
        .iter()
        .position(|c| c[0] == "SET" && c[1] == lock_key)
        .expect("rylm locks the grouped slot's signal");
    assert_eq!(ours[lock], ["SET", &lock_key, &lock_key, "NX", "EX", "600"]);
    assert!(
        ours[..lock]
            .iter()
            .any(|c| c[0] == "PUBLISH" && c[1] == "gilmour.slot.evt.created"),
        "the lock follows the signal"
    );
    ours.remove(lock);
    let record = ours
        .iter()
        .position(|c| c[0] == "PUBLISH" && c[1] == "gilmour.error")
        .expect("the 499 is reported on gilmour.error");
    let envelope = Envelope::decode(ours[record][2].as_bytes());
    let record_data: ErrorRecord = serde_json::from_value(envelope.data).expect("an error record");
    assert_eq!(
        (
            record_data.topic.as_str(),
            record_data.code,
            &record_data.request_data
        ),
        ("slow", 499, &json!("x"))
    );
    assert_eq!(
        record_data.sender, senders[1],
        "the record names the slow request's sender"
    );
    ours.remove(record);
    // rylm's requests and signals carry W3C trace context in an extra envelope field, which
    // the Go and Ruby engines' decoders ignore: each checked valid, then set aside.
    for command in &mut ours {
        let sent = command[0] == "PUBLISH"
            && (command[1].starts_with("gilmour.request.")
                || command[1].starts_with("gilmour.slot."));
        if sent {
            let mut envelope = Envelope::decode(command[2].as_bytes());
            let traceparent = envelope.traceparent.take().expect("a traced envelope");
            assert!(
                rylm_message::trace::TraceParent::parse(&traceparent).is_some(),
                "{traceparent}"
            );
            command[2] = String::from_utf8(envelope.encode()).expect("UTF-8");
        }
    }

    let mut want = expected();
    let go_ident = want[0][1].trim_start_matches("gilmour.health.").to_owned();
    for command in &mut want {
        let timed_out = command[0] == "PUBLISH"
            && command[1].starts_with("gilmour.response.")
            && command[2].contains("\"code\":499");
        if timed_out {
            let mut envelope = Envelope::decode(command[2].as_bytes());
            envelope.sender = command[1].clone();
            command[2] = String::from_utf8(envelope.encode()).expect("UTF-8");
        }
    }
    let want = normalize(&canonical(&want), &go_ident);
    let got = normalize(&canonical(&ours), &ident);
    if got != want {
        let show = |c: &[Vec<String>]| {
            c.iter()
                .map(|c| c.join(" "))
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        panic!(
            "rylm's commands differ from the Go engine's\nexpected:\n  {}\ngot:\n  {}",
            show(&want),
            show(&got)
        );
    }
}

#[tokio::test]
async fn with_shared_responses_a_request_is_one_publish_that_any_responder_answers() {
    use fred::prelude::*;
    let test = "with_shared_responses_a_request_is_one_publish_that_any_responder_answers";
    let Some(url) = rylm_testkit::redis_url(test) else {
        return;
    };
    // A responder that knows only the protocol, as a Go or Ruby one: it answers on
    // `gilmour.response.<sender>`, whatever the sender looks like.
    let topic = format!("plain.{}", uuid::Uuid::new_v4());
    let config = Config::from_url(&url).expect("a URL");
    let listener = Builder::from_config(config.clone())
        .build_subscriber_client()
        .expect("a subscriber");
    listener.init().await.expect("connects");
    let publisher = Builder::from_config(config).build().expect("a client");
    publisher.init().await.expect("connects");
    let mut requests = listener.message_rx();
    listener
        .subscribe(format!("gilmour.request.{topic}"))
        .await
        .expect("subscribes");
    let _: fred::types::Value = listener.ping(None).await.expect("PING");
    let responder = tokio::spawn(async move {
        while let Ok(message) = requests.recv().await {
            let request = Envelope::decode(message.value.as_bytes().unwrap_or_default());
            let channel = format!("gilmour.response.{}", request.sender);
            let reply = json!({"data": request.data, "code": 200, "sender": channel}).to_string();
            let _: Result<i64, _> = publisher.publish(channel, reply).await;
        }
    });

    let monitor = common::Monitor::start(&url).await;
    let node = Node::connect(&url).await.expect("connects");
    for n in 0..3 {
        let reply = node
            .request(&topic, json!(n), Duration::from_secs(5))
            .await
            .expect("requests");
        assert_eq!((reply.code(), reply.data), (200, json!(n)));
    }
    let seen = monitor.stop().await;
    node.shutdown().await;
    responder.abort();

    let channel = format!("gilmour.request.{topic}");
    let requests: Vec<&Vec<String>> = seen
        .iter()
        .filter(|c| c[0] == "PUBLISH" && c[1] == channel)
        .collect();
    assert_eq!(requests.len(), 3);
    let mut senders = Vec::new();
    for request in requests {
        let sender = Envelope::decode(request[2].as_bytes()).sender;
        senders.push(sender.clone());
        let response = format!("gilmour.response.{sender}");
        let mine: Vec<&str> = seen
            .iter()
            .filter(|c| c[1..].iter().any(|a| a.contains(&sender) || *a == channel))
            .filter(|c| c[0] != "PING")
            .map(|c| c[0].as_str())
            .collect();
        assert!(
            !seen
                .iter()
                .any(|c| c[0].ends_with("SUBSCRIBE") && c[1] == response),
            "no subscription per request"
        );
        assert!(mine.contains(&"PUBLISH"), "{mine:?}");
    }
    let counts = seen
        .iter()
        .filter(|c| c.len() >= 3 && c[0] == "PUBSUB" && c[2] == channel)
        .count();
    // Senders shaped as uuids (36 characters, as Go's), the node's prefix then a random rest:
    // none of them can be guessed from the others.
    for sender in &senders {
        assert_eq!(sender.len(), 36, "{sender}");
        assert!(uuid::Uuid::parse_str(sender).is_ok(), "{sender}");
    }
    let prefix = senders[0][..13].to_owned();
    assert!(senders.iter().all(|s| s[..13] == prefix), "{senders:?}");
    let rests: std::collections::HashSet<&str> = senders.iter().map(|s| &s[13..]).collect();
    assert_eq!(rests.len(), senders.len(), "{senders:?}");
    let subscriptions = seen
        .iter()
        .filter(|c| c[0].ends_with("SUBSCRIBE") && c[1].contains(&prefix))
        .map(|c| c[1].clone())
        .collect::<Vec<_>>();
    assert_eq!(
        subscriptions,
        [format!("gilmour.response.{prefix}-*")],
        "the node's one pattern, subscribed once when it connected; nothing per request"
    );
    assert_eq!(
        counts, 0,
        "no separate count: PUBLISH's own count of receivers says whether anybody listens"
    );
    let _ = listener.quit().await;
}
