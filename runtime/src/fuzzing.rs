//! Entry points for the fuzz targets in `runtime/fuzz/` and their seed
//! corpus. Hidden: built for the crate's own tests and with the test-only
//! feature `__fuzzing`; not part of the API.
//!
//! Each entry point takes arbitrary bytes, drives one decoder or state
//! machine with them, and panics only when an invariant breaks (a panic here
//! is a finding). Everything is deterministic: fixed node ids, keys and
//! nonces, a clock advanced by the input, so a crash replays exactly and
//! real frames recorded by [`seeds`] steer the fuzzer through the handshake.
//!
//! Input layout of [`session`]: one mode byte (`0` acceptor, `1` acceptor
//! with frame MACs, `2` initiator, `3` initiator with frame MACs), then
//! records of `u16 big-endian length || bytes`. A length of `0xffff` is not
//! a frame but a clock step: the next byte times 100 ms pass, and the
//! session's timer fires.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::frame::{FrameError, FrameReader, PREFIX_LEN};
use crate::handshake::{HandshakeConfig, Key, Keyring};
use crate::id::{ActorId, Incarnation, LocalId, NodeId};
use crate::session::{Event, Role, Session, SessionConfig};
use crate::wire::{self, features, Envelope, ReleaseEntry, ReplyStatus, WireRef};

/// The record length that means "advance the clock" in [`session`] inputs.
pub const CLOCK_STEP: u16 = 0xffff;

/// Feeds `data` to a [`FrameReader`] in pieces and checks every frame
/// against a naive reference parser. Byte 0 sets the limit (times 8),
/// byte 1 the piece size.
pub fn frames(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let max = data[0] as usize * 8;
    let piece = (data[1] as usize % 64) + 1;
    let input = &data[2..];

    // Reference: the whole input at once, by hand.
    let mut want = Vec::new();
    let mut want_err = None;
    let mut pos = 0;
    while input.len() - pos >= PREFIX_LEN {
        let len = u32::from_be_bytes(input[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len > max {
            want_err = Some(FrameError::TooLarge { len, max });
            break;
        }
        if input.len() - pos - PREFIX_LEN < len {
            break;
        }
        want.push(&input[pos + PREFIX_LEN..pos + PREFIX_LEN + len]);
        pos += PREFIX_LEN + len;
    }

    let mut r = FrameReader::new(max);
    let mut got: Vec<Bytes> = Vec::new();
    let mut got_err = None;
    'feed: for chunk in input.chunks(piece) {
        r.push(chunk);
        loop {
            match r.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.len() <= max, "frame over the limit");
                    got.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(r.buffered() <= input.len(), "buffered more than was fed");
    }
    assert_eq!(got_err, want_err, "error differs from the reference");
    assert_eq!(
        got.len(),
        want.len(),
        "frame count differs from the reference"
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[..], *w);
    }
}

/// Decodes `data` as an envelope; whatever decodes must encode back to the
/// same bytes and decode again to the same value.
pub fn envelope(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(env) = Envelope::decode(&bytes) {
        let again = wire::encode(&env);
        assert_eq!(&again[..], data, "re-encoding {env:?} changed the bytes");
        assert_eq!(Envelope::decode(&again).as_ref(), Ok(&env));
    }
}

/// A payload type with most serde shapes, for [`cbor`].
#[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Shapes {
    Unit,
    Newtype(u64),
    Tuple(i32, String, Option<bool>),
    Struct {
        name: String,
        list: Vec<Shapes>,
        map: std::collections::BTreeMap<String, i64>,
        #[serde(with = "bytes_as_cbor_bytes")]
        blob: Vec<u8>,
        float: f64,
        small: (u8, i16, char),
    },
}

mod bytes_as_cbor_bytes {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Decodes `data` as CBOR payloads of several types with
/// [`crate::codec::decode`]; typed values must round-trip.
pub fn cbor(data: &[u8]) {
    let _ = crate::codec::decode::<ciborium::value::Value>(data);
    let _ = crate::codec::decode::<String>(data);
    let _ = crate::codec::decode::<Vec<u64>>(data);
    let _ = crate::codec::decode::<Option<(u8, u16, u32)>>(data);
    if let Ok(v) = crate::codec::decode::<Shapes>(data) {
        let bytes = crate::codec::encode(&v).expect("a decoded value encodes");
        let again: Shapes = crate::codec::decode(&bytes).expect("an encoded value decodes");
        // NaN is never equal to itself; compare the encodings instead.
        assert_eq!(crate::codec::encode(&again).expect("encodes"), bytes);
    }
}

/// The two ends the [`session`] harness uses: the session under test and the
/// genuine peer that [`seeds`] records real frames from.
fn configs(mode: u8) -> (SessionConfig, Role, SessionConfig) {
    let key = Key::new("default", b"courier fuzzing cookie".to_vec()).expect("valid key");
    let mac = mode & 1 == 1;
    let mk = |n: u8| {
        let mut hs = HandshakeConfig::new(
            NodeId([n; 16]),
            Incarnation(n as u64 * 100 + 1),
            Keyring::single(key.clone()),
        );
        hs.listen = vec![format!("tcp://127.0.0.{n}:7000")];
        hs.features = if mac { features::FRAME_MAC } else { 0 };
        let mut c = SessionConfig::new(hs);
        c.max_frame = 64 * 1024;
        c.max_pending_calls = 16;
        c
    };
    let role = if mode & 2 == 0 {
        Role::Acceptor
    } else {
        Role::Initiator
    };
    (mk(1), role, mk(2))
}

fn nonce(role: Role) -> [u8; 32] {
    match role {
        Role::Initiator => [0x11; 32],
        Role::Acceptor => [0x22; 32],
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Initiator => Role::Acceptor,
        Role::Acceptor => Role::Initiator,
    }
}

/// What the session under test does once established, so that replies and
/// acquire answers from the peer have something to match.
fn on_established(s: &mut Session, now: Instant) {
    let Some(peer) = s.peer().cloned() else {
        return;
    };
    let target = ActorId {
        node: peer.node,
        incarnation: peer.incarnation,
        local: LocalId {
            index: 1,
            generation: 0,
        },
    };
    let _ = s.send_call(now, target, "fuzz.echo", &[], b"\x01", 0);
    let _ = s.send_call(now, target, "fuzz.echo", &[], b"\x02", 0);
    let _ = s.send_acquire(now, target);
}

fn is_application(e: &Event) -> bool {
    !matches!(e, Event::Established(_) | Event::Closed { .. })
}

/// Drives a session (acceptor or initiator, with or without frame MACs)
/// with arbitrary frames and clock steps; see the module docs for the
/// layout. Checks that nothing but the handshake is processed before
/// authentication, that a closed session stays inert, and that the
/// session's queues stay bounded.
pub fn session(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let (cfg, role, _) = configs(mode % 4);
    let start = Instant::now();
    let mut now = start;
    let mut s = Session::new(cfg, role, now, nonce(role), None).expect("valid config");
    let mut established = false;
    let mut closed = false;
    let mut fed = 0usize;
    let mut out = 0usize;
    while rest.len() >= 2 {
        let len = u16::from_be_bytes([rest[0], rest[1]]);
        rest = &rest[2..];
        if len == CLOCK_STEP {
            let Some((&step, r)) = rest.split_first() else {
                break;
            };
            rest = r;
            now += Duration::from_millis(100) * u32::from(step);
            s.handle_timeout(now);
        } else {
            let n = (len as usize).min(rest.len());
            let frame = Bytes::copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            fed += 1;
            s.handle_frame(now, frame);
        }
        while let Some(e) = s.poll_event() {
            assert!(!closed, "event after the session closed: {e:?}");
            match &e {
                Event::Established(_) => {
                    assert!(!established, "established twice");
                    established = true;
                    on_established(&mut s, now);
                }
                Event::Closed { .. } => closed = true,
                e => assert!(established, "{e:?} before authentication"),
            }
            assert!(!is_application(&e) || s.is_established() || closed);
        }
        while s.poll_transmit().is_some() {
            out += 1;
        }
        // Each input frame or clock step makes a bounded number of frames:
        // a reply to the handshake, a heartbeat, a goodbye, plus the three
        // sent once established.
        assert!(out <= 2 * fed + 8 + (now - start).as_millis() as usize / 100);
        assert_eq!(closed, s.is_closed());
    }
}

/// Appends one [`session`] record.
fn record(out: &mut Vec<u8>, frame: &[u8]) {
    let len = frame.len().min(CLOCK_STEP as usize - 1);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&frame[..len]);
}

/// A wire reference to an actor of node `n`.
fn wire_ref(n: u8) -> WireRef {
    WireRef {
        actor: ActorId {
            node: NodeId([n; 16]),
            incarnation: Incarnation(n as u64 * 100 + 1),
            local: LocalId {
                index: 4,
                generation: 1,
            },
        },
        lend_token: 0,
        owner_addr: String::new(),
    }
}

/// The fuzz targets, by the names `runtime/fuzz` gives them.
pub const TARGETS: [&str; 4] = ["frame", "handshake", "envelope", "cbor"];

/// Runs the entry point of fuzz target `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "frame" => frames(data),
        "handshake" => session(data),
        "envelope" => envelope(data),
        "cbor" => cbor(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Real frames for every target, named `(target, name, bytes)`: a genuine
/// peer and the harness's session run a handshake, calls with references,
/// replies, releases, acquires and a goodbye, and every frame the harness
/// session receives is recorded.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut bodies: Vec<Bytes> = Vec::new();
    for mode in 0..4u8 {
        let (cfg, role, peer_cfg) = configs(mode);
        let now = Instant::now();
        let mut s = Session::new(cfg, role, now, nonce(role), None).expect("valid");
        let mut g =
            Session::new(peer_cfg, other(role), now, nonce(other(role)), None).expect("valid");
        let mut input = vec![mode];
        let mut to_s: Vec<Bytes> = Vec::new();
        let mut sent_app = false;
        for _ in 0..32 {
            let mut moved = false;
            while let Some(f) = s.poll_transmit() {
                moved = true;
                g.handle_frame(now, f);
            }
            while let Some(f) = g.poll_transmit() {
                moved = true;
                to_s.push(f.clone());
                record(&mut input, &f);
                s.handle_frame(now, f);
            }
            while let Some(e) = s.poll_event() {
                if matches!(e, Event::Established(_)) {
                    on_established(&mut s, now);
                }
            }
            while let Some(e) = g.poll_event() {
                if let Event::Call(c) = e {
                    let _ = g.send_reply(now, c.header.request, ReplyStatus::Ok, &[], b"\x03", 0);
                }
            }
            if !moved && g.is_established() && !sent_app {
                sent_app = true;
                // An actor of the harness session's node.
                let target = ActorId {
                    node: NodeId([1; 16]),
                    incarnation: Incarnation(101),
                    local: LocalId {
                        index: 2,
                        generation: 0,
                    },
                };
                let refs = [wire_ref(2), wire_ref(7)];
                let _ = g.send_call(now, target, "fuzz.call", &refs, b"\xa1\x61x\x01", 0);
                let _ = g.send_cast(now, target, "fuzz.cast", &[], b"\x80", 0);
                let _ = g.send_release(
                    now,
                    &[ReleaseEntry {
                        incarnation: target.incarnation,
                        target: target.local,
                        count: 2,
                    }],
                );
                let _ = g.send_acquire(now, target);
                let _ = g.send_unlend(now, 9);
                let _ = g.send_down(now, target);
                let _ = g.send_acquired(now, 1, true);
            } else if !moved && sent_app {
                break;
            }
        }
        // The clock: a heartbeat interval, then silence past the timeout.
        let mut with_clock = input.clone();
        with_clock.extend_from_slice(&CLOCK_STEP.to_be_bytes());
        with_clock.push(12);
        with_clock.extend_from_slice(&CLOCK_STEP.to_be_bytes());
        with_clock.push(40);
        out.push(("handshake", format!("mode{mode}-full"), input));
        out.push(("handshake", format!("mode{mode}-clock"), with_clock));
        g.close(now, "done");
        if let Some(f) = g.poll_transmit() {
            let mut bye = vec![mode];
            for f in &to_s {
                record(&mut bye, f);
            }
            record(&mut bye, &f);
            out.push(("handshake", format!("mode{mode}-goodbye"), bye));
        }
        bodies.extend(to_s);
    }

    // Envelopes: every body seen above, MAC tags cut off where present
    // (they would be trailing bytes), plus the handshake kinds.
    for (i, b) in bodies.iter().enumerate() {
        let body = match Envelope::decode(b) {
            Ok(_) => b.clone(),
            Err(_) if b.len() > wire::TAG_LEN => b.slice(..b.len() - wire::TAG_LEN),
            Err(_) => continue,
        };
        out.push(("envelope", format!("body{i:02}"), body.to_vec()));
    }
    let refusal = wire::encode(&Envelope::Refusal(
        wire::RefusalCode::Authentication,
        "authentication failed".into(),
    ));
    out.push(("envelope", "refusal".into(), refusal.to_vec()));

    // Frames: the bodies behind length prefixes, under a few limits.
    let mut stream = BytesMut::new();
    for b in bodies.iter().take(8) {
        crate::frame::write_frame(&mut stream, b, 1 << 20).expect("fits");
    }
    for (max, piece) in [(255u8, 0u8), (255, 7), (16, 1), (128, 63)] {
        let mut v = vec![max, piece];
        v.extend_from_slice(&stream);
        out.push(("frame", format!("stream-max{max}-piece{piece}"), v));
    }

    // CBOR payloads: real encodings of every shape.
    let mut map = std::collections::BTreeMap::new();
    map.insert("a".to_owned(), -5i64);
    let values = [
        Shapes::Unit,
        Shapes::Newtype(u64::MAX),
        Shapes::Tuple(-1, "héllo".into(), Some(true)),
        Shapes::Struct {
            name: "n".into(),
            list: vec![Shapes::Unit, Shapes::Newtype(3)],
            map,
            blob: vec![0, 1, 2, 255],
            float: 1.5,
            small: (7, -300, 'λ'),
        },
    ];
    for (i, v) in values.iter().enumerate() {
        out.push((
            "cbor",
            format!("shape{i}"),
            crate::codec::encode(v).expect("encodes"),
        ));
    }
    out.push((
        "cbor",
        "vec".into(),
        crate::codec::encode(&vec![1u64, 2, 3]).expect("encodes"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds exercise every target without tripping an invariant, and
    /// the session seeds really get through the handshake.
    #[test]
    fn seeds_run_clean() {
        let seeds = seeds();
        for (target, _, data) in &seeds {
            run(target, data);
        }
        for t in TARGETS {
            assert!(seeds.iter().any(|(x, _, _)| *x == t), "no seed for {t}");
        }
    }

    /// Every input a fuzz target ever crashed on (kept under
    /// `runtime/fuzz/regressions/<target>/`) now runs clean.
    #[test]
    fn fuzz_regressions_run_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut n = 0;
        for t in TARGETS {
            let Ok(files) = std::fs::read_dir(dir.join(t)) else {
                continue;
            };
            for f in files {
                let path = f.unwrap().path();
                run(t, &std::fs::read(&path).unwrap());
                n += 1;
            }
        }
        assert!(n > 0, "no regression inputs under {}", dir.display());
    }

    #[test]
    fn session_seeds_reach_the_open_state() {
        for (_, name, data) in seeds()
            .iter()
            .filter(|(t, n, _)| *t == "handshake" && n.ends_with("full"))
        {
            let (cfg, role, _) = configs(data[0]);
            let now = Instant::now();
            let mut s = Session::new(cfg, role, now, nonce(role), None).unwrap();
            let mut rest = &data[1..];
            let mut calls = 0;
            while rest.len() >= 2 {
                let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                s.handle_frame(now, Bytes::copy_from_slice(&rest[2..2 + len]));
                rest = &rest[2 + len..];
                while let Some(e) = s.poll_event() {
                    match e {
                        Event::Established(_) => on_established(&mut s, now),
                        Event::Call(_) | Event::Cast(_) => calls += 1,
                        _ => {}
                    }
                }
            }
            assert!(s.is_established(), "{name}");
            assert_eq!(calls, 2, "{name}");
        }
    }
}
