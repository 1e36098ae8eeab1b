//! Faults injected with the `FaultyTransport` decorator (no `tc netem`
//! needed): a stalled link shorter and longer than the dead-peer bound,
//! delay, a cut with calls in flight, and corrupted or dropped frames. The
//! decorator wraps the client node's transport, over tcp and unix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::{FrameMac, Limits, Node, RemoteError};
use courier_tests::faults::{Faults, FaultyTransport};
use courier_tests::*;

const SCHEMES: [&str; 2] = ["tcp", "unix"];
const INTERVAL: Duration = Duration::from_millis(200);
/// The dead-peer bound of both nodes.
const BOUND: Duration = Duration::from_millis(1500);
const SLACK: Duration = Duration::from_secs(3);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

async fn pair(scheme: &str, dir: &std::path::Path) -> (Node, Node, String, Faults) {
    let server = Node::builder()
        .cookie(COOKIE)
        .heartbeat(INTERVAL, BOUND)
        .listen(listen_addr(scheme, dir, "server"))
        .start()
        .await
        .unwrap();
    export_counter(&server, "counter");
    let addr = server.local_addrs()[0].to_string();
    let faults = Faults::new();
    let transport =
        FaultyTransport::wrap(Arc::new(courier::transports::AnyTransport::new()), &faults);
    // MACs on TCP as between two machines (on loopback, `Auto` leaves them
    // off); Unix links never have them.
    let mac = if scheme == "tcp" {
        FrameMac::Always
    } else {
        FrameMac::Auto
    };
    let client = Node::builder()
        .cookie(COOKIE)
        .heartbeat(INTERVAL, BOUND)
        .frame_mac(mac)
        .limits(Limits::default())
        .transport(transport)
        .start()
        .await
        .unwrap();
    (server, client, addr, faults)
}

#[test]
fn a_stall_shorter_than_the_bound_kills_nothing() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, client, addr, faults) = pair(scheme, dir.path()).await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
            faults.stall();
            let pending: Vec<_> = (0..20)
                .map(|_| actix::spawn(counter.send(Add(1))))
                .collect();
            tokio::time::sleep(BOUND / 3).await;
            faults.heal();
            for p in pending {
                assert!(matches!(p.await.unwrap(), Ok(Ok(_))), "{scheme}");
            }
            assert!(counter.dead_reason().is_none(), "{scheme}");
            assert_eq!(counter.send(Get).await.unwrap(), 21);
            assert_eq!(client.stats().peers_lost, 0, "{scheme}");
            assert_eq!(server.stats().peers_lost, 0, "{scheme}");
        }
    });
}

#[test]
fn a_stall_longer_than_the_bound_fails_every_pending_call_within_it() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (_server, client, addr, faults) = pair(scheme, dir.path()).await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
            let slow: Vec<_> = (0..10)
                .map(|_| actix::spawn(counter.send(Slow(60_000))))
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            faults.stall();
            let t = Instant::now();
            let during: Vec<_> = (0..10)
                .map(|_| {
                    let f = counter.send(Add(1));
                    actix::spawn(async move { f.await.map(drop) })
                })
                .collect();
            for p in slow.into_iter().chain(during) {
                let r = p.await.unwrap();
                assert!(
                    matches!(r, Err(RemoteError::ConnectionLost { .. })),
                    "{scheme}: {r:?}"
                );
            }
            let took = t.elapsed();
            assert!(took < BOUND + SLACK, "{scheme}: failed after {took:?}");
            assert!(
                took >= BOUND - 3 * INTERVAL,
                "{scheme}: failed before the bound: {took:?}"
            );
            let e = counter.send(Get).await.unwrap_err();
            assert!(
                matches!(e, RemoteError::DeadReference { .. }),
                "{scheme}: {e}"
            );
            faults.heal();
            let again = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            assert_eq!(
                again.send(Get).await.unwrap(),
                1,
                "{scheme}: nothing applied twice"
            );
        }
    });
}

#[test]
fn delay_slows_calls_down_and_loses_nothing() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (_server, client, addr, faults) = pair(scheme, dir.path()).await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            faults.set_delay(Duration::from_millis(50));
            let t = Instant::now();
            let calls: Vec<_> = (0..200)
                .map(|_| actix::spawn(counter.send(Add(1))))
                .collect();
            let mut totals: Vec<u64> = Vec::new();
            for c in calls {
                totals.push(c.await.unwrap().unwrap().unwrap());
            }
            assert!(t.elapsed() >= Duration::from_millis(50), "{scheme}");
            totals.sort_unstable();
            assert_eq!(
                totals,
                (1..=200).collect::<Vec<_>>(),
                "{scheme}: each answered once"
            );
            faults.set_delay(Duration::ZERO);
            assert!(faults.stats().delivered >= 200);
        }
    });
}

#[test]
fn a_cut_with_calls_in_flight_fails_them_at_once() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let (server, client, addr, faults) = pair(scheme, dir.path()).await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            let calls: Vec<_> = (0..500)
                .map(|_| actix::spawn(counter.send(Add(1))))
                .collect();
            tokio::time::sleep(Duration::from_millis(2)).await;
            let t = Instant::now();
            faults.cut();
            let (mut ok, mut lost) = (0u64, 0u64);
            for c in calls {
                match c.await.unwrap() {
                    Ok(Ok(_)) => ok += 1,
                    Err(RemoteError::ConnectionLost { .. } | RemoteError::DeadReference { .. }) => {
                        lost += 1
                    }
                    other => panic!("{scheme}: {other:?}"),
                }
            }
            assert_eq!(ok + lost, 500);
            assert!(
                t.elapsed() < BOUND,
                "{scheme}: a cut is seen before any heartbeat bound"
            );
            // The server applied at least what was answered, never more
            // than was sent.
            let again = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            let applied = again.send(Get).await.unwrap();
            assert!(
                applied >= ok && applied <= 500,
                "{scheme}: applied {applied}, answered {ok}"
            );
            assert!(eventually(SLACK, || server.stats().connections == 1).await);
            println!("{scheme}: cut with 500 calls in flight: {ok} answered, {lost} failed, {applied} applied");
        }
    });
}

#[test]
fn corrupted_or_dropped_frames_on_tcp_close_the_connection() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        for fault in ["corrupt", "drop"] {
            let (_server, client, addr, faults) = pair("tcp", dir.path()).await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
            match fault {
                "corrupt" => faults.corrupt_next(1),
                _ => faults.drop_next(1),
            }
            // The next frame from the server (a reply or a heartbeat) is
            // damaged; the MAC or its sequence number catches it.
            let r = counter.send(Add(1)).timeout(SLACK).await;
            let r2 = counter.send(Add(1)).timeout(SLACK).await;
            assert!(
                matches!(r, Err(RemoteError::ConnectionLost { .. }))
                    || matches!(
                        r2,
                        Err(RemoteError::ConnectionLost { .. } | RemoteError::DeadReference { .. })
                    ),
                "{fault}: {r:?} {r2:?}"
            );
            assert!(
                eventually(SLACK, || counter.dead_reason().is_some()).await,
                "{fault}"
            );
        }
    });
}

#[test]
fn a_dropped_frame_on_unix_is_a_typed_timeout_not_a_hang() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let (_server, client, addr, faults) = pair("unix", dir.path()).await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        // Unix links carry no MACs (kernel-local): a frame lost below
        // Courier is a reply that never comes.
        faults.drop_next(1);
        let r = counter
            .send(Add(1))
            .timeout(Duration::from_millis(500))
            .await;
        assert!(matches!(r, Err(RemoteError::Timeout { .. })), "{r:?}");
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(3));
    });
}
