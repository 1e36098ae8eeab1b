//! Handshake success and every rejection, each a typed error after which
//! the session processes nothing more.

use std::time::Duration;

use bytes::Bytes;

use super::{config, key, Pair};
use crate::error::HandshakeError;
use crate::frame::FrameError;
use crate::handshake::{Key, Keyring};
use crate::session::{CloseReason, Event, Role, Session};
use crate::wire::{self, features, Envelope, RefusalCode};

fn handshake_error(events: &[Event]) -> &HandshakeError {
    match events.last() {
        Some(Event::Closed {
            reason: CloseReason::Handshake(e),
            ..
        }) => e,
        other => panic!("expected a handshake failure, got {other:?}"),
    }
}

/// After a failure the session ignores everything: no events, no frames.
fn assert_inert(s: &mut Session, p_now: std::time::Instant) {
    assert!(s.is_closed());
    while s.poll_transmit().is_some() {}
    let call = wire::encode(&Envelope::Heartbeat { ack: 0 });
    s.handle_frame(p_now, call);
    s.handle_timeout(p_now + Duration::from_secs(3600));
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.poll_transmit(), None);
}

#[test]
fn handshake_succeeds_and_both_sides_know_each_other() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    p.drive();
    let Some(Event::Established(peer_of_a)) = p.events_a.first() else {
        panic!("{:?}", p.events_a)
    };
    let Some(Event::Established(peer_of_b)) = p.events_b.first() else {
        panic!("{:?}", p.events_b)
    };
    assert_eq!(peer_of_a.node.0, [2; 16]);
    assert_eq!(peer_of_b.node.0, [1; 16]);
    assert_eq!(peer_of_b.listen, vec!["tcp://127.0.0.1:7000".to_owned()]);
    assert_eq!(peer_of_a.key_id, "default");
    assert_eq!(peer_of_a.version, 1);
    assert!(!p.a.frame_mac());
}

#[test]
fn wrong_key_fails_on_both_sides() {
    let mut p = Pair::new(
        config(1, key("the first cookie!!")),
        config(2, key("another cookie!!!!")),
    );
    p.drive();
    let eb = handshake_error(&p.events_b);
    assert_eq!(eb, &HandshakeError::Authentication("the initiator's proof does not verify: wrong key, or a replayed or misdirected response"));
    let ea = handshake_error(&p.events_a);
    assert!(ea.is_authentication(), "{ea:?}");
    assert!(!p
        .events_a
        .iter()
        .any(|e| matches!(e, Event::Established(_))));
    assert!(!p
        .events_b
        .iter()
        .any(|e| matches!(e, Event::Established(_))));
    let now = p.now;
    assert_inert(&mut p.a, now);
    assert_inert(&mut p.b, now);
}

#[test]
fn unknown_key_id_is_an_authentication_failure() {
    let other = Key::new("other", b"0123456789abcdef".to_vec()).unwrap();
    let mut p = Pair::new(config(1, other), config(2, key("0123456789abcdef")));
    p.drive();
    assert!(handshake_error(&p.events_b).is_authentication());
    assert!(handshake_error(&p.events_a).is_authentication());
}

#[test]
fn an_old_key_is_accepted_during_rotation() {
    let old = Key::new("2025", b"the old cookie 123".to_vec()).unwrap();
    let new = Key::new("2026", b"the new cookie 456".to_vec()).unwrap();
    let mut cb = config(2, new.clone());
    cb.handshake.keyring = Keyring::with_others(new, [old.clone()]);
    let mut p = Pair::new(config(1, old), cb);
    p.drive();
    assert!(p.a.is_established() && p.b.is_established());
    assert_eq!(p.b.peer().unwrap().key_id, "2025");
}

#[test]
fn wrong_version_is_refused() {
    let mut ca = config(1, key("a shared cookie!!"));
    ca.handshake.versions = (2, 3);
    let mut p = Pair::new(ca, config(2, key("a shared cookie!!")));
    p.drive();
    assert!(matches!(
        handshake_error(&p.events_b),
        HandshakeError::Version {
            ours: (1, 1),
            theirs: (2, 3)
        }
    ));
    assert!(matches!(
        handshake_error(&p.events_a),
        HandshakeError::Refused {
            code: RefusalCode::Version,
            ..
        }
    ));
    let now = p.now;
    assert_inert(&mut p.b, now);
}

#[test]
fn replayed_response_is_rejected() {
    // Record an honest handshake.
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    let hello = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, hello.clone());
    let challenge = p.b.poll_transmit().unwrap();
    p.a.handle_frame(p.now, challenge);
    let response = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, response.clone());
    assert!(p.b.is_established());

    // Replay the transcript to a fresh acceptor: its nonce differs.
    let mut b2 = Session::new(
        config(2, key("a shared cookie!!")),
        Role::Acceptor,
        p.now,
        [0x77; 32],
        None,
    )
    .unwrap();
    b2.handle_frame(p.now, hello);
    assert!(b2.poll_transmit().is_some(), "challenge sent");
    b2.handle_frame(p.now, response);
    let ev: Vec<_> = std::iter::from_fn(|| b2.poll_event()).collect();
    assert!(handshake_error(&ev).is_authentication(), "{ev:?}");
    assert_inert(&mut b2, p.now);
}

#[test]
fn response_bound_to_another_node_is_rejected() {
    // One initiator, two acceptors with the same key but different node ids.
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    let mut b3 = Session::new(
        config(3, key("a shared cookie!!")),
        Role::Acceptor,
        p.now,
        [0xb2; 32],
        None,
    )
    .unwrap();
    let hello = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, hello.clone());
    b3.handle_frame(p.now, hello);
    let challenge_b = p.b.poll_transmit().unwrap();
    let _challenge_b3 = b3.poll_transmit().unwrap();
    p.a.handle_frame(p.now, challenge_b);
    // The response is bound to node 2; hand it to node 3.
    let response_for_b = p.a.poll_transmit().unwrap();
    b3.handle_frame(p.now, response_for_b);
    let ev: Vec<_> = std::iter::from_fn(|| b3.poll_event()).collect();
    assert!(handshake_error(&ev).is_authentication(), "{ev:?}");
}

#[test]
fn acceptor_proof_cannot_be_reflected_as_initiator_proof() {
    // A welcome's tag, replayed as a response, never verifies: the labels
    // differ by direction.
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    let hello = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, hello);
    let challenge = p.b.poll_transmit().unwrap();
    p.a.handle_frame(p.now, challenge);
    let response = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, response);
    let welcome = p.b.poll_transmit().unwrap();
    let Ok(Envelope::Welcome(tag)) = Envelope::decode(&welcome) else {
        panic!()
    };
    // Same hello and nonce, so the same transcript at a fresh acceptor.
    let mut b2 = Session::new(
        config(2, key("a shared cookie!!")),
        Role::Acceptor,
        p.now,
        [0xb2; 32],
        None,
    )
    .unwrap();
    let mut a2 = Session::new(
        config(1, key("a shared cookie!!")),
        Role::Initiator,
        p.now,
        [0xa1; 32],
        None,
    )
    .unwrap();
    b2.handle_frame(p.now, a2.poll_transmit().unwrap());
    let _ = b2.poll_transmit();
    b2.handle_frame(p.now, wire::encode(&Envelope::Response(tag)));
    let ev: Vec<_> = std::iter::from_fn(|| b2.poll_event()).collect();
    assert!(handshake_error(&ev).is_authentication(), "{ev:?}");
}

#[test]
fn oversized_frame_before_authentication_is_fatal() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    p.b.handle_frame(p.now, Bytes::from(vec![wire::kind::HELLO; 2000]));
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(
        handshake_error(&ev),
        &HandshakeError::FrameTooLarge(FrameError::TooLarge {
            len: 2000,
            max: 1024
        })
    );
    let now = p.now;
    assert_inert(&mut p.b, now);
}

#[test]
fn garbage_is_fatal() {
    for garbage in [
        &b""[..],
        b"\xee\x00\x01",
        b"\x01\x00",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut p = Pair::new(
            config(1, key("a shared cookie!!")),
            config(2, key("a shared cookie!!")),
        );
        p.b.handle_frame(p.now, Bytes::copy_from_slice(garbage));
        let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
        assert!(
            matches!(handshake_error(&ev), HandshakeError::Malformed(_)),
            "{garbage:?}: {ev:?}"
        );
        // The peer is told it broke the protocol.
        let refusal = p.b.poll_transmit().unwrap();
        assert!(matches!(
            Envelope::decode(&refusal),
            Ok(Envelope::Refusal(RefusalCode::Protocol, _))
        ));
        let now = p.now;
        assert_inert(&mut p.b, now);
    }
}

#[test]
fn application_frame_before_authentication_is_fatal() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    p.b.handle_frame(p.now, wire::encode(&Envelope::Heartbeat { ack: 0 }));
    let ev: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(
        handshake_error(&ev),
        &HandshakeError::Unexpected {
            expected: "hello",
            got: "heartbeat"
        }
    );
}

#[test]
fn deadline_passed_fails_both_sides() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    // The hello is lost: nobody moves.
    let _ = p.a.poll_transmit();
    p.advance(Duration::from_secs(11));
    assert_eq!(handshake_error(&p.events_a), &HandshakeError::Timeout);
    assert_eq!(handshake_error(&p.events_b), &HandshakeError::Timeout);
    let now = p.now;
    assert_inert(&mut p.a, now);
}

#[test]
fn connecting_to_oneself_is_refused() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(1, key("a shared cookie!!")),
    );
    p.drive();
    assert_eq!(handshake_error(&p.events_b), &HandshakeError::SelfConnect);
}

#[test]
fn frame_mac_is_on_when_either_side_asks() {
    let mut ca = config(1, key("a shared cookie!!"));
    ca.handshake.features = features::FRAME_MAC;
    let mut p = Pair::new(ca, config(2, key("a shared cookie!!")));
    p.drive();
    assert!(p.a.frame_mac() && p.b.frame_mac());
}

#[test]
fn channel_binding_must_match() {
    let now = std::time::Instant::now();
    let mut a = Session::new(
        config(1, key("a shared cookie!!")),
        Role::Initiator,
        now,
        [1; 32],
        Some([5; 32]),
    )
    .unwrap();
    let mut b = Session::new(
        config(2, key("a shared cookie!!")),
        Role::Acceptor,
        now,
        [2; 32],
        Some([6; 32]),
    )
    .unwrap();
    for _ in 0..4 {
        if let Some(f) = a.poll_transmit() {
            b.handle_frame(now, f);
        }
        if let Some(f) = b.poll_transmit() {
            a.handle_frame(now, f);
        }
    }
    let ev: Vec<_> = std::iter::from_fn(|| b.poll_event()).collect();
    assert!(handshake_error(&ev).is_authentication(), "{ev:?}");
}

#[test]
fn short_keys_are_refused() {
    assert!(matches!(
        Key::new("default", b"short".to_vec()),
        Err(HandshakeError::Config(_))
    ));
    assert!(matches!(
        Key::new("", b"0123456789abcdef".to_vec()),
        Err(HandshakeError::Config(_))
    ));
}

#[test]
fn an_evicted_handshake_is_refused_as_busy_and_inert() {
    let mut p = Pair::new(
        config(1, key("a shared cookie!!")),
        config(2, key("a shared cookie!!")),
    );
    // The hello reaches the acceptor; then the node needs the slot back.
    let hello = p.a.poll_transmit().unwrap();
    p.b.handle_frame(p.now, hello);
    while p.b.poll_transmit().is_some() {}
    p.b.evict();
    let refusal = p.b.poll_transmit().expect("a refusal");
    assert_eq!(
        wire::Envelope::decode(&refusal).unwrap(),
        Envelope::Refusal(RefusalCode::Busy, "busy".into())
    );
    let events: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(handshake_error(&events), &HandshakeError::Busy);
    let now = p.now;
    assert_inert(&mut p.b, now);
    // The initiator learns why.
    p.a.handle_frame(p.now, refusal);
    let events: Vec<Event> = std::iter::from_fn(|| p.a.poll_event()).collect();
    assert!(matches!(
        handshake_error(&events),
        HandshakeError::Refused {
            code: RefusalCode::Busy,
            ..
        }
    ));
    // Evicting an established session does nothing.
    let mut q = Pair::connected("a shared cookie!!");
    q.b.evict();
    assert!(q.b.is_established());
}
