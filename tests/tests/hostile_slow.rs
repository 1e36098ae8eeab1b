//! Slow consumers, over tcp and unix: a peer that reads nothing. Whether
//! the node is calling it or being flooded by it, the node's memory stays
//! bounded, callers get backpressure or a typed error, and the node keeps
//! serving an honest peer.

use std::time::{Duration, Instant};

use courier::{Limits, Node, RemoteError};
use courier_runtime::id::{ActorId, Incarnation, LocalId};
use courier_runtime::session::{Event, Role};
use courier_runtime::wire::{ReplyStatus, WireRef};
use courier_tests::raw::{random_node_id, raw_config, RawListener, RawSession};
use courier_tests::*;

const SCHEMES: [&str; 2] = ["tcp", "unix"];
const SLACK: Duration = Duration::from_secs(5);

/// Resident memory is the whole process's: the tests in this file take
/// turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    actix::System::new().block_on(f);
}

#[test]
fn calls_to_a_peer_that_reads_nothing_get_backpressure_or_a_typed_error() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (listener, addr) = RawListener::bind(scheme, dir.path()).await.unwrap();
            let client = Node::builder()
                .cookie(COOKIE)
                .heartbeat(Duration::from_millis(200), Duration::from_secs(30))
                .limits(Limits {
                    command_queue: 256,
                    ..Limits::default()
                })
                .start()
                .await
                .unwrap();
            let c2 = client.clone();
            let a2 = addr.clone();
            let lookup = actix::spawn(async move { c2.lookup::<Counter>(&a2, "counter").await });

            // The peer holds the key, answers the lookup, then reads nothing.
            let conn = listener.accept().await.unwrap();
            let cfg = raw_config(random_node_id(), COOKIE.as_bytes(), false);
            let mut peer = RawSession::start(conn, cfg, Role::Acceptor).await.unwrap();
            peer.establish().await.unwrap();
            let Some(Event::Call(call)) = peer.next_event(SLACK).await else {
                panic!("{scheme}: no lookup")
            };
            let me = WireRef {
                actor: ActorId {
                    node: peer.own_node(),
                    incarnation: Incarnation(7),
                    local: LocalId {
                        index: 1,
                        generation: 0,
                    },
                },
                lend_token: 0,
                owner_addr: String::new(),
            };
            let index = courier_runtime::codec::encode(&0u32).unwrap();
            peer.session
                .send_reply(
                    Instant::now(),
                    call.header.request,
                    ReplyStatus::Ok,
                    &[me],
                    &index,
                    0,
                )
                .unwrap();
            peer.flush().await.unwrap();
            let counter = lookup.await.unwrap().unwrap();

            let rss = rss_kib();
            let blob = vec![7u8; 16 * 1024];
            let (mut queued, mut full) = (0u32, 0u32);
            // 10,000 x 16 KiB = 160 MiB offered to a peer that takes nothing.
            for i in 0..10_000 {
                match counter.do_send(Blob(blob.clone())) {
                    Ok(()) => queued += 1,
                    Err(RemoteError::MailboxFull { .. }) => full += 1,
                    Err(e) => panic!("{scheme}: {e}"),
                }
                if i % 64 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            assert!(full > 0, "{scheme}: never pushed back ({queued} queued)");
            let e = counter
                .send(Get)
                .timeout(Duration::from_millis(500))
                .await
                .unwrap_err();
            assert!(matches!(e, RemoteError::Timeout { .. }), "{scheme}: {e}");
            let grown = rss_kib().saturating_sub(rss);
            assert!(grown < 96 * 1024, "{scheme}: memory grew by {grown} KiB");
            println!(
                "{scheme}: {queued} queued, {full} refused with MailboxFull, memory +{grown} KiB"
            );

            // The same node keeps serving an honest peer.
            let (srv, srv_addr) = target_node(
                scheme,
                dir.path(),
                Duration::from_secs(5),
                Limits::default(),
            )
            .await;
            honest_calls(&client, &srv_addr, 5).await.unwrap();
            srv.shutdown().await;
            assert!(
                eventually(SLACK, || client.stats().connections == 1).await,
                "{scheme}"
            );

            // Closing while the peer still reads nothing: the frames the
            // peer will never take are given up after the grace period
            // (2 s) and the link is closed, not kept forever.
            let fds = open_fds();
            client.shutdown().await;
            assert!(
                eventually(Duration::from_secs(2) + SLACK, || open_fds() < fds).await,
                "{scheme}: the connection to a peer that reads nothing was never closed"
            );
            drop(peer);
        }
    });
}

#[test]
fn a_flood_from_a_peer_that_reads_nothing_stays_bounded() {
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
            let cfg = raw_config(random_node_id(), COOKIE.as_bytes(), false);
            let mut s = RawSession::connect(&addr, cfg).await.unwrap();
            let counter = s.lookup("counter").await.unwrap();
            let rss = rss_kib();
            let add = courier_runtime::codec::encode(&Add(1)).unwrap();
            // Calls, never reading a reply, for at most three seconds: the
            // node stops reading this peer once its replies back up, so the
            // writes block (TCP backpressure) rather than the node growing.
            let flood = actix::spawn(async move {
                let mut sent = 0u32;
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    for _ in 0..50_000 {
                        if s.session
                            .send_call(Instant::now(), counter, "test.counter.add", &[], &add, 0)
                            .is_err()
                        {
                            break;
                        }
                        if s.flush().await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                })
                .await;
                (sent, s)
            });
            honest_calls(&honest, &addr, 5).await.unwrap();
            let (sent, s) = flood.await.unwrap();
            honest_calls(&honest, &addr, 5).await.unwrap();
            let grown = rss_kib().saturating_sub(rss);
            assert!(grown < 64 * 1024, "{scheme}: memory grew by {grown} KiB");
            println!(
                "{scheme}: {sent} calls written by a peer that reads nothing, memory +{grown} KiB"
            );
            drop(s);
            assert!(
                eventually(SLACK, || server.stats().connections == 1).await,
                "{scheme}"
            );
            server.shutdown().await;
        }
    });
}
