//! Hostile frames from peers, over tcp and unix: oversized lengths (before
//! and after authentication), malformed CBOR in a valid call, envelopes for
//! unknown actors and messages, reference ids never exported, and a release
//! of more counts than were given. The attackers here mostly hold the key
//! (a raw `Session` that authenticates, then misbehaves). In every case the
//! node keeps serving an honest peer, which the test checks.

use std::time::Duration;

use courier::Limits;
use courier_runtime::id::{ActorId, LocalId};
use courier_runtime::session::{CloseReason, Event};
use courier_runtime::wire::{ReleaseEntry, ReplyStatus, WireRef};
use courier_tests::raw::{random_node_id, raw_config, RawConn, RawSession, Recv};
use courier_tests::*;
use serde::Serialize;

const SCHEMES: [&str; 2] = ["tcp", "unix"];
const SLACK: Duration = Duration::from_secs(5);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

async fn key_holder(addr: &str) -> RawSession {
    RawSession::connect(addr, raw_config(random_node_id(), COOKIE.as_bytes(), false))
        .await
        .expect("the key holder authenticates")
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    courier_runtime::codec::encode(v).unwrap()
}

fn text(payload: &[u8]) -> String {
    courier_runtime::codec::decode::<String>(payload).unwrap_or_default()
}

#[test]
fn oversized_frame_lengths_close_only_that_connection() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let limits = Limits {
                max_frame: 64 * 1024,
                ..Limits::default()
            };
            let (server, addr) =
                target_node(scheme, dir.path(), Duration::from_secs(5), limits).await;
            let honest = honest_node().await;
            honest_calls(&honest, &addr, 1).await.unwrap();
            let rss = rss_kib();

            // Before authentication: 4 GiB announced, and 2 KiB (over the
            // 1 KiB handshake limit).
            for len in [u32::MAX, 2048] {
                let mut c = RawConn::connect(&addr).await.unwrap();
                c.write_raw(&len.to_be_bytes()).await.unwrap();
                c.write_raw(&[0x01; 64]).await.unwrap();
                assert!(c.closed_within(SLACK).await, "{scheme}: {len} accepted");
            }
            // After authentication: over the configured 64 KiB.
            for len in [u32::MAX, 64 * 1024 + 100] {
                let mut s = key_holder(&addr).await;
                s.conn.write_raw(&len.to_be_bytes()).await.unwrap();
                s.conn.write_raw(&[0x10; 64]).await.unwrap();
                assert!(s.closed(SLACK).await.is_some(), "{scheme}: {len} accepted");
            }
            honest_calls(&honest, &addr, 3).await.unwrap();
            // Nothing was reserved for the announced lengths.
            let grown = rss_kib().saturating_sub(rss);
            assert!(grown < 32 * 1024, "{scheme}: memory grew by {grown} KiB");
            assert_eq!(
                server.stats().connections,
                1,
                "{scheme}: only the honest peer is left"
            );
            server.shutdown().await;
        }
    });
}

#[test]
fn malformed_cbor_is_answered_and_the_connection_kept() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(5),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            let mut s = key_holder(&addr).await;
            let counter = s.lookup("counter").await.unwrap();

            let mut deep = vec![0x81u8; 100_000]; // [[[[... 100,000 deep
            deep.push(0x01);
            let bad: [&[u8]; 5] = [
                b"\xff\xfe not cbor at all",
                b"\x1b\x00\x00",                         // a truncated u64
                b"\x7b\xff\xff\xff\xff\xff\xff\xff\xff", // a 2^64-byte string
                b"\x63abc",                              // a string where a number goes
                &deep,
            ];
            for payload in bad {
                let r = s
                    .call(counter, "test.counter.add", &[], payload)
                    .await
                    .unwrap();
                assert_eq!(r.status, ReplyStatus::BadPayload, "{scheme}: {payload:x?}");
                assert!(text(&r.payload).contains("Add"), "{}", text(&r.payload));
            }
            // The same connection still works.
            let r = s
                .call(counter, "test.counter.add", &[], &cbor(&Add(2)))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::Ok);
            let got: Result<u64, CounterError> =
                courier_runtime::codec::decode(&r.payload).unwrap();
            assert_eq!(got, Ok(2));
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert_eq!(server.stats().connections, 2, "{scheme}");
            server.shutdown().await;
        }
    });
}

#[test]
fn unknown_actors_messages_and_references_never_exported() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(5),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            let mut s = key_holder(&addr).await;
            let counter = s.lookup("counter").await.unwrap();
            let room = s.lookup("room").await.unwrap();
            let never = LocalId {
                index: 9_999,
                generation: 0,
            };

            let r = s
                .call(s.peer_actor(never), "test.counter.get", &[], &cbor(&()))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::UnknownActor, "{scheme}");
            let stale = LocalId {
                generation: counter.local.generation + 1,
                ..counter.local
            };
            let r = s
                .call(s.peer_actor(stale), "test.counter.get", &[], &cbor(&()))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::ActorStopped, "{scheme}");
            let r = s
                .call(counter, "test.counter.nope", &[], &cbor(&()))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::UnknownMessage, "{scheme}");

            // A reference into the node that it never exported arrives dead;
            // one into the attacker's own node arrives live and is released
            // when dropped.
            #[derive(Serialize)]
            struct JoinWire {
                member: u32,
                name: String,
            }
            let (node, incarnation) = s.peer();
            let bogus_local = WireRef {
                actor: ActorId {
                    node,
                    incarnation,
                    local: never,
                },
                lend_token: 0,
                owner_addr: String::new(),
            };
            let join = |name: &str| {
                cbor(&JoinWire {
                    member: 0,
                    name: name.into(),
                })
            };
            let r = s
                .call(room, "test.room.join", &[bogus_local], &join("ghost"))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::Ok, "{scheme}: {}", text(&r.payload));
            let own = WireRef {
                actor: ActorId {
                    node: s.own_node(),
                    incarnation: courier_runtime::id::Incarnation(7),
                    local: LocalId {
                        index: 5,
                        generation: 0,
                    },
                },
                lend_token: 0,
                owner_addr: String::new(),
            };
            let r = s
                .call(room, "test.room.join", &[own], &join("mine"))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::Ok, "{scheme}");
            assert_eq!(
                server.stats().imports,
                1,
                "{scheme}: the attacker's actor is held"
            );
            // An index past the references sent is a bad payload.
            let r = s
                .call(room, "test.room.join", &[], &join("nobody"))
                .await
                .unwrap();
            assert_eq!(r.status, ReplyStatus::BadPayload, "{scheme}");

            // Releases and acquires of ids never exported change nothing.
            s.session
                .send_release(
                    std::time::Instant::now(),
                    &[ReleaseEntry {
                        incarnation,
                        target: never,
                        count: 3,
                    }],
                )
                .unwrap();
            let acq = s
                .session
                .send_acquire(std::time::Instant::now(), s.peer_actor(never))
                .unwrap();
            s.flush().await.unwrap();
            let mut answered = false;
            while let Some(ev) = s.next_event(Duration::from_secs(2)).await {
                if let Event::Acquired { request, ok } = ev {
                    assert_eq!((request, ok), (acq, false));
                    answered = true;
                    break;
                }
            }
            assert!(answered, "{scheme}: no answer to the acquire");

            // The room lets both go: the attacker's actor is released back.
            let leave = |n: &str| cbor(&Leave(n.into()));
            s.call(room, "test.room.leave", &[], &leave("ghost"))
                .await
                .unwrap();
            s.call(room, "test.room.leave", &[], &leave("mine"))
                .await
                .unwrap();
            let mut released = false;
            while let Some(ev) = s.next_event(Duration::from_secs(2)).await {
                if let Event::Release(v) = ev {
                    assert_eq!(v.len(), 1);
                    assert_eq!((v[0].target.index, v[0].count), (5, 1));
                    released = true;
                    break;
                }
            }
            assert!(
                released,
                "{scheme}: the node never released the attacker's actor"
            );
            assert_eq!(server.stats().imports, 0);
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert_eq!(
                server.stats().connections,
                2,
                "{scheme}: the attacker is still connected"
            );
            server.shutdown().await;
        }
    });
}

#[test]
fn a_release_of_more_than_was_given_closes_that_peer() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(5),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            let mut s = key_holder(&addr).await;
            let counter = s.lookup("counter").await.unwrap();
            let holders = |node: &courier::Node| {
                node.exports()
                    .into_iter()
                    .find(|e| e.name.as_deref() == Some("counter"))
                    .map(|e| e.holders.len())
                    .unwrap_or(0)
            };
            honest_calls(&honest, &addr, 1).await.unwrap();
            assert_eq!(
                holders(&server),
                2,
                "{scheme}: the attacker and the honest peer"
            );
            s.session
                .send_release(
                    std::time::Instant::now(),
                    &[ReleaseEntry {
                        incarnation: counter.incarnation,
                        target: counter.local,
                        count: 5,
                    }],
                )
                .unwrap();
            s.flush().await.unwrap();
            match s.closed(SLACK).await {
                Some(CloseReason::PeerGoodbye(why)) => {
                    assert!(why.contains("reference protocol"), "{scheme}: {why}")
                }
                other => panic!("{scheme}: {other:?}"),
            }
            assert!(
                eventually(SLACK, || holders(&server) == 1).await,
                "{scheme}"
            );
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert_eq!(server.stats().connections, 1);
            // A fresh connection from the same key holder is fine.
            let mut again = key_holder(&addr).await;
            again.lookup("counter").await.unwrap();
            server.shutdown().await;
        }
    });
}

#[test]
fn a_frame_that_is_not_an_envelope_closes_only_that_connection() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(5),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            for body in [
                &b"\xee garbage kind"[..],
                b"",
                b"\x10\x00",
                b"\x01 a late hello",
            ] {
                let mut s = key_holder(&addr).await;
                s.conn.send_frame(body).await.unwrap();
                assert!(
                    matches!(s.closed(SLACK).await, Some(CloseReason::PeerGoodbye(_))),
                    "{scheme}: {body:x?}"
                );
                assert!(matches!(
                    s.conn.recv(Duration::from_millis(10)).await,
                    Recv::Closed
                ));
            }
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert!(eventually(SLACK, || server.stats().connections == 1).await);
            server.shutdown().await;
        }
    });
}
