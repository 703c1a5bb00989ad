//! Fuzzing the client frame decoder on stable Rust: proptest over arbitrary bytes (as the
//! gateway sees them: lossy UTF-8) and over JSON-shaped frames built to reach every branch of
//! `parse`. Every input must give a frame or an `RtmError` that renders to valid JSON; none may
//! panic or overflow the stack.
//!
//! Each target runs a few thousand cases (seconds, for CI); `CHANNELMESH_FUZZ_CASES=N` runs N
//! per target. The count of executions is printed (`cargo test -- --nocapture` shows it).
//! A failing input is shrunk and printed by proptest: add it to `regressions` below by name.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::event::MAX_TEXT_BYTES;
use mesh_rtm::{ClientFrame, MAX_PRESENCE_IDS, RtmError, parse};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

/// Cases per target: `CHANNELMESH_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("CHANNELMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `cases` inputs from `strategy`, shrinking and failing on the first bad one;
/// prints how many inputs ran.
fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, check: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let runs = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        runs.fetch_add(1, Ordering::Relaxed);
        check(input);
        Ok(())
    });
    eprintln!("fuzz {name}: {} executions", runs.load(Ordering::Relaxed));
    if let Err(e) = result {
        panic!("fuzz {name} found a failing input: {e}");
    }
}

/// What every parse result must satisfy.
fn check_frame(text: &str) {
    match parse(text) {
        Err(error) => check_error(text, &error),
        Ok(frame) => {
            // Only JSON objects with a string type parse.
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(value["type"].is_string());
            match frame {
                ClientFrame::Ping { fields } => {
                    let pong: Value = serde_json::from_str(&mesh_rtm::pong(fields)).unwrap();
                    assert_eq!(pong["type"], "pong");
                }
                ClientFrame::Message { id, text, .. } => {
                    assert_eq!(Some(id), value["id"].as_i64());
                    assert!(!text.is_empty() && text.len() <= MAX_TEXT_BYTES);
                }
                ClientFrame::Typing { .. } => {}
                ClientFrame::PresenceSub { ids, .. } | ClientFrame::PresenceQuery { ids, .. } => {
                    assert!(ids.len() <= MAX_PRESENCE_IDS);
                }
            }
        }
    }
}

/// An error renders to JSON: a reply (`ok:false`, `reply_to`) or a `type:error` event, with a
/// numeric code and a message.
fn check_error(text: &str, error: &RtmError) {
    let rendered: Value = serde_json::from_str(&error.render())
        .unwrap_or_else(|e| panic!("error for {text:?} renders to bad JSON: {e}"));
    match error.reply_to {
        Some(id) => {
            assert_eq!(rendered["ok"], false);
            assert_eq!(rendered["reply_to"], id);
        }
        None => assert_eq!(rendered["type"], "error"),
    }
    assert!(rendered["error"]["code"].is_u64());
    assert!(rendered["error"]["msg"].is_string());
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::from),
        "[CUT][A-Z0-9]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames shaped like RTM: a known (or odd) type, and the fields `parse` looks at, each
/// present or not, of the right type or not.
fn rtm_like() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just(json!("ping")),
        Just(json!("message")),
        Just(json!("typing")),
        Just(json!("presence_sub")),
        Just(json!("presence_query")),
        Just(json!("hello")),
        any_json(),
    ];
    let id = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(1.5)),
        any_json(),
    ];
    let channel = prop_oneof![
        "[CDGUT][A-Z0-9]{0,10}".prop_map(Value::from),
        ".{0,80}".prop_map(Value::from),
        any_json(),
    ];
    let text = prop_oneof![
        ".{0,64}".prop_map(Value::from),
        (0usize..3, MAX_TEXT_BYTES - 2..MAX_TEXT_BYTES + 2)
            .prop_map(|(c, n)| Value::from(["x", "é", "\u{1F600}"][c].repeat(n / [1, 2, 4][c]))),
        any_json(),
    ];
    let ids = prop_oneof![
        prop::collection::vec("U[A-Z0-9]{1,10}".prop_map(Value::from), 0..20)
            .prop_map(Value::Array),
        (MAX_PRESENCE_IDS - 1..MAX_PRESENCE_IDS + 2)
            .prop_map(|n| Value::Array((0..n).map(|i| Value::from(format!("U{i}"))).collect())),
        any_json(),
    ];
    (
        prop::option::of(kind),
        prop::option::of(id),
        prop::option::of(channel),
        prop::option::of(text),
        prop::option::of(ids),
        prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..4),
    )
        .prop_map(|(kind, id, channel, text, ids, extra)| {
            let mut frame: Map<String, Value> = extra.into_iter().collect();
            for (key, value) in [
                ("type", kind),
                ("id", id),
                ("channel", channel),
                ("text", text),
                ("ids", ids),
            ] {
                if let Some(v) = value {
                    frame.insert(key.into(), v);
                }
            }
            Value::Object(frame).to_string()
        })
}

#[test]
fn fuzz_parse_arbitrary_bytes() {
    fuzz(
        "rtm::parse(bytes)",
        cases(3_000),
        prop::collection::vec(any::<u8>(), 0..512),
        |bytes| check_frame(&String::from_utf8_lossy(&bytes)),
    );
}

#[test]
fn fuzz_parse_arbitrary_json() {
    fuzz("rtm::parse(json)", cases(3_000), any_json(), |value| {
        check_frame(&value.to_string())
    });
}

#[test]
fn fuzz_parse_rtm_shaped_frames() {
    fuzz("rtm::parse(rtm-shaped)", cases(3_000), rtm_like(), |text| {
        check_frame(&text)
    });
}

#[test]
fn fuzz_parse_mutated_frames() {
    // Valid frames with bytes flipped, cut or duplicated: close to valid, so deep in the parser.
    let valid = prop_oneof![
        Just(r#"{"id":1,"type":"message","channel":"C1","text":"hi"}"#.to_string()),
        Just(r#"{"id":2,"type":"ping","time":12}"#.to_string()),
        Just(r#"{"id":3,"type":"typing","channel":"C1"}"#.to_string()),
        Just(r#"{"type":"presence_sub","ids":["U1","U2"]}"#.to_string()),
        Just(r#"{"type":"presence_query","ids":["U1"]}"#.to_string()),
    ];
    let mutation = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6);
    fuzz(
        "rtm::parse(mutated)",
        cases(3_000),
        (valid, mutation),
        |(frame, mutations)| {
            let mut bytes = frame.into_bytes();
            for (at, byte, op) in mutations {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, byte),
                }
            }
            check_frame(&String::from_utf8_lossy(&bytes));
        },
    );
}

/// Inputs found by fuzzing or written to pin a past crash class; each must stay an error.
mod regressions {
    use super::*;

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for deep in [
            "[".repeat(100_000),
            "{\"a\":".repeat(100_000),
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!(
                r#"{{"type":"ping","x":{}1{}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            ),
        ] {
            let error = parse(&deep).unwrap_err();
            assert_eq!(error.code, mesh_rtm::ErrorCode::BadJson);
            check_error(&deep, &error);
        }
    }

    #[test]
    fn odd_numbers_and_escapes() {
        for text in [
            r#"{"type":"message","id":1e400,"channel":"C1","text":"x"}"#,
            r#"{"type":"message","id":-0,"channel":"C1","text":"x"}"#,
            r#"{"type":"message","id":18446744073709551615,"channel":"C1","text":"x"}"#,
            r#"{"type":"message","id":1,"channel":"C\u0000","text":"x"}"#,
            r#"{"type":"message","id":1,"channel":"C1","text":"\ud800"}"#,
            r#"{"type":"\ud83d\ude00","id":1}"#,
            "{\"type\":\"ping\",\"id\":1}\u{0}",
        ] {
            check_frame(text);
        }
    }
}
