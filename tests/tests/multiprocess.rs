//! Nodes as separate processes: three nodes passing a reference, kill -9
//! and SIGSTOP of a peer, and a worker spawned over an inherited socketpair
//! that receives an open file.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use actix::Actor;
use courier::{DeadReason, Fd, RemoteError};
use courier_tests::*;
use rustix::process::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_courier-test-node");
/// The heartbeat settings of `courier_tests::node` and the test node.
const HEARTBEAT: Duration = Duration::from_millis(500);
const DEAD_AFTER: Duration = Duration::from_millis(1500);
/// Room for a slow, shared machine on top of the protocol's own bound.
const SLACK: Duration = Duration::from_secs(3);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

#[test]
fn a_reference_made_on_a_passed_by_b_to_c_and_released() {
    run(async {
        // A is this process; B and C are separate processes. A listens, so
        // that C can reach it.
        let a = node(Some("tcp://127.0.0.1:0")).await;
        let b = TestNode::start(BIN, &["tcp://127.0.0.1:0"]);
        let room = a.lookup::<Room>(&b.addr, "room").await.unwrap();
        let member = new_member(&a);
        room.send(Join {
            member: member.clone(),
            name: "alice".into(),
        })
        .await
        .unwrap();
        assert_eq!(a.exports().len(), 1, "the member is exported for B");

        // C fetches the room's members from B and calls A's member.
        let c = TestNode::start_async(
            BIN,
            vec!["tcp://127.0.0.1:0".into(), "--relay".into(), b.addr.clone()],
        )
        .await;
        assert_eq!(c.said, vec!["SAID alice 1".to_owned()]);
        assert_eq!(
            member.send(Heard).await.unwrap(),
            vec!["hello alice, from the relay".to_owned()]
        );

        // B's room lets go; C dropped its copies after the relay.
        assert_eq!(room.send(Leave("alice".into())).await.unwrap(), 0);
        assert!(
            eventually(Duration::from_secs(10), || a.exports().is_empty()).await,
            "A's export table did not return to zero: {:?}",
            a.exports()
        );
        drop(c);
        drop(b);
    });
}

#[test]
fn kill_9_fails_pending_calls_and_kills_references() {
    run(async {
        let a = node(None).await;
        let b = TestNode::start(BIN, &["tcp://127.0.0.1:0"]);
        let counter = a.lookup::<Counter>(&b.addr, "counter").await.unwrap();
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        let downs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = Downs(downs.clone()).start();
        a.monitor(&counter, w.clone().recipient());
        a.monitor_node(counter.id().unwrap().node, w.recipient());
        let pending = actix::spawn(counter.send(Slow(60_000)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        b.signal(Signal::KILL);
        let e = pending.await.unwrap().unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, RemoteError::ConnectionLost { .. }), "{e}");
        assert!(took < 3 * HEARTBEAT + SLACK, "took {took:?}");
        let e = counter.send(Get).await.unwrap_err();
        assert!(
            matches!(
                e,
                RemoteError::DeadReference {
                    reason: DeadReason::NodeUnreachable,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(a.stats().imports, 0, "nothing held for the dead peer");
        assert!(a.peers().is_empty());
        assert!(
            eventually(SLACK, || downs.lock().unwrap().len() == 2).await,
            "both monitors fired: {:?}",
            downs.lock().unwrap()
        );
    });
}

struct Downs(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
impl actix::Actor for Downs {
    type Context = actix::Context<Self>;
}
impl actix::Handler<courier::ActorDown> for Downs {
    type Result = ();
    fn handle(&mut self, m: courier::ActorDown, _: &mut actix::Context<Self>) {
        self.0.lock().unwrap().push(format!("actor {:?}", m.reason));
    }
}
impl actix::Handler<courier::NodeDown> for Downs {
    type Result = ();
    fn handle(&mut self, m: courier::NodeDown, _: &mut actix::Context<Self>) {
        self.0.lock().unwrap().push(format!("node {}", m.reason));
    }
}

#[test]
fn a_stopped_peer_is_declared_dead_by_heartbeat() {
    run(async {
        let a = node(None).await;
        let b = TestNode::start(BIN, &["tcp://127.0.0.1:0"]);
        let counter = a.lookup::<Counter>(&b.addr, "counter").await.unwrap();
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        let pending = actix::spawn(counter.send(Get));
        b.signal(Signal::STOP);
        let t = Instant::now();
        let r = pending.await.unwrap();
        let took = t.elapsed();
        // The Get may have been answered before the stop took effect.
        if r.is_ok() {
            let e = counter.send(Get).await.unwrap_err();
            assert!(matches!(e, RemoteError::ConnectionLost { .. }), "{e}");
        } else {
            assert!(
                matches!(r, Err(RemoteError::ConnectionLost { .. })),
                "{r:?}"
            );
        }
        let took = took.max(t.elapsed());
        assert!(
            took >= DEAD_AFTER - HEARTBEAT,
            "declared dead too early: {took:?}"
        );
        assert!(took < 3 * HEARTBEAT + SLACK, "took {took:?}");
        assert!(counter.send(Get).await.is_err());
        b.signal(Signal::CONT);
    });
}

#[test]
fn a_worker_over_fd_receives_an_open_file_and_dies_visibly() {
    run(async {
        let a = node(None).await;
        let w = a
            .spawn_worker::<Member>(std::process::Command::new(BIN), "worker")
            .await
            .unwrap();
        let (r, wr): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
        let n = w
            .root
            .send(WriteInto {
                file: Fd(wr),
                text: "written by the worker".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 21);
        let mut buf = [0u8; 64];
        let mut f = std::fs::File::from(r);
        let got = f.read(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"written by the worker");

        let mut child = w.child;
        child.kill().unwrap();
        child.wait().unwrap();
        let root = w.root;
        assert!(
            eventually(DEAD_AFTER + SLACK, || root.dead_reason().is_some()).await
                || root.send(Heard).await.is_err()
        );
        let e = root.send(Heard).await.unwrap_err();
        assert!(
            matches!(
                e,
                RemoteError::DeadReference { .. } | RemoteError::ConnectionLost { .. }
            ),
            "{e}"
        );
    });
}

#[test]
fn descriptors_over_tcp_fail_before_anything_is_written() {
    run(async {
        let a = node(None).await;
        let b = TestNode::start(BIN, &["tcp://127.0.0.1:0"]);
        let worker = a.lookup::<Member>(&b.addr, "worker").await.unwrap();
        let (_r, wr): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
        let e = worker
            .send(WriteInto {
                file: Fd(wr),
                text: "never".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::TransportCannot { .. }), "{e}");
        // The connection is fine.
        assert!(worker.send(Heard).await.unwrap().is_empty());
    });
}
