//! Composition semantics in memory: a runner whose services are plain functions, so each kind's
//! rule (what each step gets, where it stops, what it keeps) is checked without I/O. The same
//! compositions run on a real Redis in `tests/node.rs`.
// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::Duration;

use rylm_gilmour::compose::{self, BoxFuture, Composition, Executable, Kind, Runner};
use rylm_gilmour::protocol::Step;
use serde_json::{Value, json};

/// Services by topic: `add1` adds one to a number, `double` doubles it, `fail` answers 500,
/// `missing` 404, `slow:<ms>` echoes after a sleep; lambdas are names (`wrap`).
#[derive(Default)]
struct Memory {
    calls: Mutex<Vec<String>>,
}

impl Runner<String> for Memory {
    fn request<'a>(&'a self, topic: &'a str, data: Value, _: Duration) -> BoxFuture<'a, Step> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(topic.to_owned());
            let n = data.as_i64().unwrap_or(0);
            match topic {
                "add1" => Step {
                    data: json!(n + 1),
                    code: 200,
                },
                "double" => Step {
                    data: json!(n * 2),
                    code: 200,
                },
                "created" => Step {
                    data: json!("made"),
                    code: 201,
                },
                "fail" => Step {
                    data: json!("boom"),
                    code: 500,
                },
                "missing" => Step {
                    data: json!("nobody"),
                    code: 404,
                },
                "echo" => Step { data, code: 200 },
                slow if slow.starts_with("slow:") => {
                    let ms = slow[5..].parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Step {
                        data: json!(slow),
                        code: 200,
                    }
                }
                _ => Step {
                    data: json!("unknown"),
                    code: 404,
                },
            }
        })
    }

    fn lambda<'a>(&'a self, name: &'a String, data: Value) -> BoxFuture<'a, Step> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!("lambda:{name}"));
            Step {
                data: json!({ name.as_str(): data }),
                code: 200,
            }
        })
    }
}

fn of(kind: Kind, steps: Vec<Executable<String>>) -> Composition<String> {
    Composition::new(kind, steps)
}

fn req(topic: &str) -> Executable<String> {
    Executable::request(topic)
}

async fn run(composition: &Composition<String>, input: Value) -> (Value, Vec<String>) {
    let memory = Memory::default();
    let composed = composition
        .run(input, &memory, Duration::from_secs(5))
        .await;
    let calls = memory.calls.lock().unwrap().clone();
    (serde_json::to_value(composed).unwrap(), calls)
}

#[tokio::test]
async fn pipe_feeds_each_output_on_and_stops_at_the_first_failure() {
    let pipe = of(Kind::Pipe, vec![req("add1"), req("double"), req("add1")]);
    let (out, _) = run(&pipe, json!(1)).await;
    assert_eq!(
        out,
        json!({"messages": [{"data": 5, "code": 200}], "code": 200, "length": 1})
    );

    let broken = of(Kind::Pipe, vec![req("add1"), req("fail"), req("double")]);
    let (out, calls) = run(&broken, json!(1)).await;
    assert_eq!(
        out,
        json!({"messages": [{"data": "boom", "code": 500}], "code": 500, "length": 1})
    );
    assert_eq!(calls, ["add1", "fail"], "nothing after the failure runs");
}

#[tokio::test]
async fn a_multi_message_output_enters_the_next_pipe_step_as_one_array() {
    let pipe = of(
        Kind::Pipe,
        vec![
            of(
                Kind::Batch { record: true },
                vec![req("add1"), req("double")],
            )
            .into(),
            Executable::Lambda("wrap".to_owned()),
        ],
    );
    let (out, _) = run(&pipe, json!(3)).await;
    assert_eq!(
        out["messages"],
        json!([{"data": {"wrap": [4, 6]}, "code": 200}])
    );
}

#[tokio::test]
async fn andand_gives_every_step_the_input_and_stops_at_a_failure() {
    let (out, calls) = run(
        &of(
            Kind::AndAnd,
            vec![req("add1"), req("double"), req("missing"), req("add1")],
        ),
        json!(10),
    )
    .await;
    assert_eq!(out["messages"], json!([{"data": "nobody", "code": 404}]));
    assert_eq!(calls, ["add1", "double", "missing"]);
    let (out, _) = run(
        &of(Kind::AndAnd, vec![req("add1"), req("double")]),
        json!(10),
    )
    .await;
    assert_eq!(
        out["messages"],
        json!([{"data": 20, "code": 200}]),
        "the last, on the original input"
    );
}

#[tokio::test]
async fn oror_stops_at_the_first_success_of_code_200_or_less() {
    let (out, calls) = run(
        &of(
            Kind::OrOr,
            vec![req("fail"), req("created"), req("double"), req("add1")],
        ),
        json!(4),
    )
    .await;
    assert_eq!(out["messages"], json!([{"data": 8, "code": 200}]));
    assert_eq!(
        calls,
        ["fail", "created", "double"],
        "a 201 is not yet a success for oror"
    );
    let (out, _) = run(&of(Kind::OrOr, vec![req("fail"), req("missing")]), json!(4)).await;
    assert_eq!(out["code"], json!(404), "all failed: the last failure");
}

#[tokio::test]
async fn batch_ignores_failures_and_records_on_demand() {
    let steps = || vec![req("fail"), req("add1"), req("missing")];
    let (out, calls) = run(&of(Kind::Batch { record: false }, steps()), json!(1)).await;
    assert_eq!(
        out,
        json!({"messages": [{"data": "nobody", "code": 404}], "code": 404, "length": 1})
    );
    assert_eq!(calls.len(), 3, "every step runs");
    let (out, _) = run(&of(Kind::Batch { record: true }, steps()), json!(1)).await;
    assert_eq!(
        out,
        json!({"messages": [{"data": "boom", "code": 500}, {"data": 2, "code": 200}, {"data": "nobody", "code": 404}], "code": 500, "length": 3})
    );
}

#[tokio::test]
async fn parallel_runs_every_step_at_once_and_answers_in_completion_order() {
    let parallel = of(
        Kind::Parallel,
        vec![
            req("slow:300"),
            req("slow:10"),
            req("slow:150"),
            req("fail"),
        ],
    );
    let started = std::time::Instant::now();
    let (out, _) = run(&parallel, json!(null)).await;
    assert!(
        started.elapsed() < Duration::from_millis(440),
        "at once, not one after another"
    );
    let order: Vec<&Value> = out["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(
        order,
        [
            &json!("boom"),
            &json!("slow:10"),
            &json!("slow:150"),
            &json!("slow:300")
        ]
    );
    assert_eq!(
        (out["code"].clone(), out["length"].clone()),
        (json!(500), json!(4))
    );
}

#[tokio::test]
async fn compositions_nest_and_merge_a_steps_message_into_its_input() {
    let mut message = serde_json::Map::new();
    message.insert("k".to_owned(), json!(1));
    message.insert("a".to_owned(), json!("step wins"));
    let nested = of(
        Kind::Pipe,
        vec![
            Executable::request_with("echo", message),
            of(
                Kind::Parallel,
                vec![
                    Executable::Lambda("left".to_owned()),
                    of(
                        Kind::OrOr,
                        vec![req("fail"), Executable::Lambda("right".to_owned())],
                    )
                    .into(),
                ],
            )
            .into(),
            Executable::Lambda("wrap".to_owned()),
        ],
    );
    let (out, _) = run(&nested, json!({"a": "input", "b": 2})).await;
    let merged = json!({"a": "step wins", "b": 2, "k": 1});
    let data = &out["messages"][0]["data"]["wrap"];
    let mut parts = data.as_array().unwrap().clone();
    parts.sort_by_key(|v| v.to_string());
    assert_eq!(
        parts,
        [json!({"left": merged.clone()}), json!({"right": merged})]
    );
    let empty = of(Kind::Pipe, vec![]);
    assert_eq!(
        run(&empty, json!(1)).await.0,
        json!({"messages": [], "code": 200, "length": 0})
    );
}

#[test]
fn the_json_form_is_read_with_clear_errors() {
    let parsed = compose::from_json(&json!({
        "pipe": [
            {"topic": "a", "message": {"k": 1}, "timeout": 2},
            {"parallel": [{"topic": "b"}, {"batch": [{"topic": "c"}], "record": true}]},
            {"lambda": "/transform"}
        ]
    }))
    .expect("a valid composition");
    assert_eq!(parsed.kind, Kind::Pipe);
    assert_eq!(parsed.steps.len(), 3);
    assert_eq!(parsed.steps[2], Executable::Lambda("/transform".to_owned()));
    let Executable::Request {
        timeout, message, ..
    } = &parsed.steps[0]
    else {
        panic!("a request step");
    };
    assert_eq!(
        (*timeout, message.as_ref().map(|m| m.len())),
        (Some(Duration::from_secs(2)), Some(1))
    );
    let Executable::Composition(parallel) = &parsed.steps[1] else {
        panic!("a nested composition");
    };
    assert_eq!(
        parallel.steps[1],
        Executable::Composition(Composition::new(
            Kind::Batch { record: true },
            vec![req("c")]
        ))
    );

    for (bad, says) in [
        (json!([1]), "is an object"),
        (json!({"pipe": [], "oror": []}), "exactly one of"),
        (json!({"sequence": []}), "exactly one of"),
        (json!({"pipe": {"topic": "a"}}), "list of steps"),
        (json!({"pipe": [{"topic": "a.*"}]}), "wildcard"),
        (json!({"pipe": [{"topic": 3}]}), "\"topic\" is a string"),
        (
            json!({"pipe": [{"topic": "a", "message": 3}]}),
            "\"message\" is an object",
        ),
        (
            json!({"pipe": [{"topic": "a", "timeout": -1}]}),
            "positive number",
        ),
        (json!({"pipe": [{"lambda": "relative"}]}), "lambda is"),
        (json!({"batch": [], "record": "yes"}), "true or false"),
        (json!({"pipe": [], "extra": 1}), "unexpected field"),
        (json!({"pipe": [7]}), "a step is an object"),
    ] {
        let error = compose::from_json(&bad).expect_err("refused");
        assert!(
            error.contains(says),
            "{bad} -> {error:?} should say {says:?}"
        );
    }
    let mut deep = json!({"topic": "a"});
    for _ in 0..40 {
        deep = json!({ "pipe": [deep] });
    }
    assert!(
        compose::from_json(&deep)
            .expect_err("too deep")
            .contains("nest at most")
    );
}
