//! The partition scenario, run by `tests/tests/faults.rs` inside a user and
//! network namespace of its own (`unshare -Urn courier-partition TEST_NODE`).
//!
//! It starts `courier-test-node` (B) in a second network namespace, joins
//! the two namespaces with a veth pair (addresses 10.213.0.1 and .2 exist
//! only inside these namespaces), and runs node A here. Then it takes the
//! link down twice:
//!
//! 1. shorter than the dead-peer bound: calls made meanwhile are answered
//!    after the link heals, and no reference dies;
//! 2. longer than the bound: every pending call fails with `ConnectionLost`
//!    within the bound (plus slack), and the reference is dead.
//!
//! It prints `SHORT ...`, `LONG ...` and finally `PASS`; any failure panics
//! (exit 101) with the reason.

use std::process::Command;
use std::time::{Duration, Instant};

use courier::{Node, RemoteError};
use courier_tests::{Add, Counter, Get, Slow, TestNode, COOKIE};

const INTERVAL: Duration = Duration::from_millis(200);
/// The dead-peer bound of both nodes.
const TIMEOUT: Duration = Duration::from_millis(3000);
const SHORT: Duration = Duration::from_millis(800);
const LONG: Duration = Duration::from_millis(6000);
const SLACK: Duration = Duration::from_secs(3);

fn sh(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn link(up: bool) {
    sh(&["ip", "link", "set", "va", if up { "up" } else { "down" }]);
}

#[actix::main]
async fn main() {
    let test_node = std::env::args()
        .nth(1)
        .expect("usage: courier-partition TEST_NODE_BIN");
    sh(&["ip", "link", "set", "lo", "up"]);
    let hb = [
        "--heartbeat",
        &INTERVAL.as_millis().to_string(),
        &TIMEOUT.as_millis().to_string(),
    ]
    .map(str::to_owned);
    let mut args = vec![
        "-n".to_owned(),
        test_node.clone(),
        "tcp://0.0.0.0:0".to_owned(),
    ];
    args.extend(hb);
    let b = TestNode::start_async("unshare", args).await;
    let pid = b.child.id().to_string();
    let port = b.addr.rsplit(':').next().expect("a port").to_owned();
    sh(&[
        "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &pid,
    ]);
    sh(&["ip", "addr", "add", "10.213.0.1/30", "dev", "va"]);
    link(true);
    for c in [
        "ip addr add 10.213.0.2/30 dev vb",
        "ip link set vb up",
        "ip link set lo up",
    ] {
        let mut v = vec!["nsenter", "-t", &pid, "-n"];
        v.extend(c.split(' '));
        sh(&v);
    }

    let a = Node::builder()
        .cookie(COOKIE)
        .heartbeat(INTERVAL, TIMEOUT)
        .start()
        .await
        .expect("node A");
    let addr = format!("tcp://10.213.0.2:{port}");
    let counter = {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match a.lookup::<Counter>(&addr, "counter").await {
                Ok(c) => break c,
                Err(e) if Instant::now() < end => {
                    eprintln!("waiting for the veth: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("lookup over the veth: {e}"),
            }
        }
    };
    assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));

    // 1. A partition shorter than the bound.
    link(false);
    let t = Instant::now();
    let pending: Vec<_> = (0..20)
        .map(|_| actix::spawn(counter.send(Add(1))))
        .collect();
    tokio::time::sleep(SHORT).await;
    link(true);
    for p in pending {
        let r = p.await.unwrap();
        assert!(
            matches!(r, Ok(Ok(_))),
            "a call across a short partition failed: {r:?}"
        );
    }
    assert!(counter.dead_reason().is_none(), "the reference died");
    assert_eq!(counter.send(Get).await.unwrap(), 21);
    assert_eq!(a.stats().peers_lost, 0);
    println!(
        "SHORT down {SHORT:?}: 20 calls answered after {:?}, no dead reference",
        t.elapsed()
    );

    // 2. A partition longer than the bound.
    let slow: Vec<_> = (0..10)
        .map(|_| actix::spawn(counter.send(Slow(60_000))))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    link(false);
    let t = Instant::now();
    let during: Vec<_> = (0..10)
        .map(|_| {
            let f = counter.send(Add(1));
            actix::spawn(async move { f.await.map(drop) })
        })
        .collect();
    let mut failed = 0;
    for p in slow.into_iter().chain(during) {
        match p.await.unwrap() {
            Err(RemoteError::ConnectionLost { .. }) => failed += 1,
            other => panic!("a pending call did not fail with ConnectionLost: {other:?}"),
        }
    }
    let took = t.elapsed();
    assert!(
        took < TIMEOUT + SLACK,
        "pending calls failed only after {took:?}"
    );
    assert!(
        took >= TIMEOUT - 3 * INTERVAL,
        "pending calls failed before the bound: {took:?}"
    );
    let e = counter.send(Get).await.unwrap_err();
    assert!(matches!(e, RemoteError::DeadReference { .. }), "{e}");
    tokio::time::sleep(LONG.saturating_sub(t.elapsed())).await;
    link(true);
    // After healing, a new lookup reaches the same process again.
    let again = a
        .lookup::<Counter>(&addr, "counter")
        .await
        .expect("lookup after healing");
    assert_eq!(again.send(Get).await.unwrap(), 21);
    println!("LONG down {LONG:?}: {failed} pending calls failed with ConnectionLost after {took:?} (bound {TIMEOUT:?})");
    println!("PASS");
    drop(b);
}
