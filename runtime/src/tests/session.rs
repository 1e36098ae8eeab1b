//! Sessions after the handshake: calls, replies, integrity, liveness.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{config, key, Pair};
use crate::error::{DeadReason, ProtocolError, RemoteError};
use crate::frame::{write_frame, FrameReader};
use crate::id::{ActorId, Incarnation, LocalId, NodeId};
use crate::session::{CloseReason, Event};
use crate::wire::{features, ReplyStatus, WireRef};

fn actor_on_b(p: &Pair) -> ActorId {
    let peer = p.a.peer().unwrap();
    ActorId {
        node: peer.node,
        incarnation: peer.incarnation,
        local: LocalId {
            index: 3,
            generation: 1,
        },
    }
}

#[test]
fn call_and_reply() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let req =
        p.a.send_call(p.now, target, "counter.add", &[], b"\x05", 0)
            .unwrap();
    assert_eq!(p.a.pending_calls(), 1);
    p.drive();
    let Some(Event::Call(call)) = p.events_b.pop() else {
        panic!("{:?}", p.events_b)
    };
    assert_eq!(call.type_name(), "counter.add");
    assert_eq!(call.header.target, target.local);
    assert_eq!(call.header.request, req);
    assert_eq!(&call.payload[..], b"\x05");
    p.b.send_reply(p.now, call.header.request, ReplyStatus::Ok, &[], b"\x06", 0)
        .unwrap();
    p.drive();
    let Some(Event::Reply(reply)) = p.events_a.pop() else {
        panic!("{:?}", p.events_a)
    };
    assert_eq!(reply.request, req);
    assert_eq!(reply.status, ReplyStatus::Ok);
    assert_eq!(&reply.payload[..], b"\x06");
    assert_eq!(p.a.pending_calls(), 0);
}

#[test]
fn cast_and_references_in_the_header() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let r = WireRef {
        actor: ActorId {
            node: NodeId([1; 16]),
            incarnation: Incarnation(100),
            local: LocalId {
                index: 9,
                generation: 0,
            },
        },
        lend_token: 0,
        owner_addr: String::new(),
    };
    p.a.send_cast(
        p.now,
        target,
        "chat.join",
        std::slice::from_ref(&r),
        b"\x00",
        0,
    )
    .unwrap();
    p.drive();
    let Some(Event::Cast(c)) = p.events_b.pop() else {
        panic!("{:?}", p.events_b)
    };
    assert_eq!(c.refs, vec![r]);
    assert_eq!(c.header.request, 0);
}

#[test]
fn calls_through_a_byte_stream_fed_one_byte_at_a_time() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    for i in 0..10u8 {
        p.a.send_call(p.now, target, "x.y", &[], &[i; 100], 0)
            .unwrap();
    }
    let mut wire = BytesMut::new();
    while let Some(f) = p.a.poll_transmit() {
        write_frame(&mut wire, &f, 1 << 20).unwrap();
    }
    let mut r = FrameReader::new(p.b.max_frame_len());
    for b in wire.iter() {
        r.push(&[*b]);
        while let Some(f) = r.next_frame().unwrap() {
            p.b.handle_frame(p.now, f);
        }
    }
    let calls: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(calls.len(), 10);
    for (i, ev) in calls.iter().enumerate() {
        let Event::Call(c) = ev else { panic!("{ev:?}") };
        assert_eq!(&c.payload[..], &[i as u8; 100][..]);
    }
}

#[test]
fn a_reference_from_an_old_incarnation_is_dead() {
    let mut p = Pair::connected("a shared cookie!!");
    let mut target = actor_on_b(&p);
    target.incarnation = Incarnation(1);
    assert_eq!(
        p.a.send_call(p.now, target, "x.y", &[], b"", 0),
        Err(RemoteError::DeadReference {
            actor: target,
            reason: DeadReason::OldIncarnation
        })
    );
}

#[test]
fn limits_give_typed_errors() {
    let mut ca = config(1, key("a shared cookie!!"));
    ca.max_pending_calls = 2;
    ca.max_frame = 1000;
    let mut p = Pair::new(ca, config(2, key("a shared cookie!!")));
    p.drive();
    let target = actor_on_b(&p);
    assert!(matches!(
        p.a.send_call(p.now, target, "x.y", &[], &[0; 2000], 0),
        Err(RemoteError::TooLarge { max: 1000, .. })
    ));
    p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    assert!(matches!(
        p.a.send_call(p.now, target, "x.y", &[], b"", 0),
        Err(RemoteError::LimitReached { max: 2, .. })
    ));
    assert!(matches!(
        p.a.send_call(p.now, target, "bad name", &[], b"", 0),
        Err(RemoteError::Codec { .. })
    ));
}

#[test]
fn closing_fails_pending_calls_on_both_ends() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let r1 = p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    let r2 = p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    p.drive();
    p.b.close(p.now, "shutting down");
    p.drive();
    // The goodbye is noted; the session ends with the link.
    assert!(p.a.peer_said_goodbye() && !p.a.is_closed());
    p.a.handle_link_lost("end of stream");
    p.drive();
    assert_eq!(
        p.events_a.last(),
        Some(&Event::Closed {
            reason: CloseReason::PeerGoodbye("shutting down".into()),
            pending: vec![r1, r2]
        })
    );
    assert!(matches!(
        p.events_b.last(),
        Some(Event::Closed {
            reason: CloseReason::LocalClose(_),
            ..
        })
    ));
}

#[test]
fn link_loss_fails_pending_calls() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let r1 = p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    p.a.handle_link_lost("connection reset");
    assert_eq!(
        p.a.poll_event(),
        Some(Event::Closed {
            reason: CloseReason::LinkLost("connection reset".into()),
            pending: vec![r1]
        })
    );
}

#[test]
fn heartbeats_keep_an_idle_session_alive() {
    let mut p = Pair::connected("a shared cookie!!");
    p.advance(Duration::from_secs(60));
    assert!(p.a.is_established() && p.b.is_established());
    assert!(p.events_a.is_empty() && p.events_b.is_empty());
}

#[test]
fn a_silent_peer_is_declared_dead_within_the_timeout() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let r = p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    let _ = p.a.poll_transmit();
    // b is frozen (SIGSTOP): a hears nothing from now on.
    let start = p.now;
    for _ in 0..100 {
        while p.a.poll_transmit().is_some() {}
        let Some(t) = p.a.poll_timeout() else { break };
        p.now = t;
        p.a.handle_timeout(t);
        if p.a.is_closed() {
            break;
        }
    }
    let ev: Vec<_> = std::iter::from_fn(|| p.a.poll_event()).collect();
    let Some(Event::Closed {
        reason: CloseReason::HeartbeatTimeout { silent_for },
        pending,
    }) = ev.last()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(pending, &vec![r]);
    assert_eq!(*silent_for, Duration::from_secs(3));
    assert!(p.now - start <= Duration::from_secs(3));
}

#[test]
fn a_late_reply_is_dropped_and_an_invented_one_is_fatal() {
    let mut p = Pair::connected("a shared cookie!!");
    let target = actor_on_b(&p);
    let r = p.a.send_call(p.now, target, "x.y", &[], b"", 0).unwrap();
    p.drive();
    p.a.cancel_call(r);
    p.b.send_reply(p.now, r, ReplyStatus::Ok, &[], b"", 0)
        .unwrap();
    p.drive();
    assert!(p.events_a.is_empty());
    assert_eq!(p.a.stats().late_replies, 1);
    p.b.send_reply(p.now, 999, ReplyStatus::Ok, &[], b"", 0)
        .unwrap();
    p.drive();
    assert!(matches!(
        p.events_a.last(),
        Some(Event::Closed {
            reason: CloseReason::Protocol(ProtocolError::UnknownRequest(999)),
            ..
        })
    ));
}

#[test]
fn garbage_after_authentication_closes_with_a_protocol_error() {
    let mut p = Pair::connected("a shared cookie!!");
    p.b.handle_frame(p.now, Bytes::from_static(b"\x10\x00"));
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(matches!(
        ev.last(),
        Some(Event::Closed {
            reason: CloseReason::Protocol(ProtocolError::Malformed(_)),
            ..
        })
    ));
}

fn mac_pair() -> Pair {
    let mut ca = config(1, key("a shared cookie!!"));
    ca.handshake.features = features::FRAME_MAC;
    let mut p = Pair::new(ca, config(2, key("a shared cookie!!")));
    p.drive();
    p.events_a.clear();
    p.events_b.clear();
    p
}

#[test]
fn with_frame_macs_calls_flow() {
    let mut p = mac_pair();
    let target = actor_on_b(&p);
    p.a.send_call(p.now, target, "x.y", &[], b"hi", 0).unwrap();
    p.drive();
    assert!(matches!(p.events_b.last(), Some(Event::Call(_))));
}

#[test]
fn an_altered_frame_is_detected() {
    let mut p = mac_pair();
    let target = actor_on_b(&p);
    p.a.send_call(p.now, target, "x.y", &[], b"pay 10", 0)
        .unwrap();
    let f = p.a.poll_transmit().unwrap();
    let mut bad = f.to_vec();
    let i = bad.len() - 33;
    bad[i] ^= 1;
    p.b.handle_frame(p.now, Bytes::from(bad));
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(
        matches!(
            ev.last(),
            Some(Event::Closed {
                reason: CloseReason::Protocol(ProtocolError::BadMac { seq: 0 }),
                ..
            })
        ),
        "{ev:?}"
    );
}

#[test]
fn a_replayed_or_reordered_frame_is_detected() {
    let mut p = mac_pair();
    let target = actor_on_b(&p);
    p.a.send_call(p.now, target, "x.y", &[], b"one", 0).unwrap();
    let f = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, f.clone());
    p.b.handle_frame(p.now, f);
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(matches!(ev[0], Event::Call(_)));
    assert!(matches!(
        ev.last(),
        Some(Event::Closed {
            reason: CloseReason::Protocol(ProtocolError::BadMac { seq: 1 }),
            ..
        })
    ));
}

#[test]
fn an_injected_frame_is_detected() {
    let mut p = mac_pair();
    // An on-path attacker without the session key forges a frame.
    let mut forged = BytesMut::new();
    crate::wire::encode_control(&mut forged, &crate::wire::Envelope::Heartbeat { ack: 0 });
    forged.extend_from_slice(&[0u8; 32]);
    p.b.handle_frame(p.now, forged.freeze());
    assert!(p.b.is_closed());
}

/// A cast frame with one blob beside its payload, as a peer would send it.
fn cast_with_a_blob(p: &Pair) -> Bytes {
    let target = actor_on_b(p);
    let header = crate::wire::CallHeader {
        request: 0,
        incarnation: target.incarnation,
        target: target.local,
        fds: 0,
    };
    let blob = Bytes::from_static(b"bulk bytes");
    let mut out = BytesMut::new();
    crate::wire::encode_call_head(&mut out, &header, "x.y", &[], std::slice::from_ref(&blob));
    out.extend_from_slice(b"\x00");
    out.extend_from_slice(&blob);
    out.freeze()
}

#[test]
fn blobs_are_taken_only_when_the_handshake_agreed_to_them() {
    // Neither side offered blobs.
    let mut p = Pair::connected("a shared cookie!!");
    let frame = cast_with_a_blob(&p);
    p.b.handle_frame(p.now, frame);
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(
        matches!(
            ev.last(),
            Some(Event::Closed {
                reason: CloseReason::Protocol(ProtocolError::Malformed(_)),
                ..
            })
        ),
        "{ev:?}"
    );

    // Both did.
    let mut ca = config(1, key("a shared cookie!!"));
    let mut cb = config(2, key("a shared cookie!!"));
    ca.handshake.features = features::BLOBS;
    cb.handshake.features = features::BLOBS;
    let mut p = Pair::new(ca, cb);
    p.drive();
    p.events_b.clear();
    let frame = cast_with_a_blob(&p);
    p.b.handle_frame(p.now, frame);
    let Some(Event::Cast(c)) = p.b.poll_event() else {
        panic!("a cast")
    };
    assert_eq!(c.blobs, vec![Bytes::from_static(b"bulk bytes")]);
    assert_eq!(&c.payload[..], b"\x00");
}
