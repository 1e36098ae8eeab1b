//! The cost of frame MACs: one session sends a one-way message, the other
//! receives and decodes it, with and without HMAC-SHA256 frame tags, for a
//! 64-byte and a 1 MiB payload. Run with
//! `cargo bench -p courier-runtime --bench mac`.

use std::hint::black_box;
use std::time::Instant;

use courier_runtime::handshake::{HandshakeConfig, Key, Keyring};
use courier_runtime::id::{ActorId, Incarnation, LocalId, NodeId};
use courier_runtime::session::{Event, Role, Session, SessionConfig};
use courier_runtime::wire::features;

fn pair(mac: bool) -> (Session, Session) {
    let cfg = |n: u8| {
        let key = Key::new("default", b"a benchmark cookie!".to_vec()).unwrap();
        let mut hs =
            HandshakeConfig::new(NodeId([n; 16]), Incarnation(n as u64), Keyring::single(key));
        hs.features = if mac { features::FRAME_MAC } else { 0 };
        SessionConfig::new(hs)
    };
    let now = Instant::now();
    let mut a = Session::new(cfg(1), Role::Initiator, now, [1; 32], None).unwrap();
    let mut b = Session::new(cfg(2), Role::Acceptor, now, [2; 32], None).unwrap();
    for _ in 0..4 {
        while let Some(f) = a.poll_transmit() {
            b.handle_frame(now, f);
        }
        while let Some(f) = b.poll_transmit() {
            a.handle_frame(now, f);
        }
    }
    while a.poll_event().is_some() {}
    while b.poll_event().is_some() {}
    assert!(a.is_established() && b.is_established());
    assert_eq!(a.frame_mac(), mac);
    (a, b)
}

/// Nanoseconds per frame sent by `a` and received by `b`.
fn measure(mac: bool, payload: &[u8], iters: u32) -> f64 {
    let (mut a, mut b) = pair(mac);
    let target = ActorId {
        node: NodeId([2; 16]),
        incarnation: Incarnation(2),
        local: LocalId {
            index: 1,
            generation: 0,
        },
    };
    let now = Instant::now();
    let mut one = || {
        a.send_cast(now, target, "bench.msg", &[], payload, 0)
            .unwrap();
        let f = a.poll_transmit().unwrap();
        b.handle_frame(now, f);
        match b.poll_event() {
            Some(Event::Cast(c)) => {
                black_box(c);
            }
            other => panic!("{other:?}"),
        }
    };
    for _ in 0..iters / 10 + 1 {
        one();
    }
    let t = Instant::now();
    for _ in 0..iters {
        one();
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let small = vec![0x42u8; 64];
    let large = vec![0x42u8; 1 << 20];
    for (name, payload, iters) in [("64 B", &small, 200_000), ("1 MiB", &large, 200)] {
        let plain = measure(false, payload, iters);
        let mac = measure(true, payload, iters);
        println!(
            "{name:>6} frame: {plain:>12.0} ns without MAC, {mac:>12.0} ns with MAC: +{:.0} ns ({:.2}x){}",
            mac - plain,
            mac / plain,
            if payload.len() > 1000 {
                format!(", MAC throughput {:.0} MiB/s", (payload.len() as f64 / (1 << 20) as f64) / ((mac - plain) * 1e-9))
            } else {
                String::new()
            }
        );
    }
}
