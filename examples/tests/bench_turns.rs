//! The benchmark's round trips: each implementation in a process of its
//! own, taking turns, and those processes refusing what they do not know.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_bench");

/// Runs the benchmark with `args`, `input` on its standard input; bounded.
fn bench(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(BENCH)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the benchmark runs");
    let mut stdin = child.stdin.take().expect("piped");
    // A process that refuses its arguments may be gone before it reads.
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(300)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("bench {args:?} did not finish within 300 s");
    };
    out.expect("the benchmark's output")
}

#[test]
fn round_trips_of_all_three_come_from_processes_taking_turns() {
    let out = bench(&["--quick", "--only", "rtt", "--transports", "unix"], "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for imp in ["raw", "raw+cbor", "courier"] {
        for stat in ["p50", "p99"] {
            let line = text
                .lines()
                .find(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.get(..4) == Some(&["unix", "rtt", imp, stat][..])
                })
                .unwrap_or_else(|| panic!("no {imp} {stat} in:\n{text}"));
            let value: f64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
            assert!(value > 0.0, "{line}");
        }
    }
    assert!(
        text.contains("unix   round trip vs raw"),
        "no ratio in:\n{text}"
    );
}

#[test]
fn a_round_trip_process_says_ready_and_done_then_reports() {
    let out = bench(
        &["--rtt-side", "raw", "unix", "20", "any"],
        "run 7\nrun 13\nend\n",
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["ready", "done", "done"], "{text}");
    assert!(lines[3].starts_with("unix rtt raw p50 "), "{text}");
    assert!(lines[4].starts_with("unix rtt raw p99 "), "{text}");
}

#[test]
fn a_round_trip_process_refuses_what_it_does_not_know() {
    for (args, input, says) in [
        (
            &["raw", "unix", "10", "any"][..],
            "jump\n",
            "unknown order \"jump\"",
        ),
        (
            &["raw", "unix", "10", "any"][..],
            "run many\n",
            "unknown order \"run many\"",
        ),
        (
            &["nothing", "unix", "10", "any"][..],
            "",
            "no implementation \"nothing\"",
        ),
        (
            &["raw", "carrier", "10", "any"][..],
            "",
            "unknown transport \"carrier\"",
        ),
        (
            &["raw", "unix", "ten", "any"][..],
            "",
            "not a count: \"ten\"",
        ),
        (
            &["raw", "unix", "10", "first"][..],
            "",
            "not a processor: \"first\"",
        ),
        (&["raw", "unix", "10"][..], "", "usage: --rtt-side"),
    ] {
        let mut all = vec!["--rtt-side"];
        all.extend_from_slice(args);
        let out = bench(&all, input);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(err.contains(says), "{args:?}: {err}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(" rtt "), "{args:?} reported samples: {text}");
    }
}
