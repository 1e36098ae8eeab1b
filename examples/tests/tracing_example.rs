//! The tracing example prints the spans and events it promises.

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn prints_connection_and_call_spans_and_the_events() {
    let child = Command::new(env!("CARGO_BIN_EXE_tracing"))
        .env_remove("COURIER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    // Bounded: the example stops by itself within a second or two.
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the tracing example did not finish within 60 s");
    };
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "conn{id=",
        "scheme=\"tcp\"",
        "peer=",
        ":call{actor=",
        "msg=\"kv.incr\"",
        "request=",
        "peer authenticated",
        "handshake failed",
        "limit reached",
        "peer down",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}
