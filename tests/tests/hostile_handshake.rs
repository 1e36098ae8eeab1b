//! Hostile clients before authentication, over tcp and unix: a wrong key, a
//! truncated handshake, a replayed transcript, a response bound to another
//! node, a client that sends nothing, one that dribbles a byte a second, and
//! a crowd of clients that never finish the handshake. In every case the
//! node keeps serving an honest peer, which the test checks during and
//! after the attack.

use std::time::{Duration, Instant};

use courier::Limits;
use courier_runtime::session::{Role, Session};
use courier_runtime::wire::{Envelope, RefusalCode};
use courier_tests::raw::{random_node_id, raw_config, RawConn, RawSession, Recv};
use courier_tests::*;

const SCHEMES: [&str; 2] = ["tcp", "unix"];
/// Room for a slow, shared machine on top of a protocol deadline.
const SLACK: Duration = Duration::from_secs(5);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

fn nonce() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

/// A genuine initiator holding the right key, driven by hand.
fn genuine_initiator() -> Session {
    Session::new(
        raw_config(random_node_id(), COOKIE.as_bytes(), false),
        Role::Initiator,
        Instant::now(),
        nonce(),
        None,
    )
    .unwrap()
}

async fn expect_refusal(conn: &mut RawConn, code: RefusalCode) {
    match conn.recv(SLACK).await {
        Recv::Frame(f) => match Envelope::decode(&f) {
            Ok(Envelope::Refusal(c, _)) => assert_eq!(c, code),
            other => panic!("expected a refusal, got {other:?}"),
        },
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(conn.closed_within(SLACK).await, "closed after the refusal");
}

#[test]
fn a_wrong_key_is_refused_and_others_are_served() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(2),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            honest_calls(&honest, &addr, 3).await.unwrap();
            for _ in 0..5 {
                let cfg = raw_config(random_node_id(), b"not the cookie, but 16+ bytes", false);
                let e = RawSession::connect(&addr, cfg).await.unwrap_err();
                assert!(e.contains("Authentication"), "{scheme}: {e}");
                honest_calls(&honest, &addr, 1).await.unwrap();
            }
            assert!(
                eventually(SLACK, || server.stats().handshakes_failed == 5).await,
                "{scheme}: {:?}",
                server.stats()
            );
            assert_eq!(server.stats().connections, 1, "only the honest peer");
            server.shutdown().await;
        }
    });
}

#[test]
fn truncated_handshakes_are_dropped() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(1),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;
            let hello = genuine_initiator().poll_transmit().unwrap();

            // Half a hello, then the client goes away.
            let mut c = RawConn::connect(&addr).await.unwrap();
            let whole = c.frame_bytes(&hello);
            let bytes = whole[..whole.len() / 2].to_vec();
            c.write_raw(&bytes).await.unwrap();
            drop(c);

            // Half a hello, and the client stays: the deadline closes it.
            let mut stuck = RawConn::connect(&addr).await.unwrap();
            stuck.write_raw(&bytes).await.unwrap();
            // A whole hello and no response: the deadline again.
            let mut mute = RawConn::connect(&addr).await.unwrap();
            mute.send_frame(&hello).await.unwrap();
            assert!(
                matches!(mute.recv(SLACK).await, Recv::Frame(_)),
                "a challenge"
            );

            let t = Instant::now();
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert!(stuck.closed_within(Duration::from_secs(1) + SLACK).await);
            assert!(mute.closed_within(Duration::from_secs(1) + SLACK).await);
            assert!(t.elapsed() < Duration::from_secs(1) + SLACK);
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert!(
                eventually(SLACK, || server.stats().handshakes_failed == 3).await,
                "{scheme}: {:?}",
                server.stats()
            );
            assert_eq!(server.stats().calls_in, 2 + 6, "two lookups, six adds");
            server.shutdown().await;
        }
    });
}

#[test]
fn a_replayed_handshake_transcript_is_refused() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(2),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;

            // A genuine handshake, recorded.
            let mut s = genuine_initiator();
            let mut c = RawConn::connect(&addr).await.unwrap();
            let hello = s.poll_transmit().unwrap();
            c.send_frame(&hello).await.unwrap();
            let Recv::Frame(challenge) = c.recv(SLACK).await else {
                panic!("no challenge")
            };
            s.handle_frame(Instant::now(), challenge);
            let response = s.poll_transmit().unwrap();
            c.send_frame(&response).await.unwrap();
            let Recv::Frame(welcome) = c.recv(SLACK).await else {
                panic!("no welcome")
            };
            s.handle_frame(Instant::now(), welcome);
            assert!(s.is_established(), "the genuine handshake worked");

            // The same bytes again on a new connection: the node's fresh
            // nonce makes the old response worthless.
            let mut replay = RawConn::connect(&addr).await.unwrap();
            replay.send_frame(&hello).await.unwrap();
            assert!(matches!(replay.recv(SLACK).await, Recv::Frame(_)));
            replay.send_frame(&response).await.unwrap();
            expect_refusal(&mut replay, RefusalCode::Authentication).await;
            honest_calls(&honest, &addr, 3).await.unwrap();
            assert!(eventually(SLACK, || server.stats().handshakes_failed == 1).await);
            drop(c);
            server.shutdown().await;
        }
    });
}

#[test]
fn a_response_bound_to_another_node_is_refused() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (one, addr_one) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(2),
                Limits::default(),
            )
            .await;
            let other_dir = tempfile::tempdir().unwrap();
            let (two, addr_two) = target_node(
                scheme,
                other_dir.path(),
                Duration::from_secs(2),
                Limits::default(),
            )
            .await;
            let honest = honest_node().await;

            // A key holder answers node two's challenge...
            let mut s = genuine_initiator();
            let hello = s.poll_transmit().unwrap();
            let mut to_two = RawConn::connect(&addr_two).await.unwrap();
            to_two.send_frame(&hello).await.unwrap();
            let Recv::Frame(challenge) = to_two.recv(SLACK).await else {
                panic!("no challenge")
            };
            s.handle_frame(Instant::now(), challenge);
            let response_for_two = s.poll_transmit().unwrap();

            // ...and an attacker presents that answer to node one.
            let mut to_one = RawConn::connect(&addr_one).await.unwrap();
            to_one.send_frame(&hello).await.unwrap();
            assert!(matches!(to_one.recv(SLACK).await, Recv::Frame(_)));
            to_one.send_frame(&response_for_two).await.unwrap();
            expect_refusal(&mut to_one, RefusalCode::Authentication).await;

            // Node two still accepts the answer meant for it.
            to_two.send_frame(&response_for_two).await.unwrap();
            let Recv::Frame(welcome) = to_two.recv(SLACK).await else {
                panic!("no welcome")
            };
            s.handle_frame(Instant::now(), welcome);
            assert!(s.is_established());

            honest_calls(&honest, &addr_one, 2).await.unwrap();
            honest_calls(&honest, &addr_two, 2).await.unwrap();
            one.shutdown().await;
            two.shutdown().await;
        }
    });
}

#[test]
fn a_client_that_sends_nothing_is_closed_at_the_deadline() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let deadline = Duration::from_millis(500);
        for scheme in SCHEMES {
            let (server, addr) = target_node(scheme, dir.path(), deadline, Limits::default()).await;
            let honest = honest_node().await;
            let t = Instant::now();
            let mut silent = RawConn::connect(&addr).await.unwrap();
            let watcher = actix::spawn(async move { silent.closed_within(deadline + SLACK).await });
            honest_calls(&honest, &addr, 5).await.unwrap();
            assert!(watcher.await.unwrap(), "{scheme}: still open");
            let took = t.elapsed();
            assert!(
                took >= deadline - Duration::from_millis(100),
                "{scheme}: too early: {took:?}"
            );
            assert!(took < deadline + SLACK, "{scheme}: {took:?}");
            honest_calls(&honest, &addr, 2).await.unwrap();
            assert!(eventually(SLACK, || server.stats().handshakes_failed == 1).await);
            server.shutdown().await;
        }
    });
}

#[test]
fn a_client_that_dribbles_a_byte_a_second_is_closed_at_the_deadline() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let deadline = Duration::from_millis(1500);
        for scheme in SCHEMES {
            let (server, addr) = target_node(scheme, dir.path(), deadline, Limits::default()).await;
            let honest = honest_node().await;
            let hello = genuine_initiator().poll_transmit().unwrap();
            let mut conn = RawConn::connect(&addr).await.unwrap();
            let wire = conn.frame_bytes(&hello);
            let t = Instant::now();
            let dribbler = actix::spawn(async move {
                let mut sent = 0;
                for b in wire {
                    if conn.write_raw(&[b]).await.is_err() {
                        break;
                    }
                    sent += 1;
                    // Each byte counts: a closed connection shows up as a
                    // read of zero within the second.
                    if conn.closed_within(Duration::from_secs(1)).await {
                        break;
                    }
                }
                sent
            });
            honest_calls(&honest, &addr, 5).await.unwrap();
            let sent = dribbler.await.unwrap();
            let took = t.elapsed();
            assert!(sent < hello.len() / 4, "{scheme}: {sent} bytes went in");
            assert!(took < deadline + SLACK, "{scheme}: closed after {took:?}");
            assert!(
                took >= deadline - Duration::from_millis(100),
                "{scheme}: {took:?}"
            );
            honest_calls(&honest, &addr, 2).await.unwrap();
            server.shutdown().await;
        }
    });
}

#[test]
fn clients_that_never_finish_the_handshake_cannot_crowd_out_honest_peers() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let limits = Limits {
                max_handshaking: 4,
                ..Limits::default()
            };
            // A long deadline: only the cap can make room.
            let (server, addr) =
                target_node(scheme, dir.path(), Duration::from_secs(60), limits).await;
            let mut crowd = Vec::new();
            for _ in 0..20 {
                let mut c = RawConn::connect(&addr).await.unwrap();
                // A valid hello, then nothing: the slowest honest-looking client.
                c.send_frame(&genuine_initiator().poll_transmit().unwrap())
                    .await
                    .unwrap();
                crowd.push(c);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let honest = honest_node().await;
            let t = Instant::now();
            honest_calls(&honest, &addr, 5).await.unwrap();
            assert!(
                t.elapsed() < SLACK,
                "the honest peer waited {:?}",
                t.elapsed()
            );

            // The oldest were refused as busy; at most the cap are left.
            let mut refused = 0;
            let mut open = 0;
            for c in &mut crowd {
                let mut got_busy = false;
                loop {
                    match c.recv(Duration::from_millis(200)).await {
                        Recv::Frame(f) => {
                            if let Ok(Envelope::Refusal(RefusalCode::Busy, _)) =
                                Envelope::decode(&f)
                            {
                                got_busy = true;
                            }
                        }
                        Recv::Closed => break,
                        Recv::Timeout => {
                            open += 1;
                            break;
                        }
                    }
                }
                refused += usize::from(got_busy);
            }
            assert!(open <= 4, "{scheme}: {open} handshakes still open");
            assert!(refused >= 16, "{scheme}: only {refused} refused as busy");
            honest_calls(&honest, &addr, 2).await.unwrap();
            server.shutdown().await;
        }
    });
}
