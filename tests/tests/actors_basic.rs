//! Remote actors between nodes in one process, over TCP on loopback:
//! typed replies and errors, one-way messages, failures, limits, and
//! references passed between three nodes.

use std::time::Duration;

use actix::prelude::*;
use courier::{ActorDown, DeadReason, Limits, Node, NodeDown, RemoteAddr, RemoteError};
use courier_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    if std::env::var_os("COURIER_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("COURIER_TEST_LOG"))
            .try_init();
    }
    actix::System::new().block_on(f);
}

/// Runs `work` on `arbiter`'s thread and waits for what it gives.
async fn on_arbiter<T: Send + 'static>(
    arbiter: &Arbiter,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    assert!(arbiter.spawn(async move {
        let _ = done_tx.send(work.await);
    }));
    done_rx.await.expect("the other thread answers")
}

async fn server_and_client() -> (Node, Node, String) {
    let server = node(Some("tcp://127.0.0.1:0")).await;
    export_counter(&server, "counter");
    let addr = server.local_addrs()[0].to_string();
    let client = node(None).await;
    (server, client, addr)
}

#[test]
fn typed_reply_typed_error_and_one_way() {
    run(async {
        let (_server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        assert!(!counter.is_local());
        assert_eq!(counter.send(Add(5)).await.unwrap(), Ok(5));
        assert_eq!(counter.send(Add(0)).await.unwrap(), Err(CounterError::Zero));
        for _ in 0..10 {
            counter.do_send(Bump).unwrap();
        }
        // One-way messages on one connection arrive in order, before the
        // call sent after them.
        assert_eq!(counter.send(Get).await.unwrap(), 15);
        // Typed by the message only, like actix's Recipient.
        let adder: courier::RemoteRecipient<Add> = counter.recipient();
        assert_eq!(adder.send(Add(5)).await.unwrap(), Ok(20));
        adder.do_send(Add(1)).unwrap();
        assert_eq!(counter.send(Get).await.unwrap(), 21);
    });
}

#[test]
fn unknown_name_unknown_message_and_timeout() {
    run(async {
        let (_server, client, addr) = server_and_client().await;
        let e = client.lookup::<Counter>(&addr, "nobody").await.unwrap_err();
        assert!(matches!(e, RemoteError::UnknownActor { .. }), "{e}");
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        // Both lookups went over one connection.
        assert_eq!(client.peers().len(), 1);
        let e = counter.send(NotHandled).await.unwrap_err();
        assert!(
            matches!(&e, RemoteError::UnknownMessage { message_type, .. } if message_type == "test.counter.not_handled"),
            "{e}"
        );
        a_slow_call_times_out(&counter).await;
        // The connection is still good.
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
    });
}

#[test]
fn a_panicking_actor_is_restarted_and_keeps_its_id() {
    run(async {
        let (_server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        let id = counter.id();
        assert_eq!(counter.send(Add(7)).await.unwrap(), Ok(7));
        let e = counter.send(Crash).await.unwrap_err();
        let RemoteError::Remote(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(f.type_name, "panic");
        assert!(f.message.contains("asked to crash"), "{}", f.message);
        assert!(f.backtrace.is_some(), "the exporter opted in to details");
        // Same reference, same id, a fresh actor behind it.
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        assert_eq!(counter.id(), id);
        // A fresh lookup finds the same id.
        let again = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        assert_eq!(again.id(), id);
    });
}

/// Replies are written by the actor's task when it runs on the
/// connection's thread; an actor on a thread of its own answers through
/// the connection's task instead. Both, one call at a time and many at
/// once, and a panic on the other thread.
#[test]
fn an_actor_on_another_thread_answers_calls() {
    run(async {
        // A reply lost on the way would hang the test: bounded.
        tokio::time::timeout(WAIT * 3, async {
            let server = node(Some("tcp://127.0.0.1:0")).await;
            let arbiter = Arbiter::new();
            let on_arbiter = Counter::start_in_arbiter(&arbiter.handle(), |_| Counter::default());
            server
                .export(on_arbiter)
                .handles::<Add>()
                .handles::<Get>()
                .handles::<Crash>()
                .register("far")
                .unwrap();
            export_counter(&server, "near");
            let addr = server.local_addrs()[0].to_string();
            let client = node(None).await;
            let far = client.lookup::<Counter>(&addr, "far").await.unwrap();
            let near = client.lookup::<Counter>(&addr, "near").await.unwrap();
            for i in 1..=50u64 {
                assert_eq!(far.send(Add(1)).await.unwrap(), Ok(i));
                assert_eq!(near.send(Add(2)).await.unwrap(), Ok(2 * i));
            }
            // Many at once, both actors: every reply reaches its caller.
            let calls: Vec<_> = (0..64)
                .map(|i| {
                    let target = if i % 2 == 0 {
                        far.clone()
                    } else {
                        near.clone()
                    };
                    actix::spawn(async move { target.send(Add(1)).await })
                })
                .collect();
            for call in calls {
                assert!(matches!(call.await.unwrap(), Ok(Ok(_))));
            }
            assert_eq!(far.send(Get).await.unwrap(), 82);
            assert_eq!(near.send(Get).await.unwrap(), 132);
            // A panic on the other thread (which this one cannot see): the
            // actor stopped, and nobody restarts it, so the reference is dead.
            for m in 0..2 {
                let e = if m == 0 {
                    far.send(Crash).await.unwrap_err()
                } else {
                    far.send(Get).await.map(|_| ()).unwrap_err()
                };
                assert!(
                    matches!(
                        e,
                        RemoteError::DeadReference {
                            reason: DeadReason::ActorStopped,
                            ..
                        }
                    ),
                    "{e}"
                );
            }
            assert_eq!(near.send(Get).await.unwrap(), 132);
            arbiter.stop();
        })
        .await
        .expect("every call answered in time");
    });
}

/// As with actix's `Addr::send`, a call goes when it is made, not when it
/// is awaited: calls keep the order they were made in, and one dropped
/// unawaited is still delivered (its reply is lost). From the connection's
/// own thread and from another.
#[test]
fn a_call_goes_when_it_is_made() {
    run(async {
        tokio::time::timeout(WAIT * 3, async {
            let (_server, client, addr) = server_and_client().await;
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            let first = counter.send(Add(1));
            let second = counter.send(Add(10));
            assert_eq!(second.await.unwrap(), Ok(11));
            assert_eq!(first.await.unwrap(), Ok(1));
            drop(counter.send(Add(100)));
            assert_eq!(counter.send(Get).await.unwrap(), 111);

            // From a thread that is not the connection's: queued for it.
            let arbiter = Arbiter::new();
            let far = counter.clone();
            let (early, late, total) = on_arbiter(&arbiter, async move {
                let first = far.send(Add(1000));
                let second = far.send(Add(10_000));
                let late = second.await;
                let early = first.await;
                drop(far.send(Add(100_000)));
                // Queued behind the dropped call, by the same sender.
                let total = far.send(Get).await;
                (early, late, total)
            })
            .await;
            assert_eq!(early.unwrap(), Ok(1111));
            assert_eq!(late.unwrap(), Ok(11_111));
            assert_eq!(total.unwrap(), 111_111);
            arbiter.stop();
        })
        .await
        .expect("every call answered in time");
    });
}

/// Calls made from another thread faster than the connection's command
/// queue (four entries here) takes them: those that find it full wait for
/// room when polled, and every call is answered, none twice.
#[test]
fn calls_that_find_the_command_queue_full_wait_for_room() {
    run(async {
        tokio::time::timeout(WAIT * 3, async {
            let server = node(Some("tcp://127.0.0.1:0")).await;
            export_counter(&server, "counter");
            let addr = server.local_addrs()[0].to_string();
            let client = Node::builder()
                .cookie(COOKIE)
                .limits(Limits {
                    command_queue: 4,
                    ..Limits::default()
                })
                .start()
                .await
                .unwrap();
            let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
            let arbiter = Arbiter::new();
            let far = counter.clone();
            let answers = on_arbiter(&arbiter, async move {
                let calls: Vec<_> = (0..200).map(|_| far.send(Add(1))).collect();
                let mut answers = Vec::new();
                for call in calls {
                    answers.push(call.await);
                }
                answers
            })
            .await;
            let mut totals: Vec<u64> = answers
                .into_iter()
                .map(|a| a.expect("answered").expect("added"))
                .collect();
            totals.sort_unstable();
            // Each call saw a different total: none lost, none run twice.
            assert_eq!(totals, (1..=200).collect::<Vec<u64>>());
            assert_eq!(counter.send(Get).await.unwrap(), 200);
            arbiter.stop();
        })
        .await
        .expect("every call answered in time");
    });
}

/// A supervised export started on an arbiter of its own: its panic is not
/// seen on the connection's thread, so the call gets a "stopped" failure
/// once the mailbox has closed, and the actor is started again (on the
/// connection's thread) under the same reference.
#[test]
fn a_supervised_actor_on_another_thread_that_panics_is_restarted() {
    run(async {
        tokio::time::timeout(WAIT * 3, async {
            let server = node(Some("tcp://127.0.0.1:0")).await;
            let arbiter = Arbiter::new();
            let there = server.clone();
            let exported = on_arbiter(&arbiter, async move {
                there
                    .export_supervised(Counter::default)
                    .handles::<Add>()
                    .handles::<Crash>()
                    .register("far")
                    .is_ok()
            })
            .await;
            assert!(exported, "exported");
            let addr = server.local_addrs()[0].to_string();
            let client = node(None).await;
            let far = client.lookup::<Counter>(&addr, "far").await.unwrap();
            assert_eq!(far.send(Add(2)).await.unwrap(), Ok(2));
            let e = far.send(Crash).await.unwrap_err();
            assert!(
                matches!(&e, RemoteError::Remote(f) if f.type_name == "stopped"),
                "{e}"
            );
            // A fresh actor, the same reference.
            assert_eq!(far.send(Add(1)).await.unwrap(), Ok(1));
            arbiter.stop();
        })
        .await
        .expect("answered in time");
    });
}

/// An actor that stops itself: calls already in its mailbox get a
/// failure saying so (not a panic), and the supervised export is started
/// again under the same id.
#[test]
fn a_supervised_actor_that_stops_is_restarted() {
    run(async {
        let (_server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        assert_eq!(counter.send(Add(3)).await.unwrap(), Ok(3));
        // Both in the mailbox before the actor handles the first: the two
        // tasks write both calls before the server's driver (on this same
        // thread) reads them, and it hands both over in one poll.
        // Both behind it are "stopped", though the first one's answer
        // restarts the actor before the second is looked at.
        let quit = actix::spawn(counter.send(Quit));
        let behind = [
            actix::spawn(counter.send(Get)),
            actix::spawn(counter.send(Get)),
        ];
        quit.await.unwrap().unwrap();
        for call in behind {
            match call.await.unwrap() {
                Err(RemoteError::Remote(f)) => {
                    assert_eq!(f.type_name, "stopped", "{}", f.message);
                    assert!(f.message.contains("restarted"), "{}", f.message);
                }
                other => panic!("{other:?}"),
            }
        }
        // A fresh actor behind the same reference.
        assert_eq!(counter.send(Get).await.unwrap(), 0);
    });
}

/// An actor under actix's own supervisor: restarting it in place (same
/// mailbox) cancels the futures it was answering with.
#[derive(Default)]
struct Flaky;

impl Actor for Flaky {
    type Context = Context<Self>;
}

impl actix::Supervised for Flaky {}

/// Answered by a future that never finishes.
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "()")]
struct Hang;

/// Stops the actor; its supervisor starts it again at once.
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "u32")]
struct Restart;

/// Answered with a value that cannot be encoded.
#[derive(Message, serde::Serialize, serde::Deserialize)]
#[rtype(result = "Unencodable")]
struct Unanswerable;

/// A reply whose encoding panics (a bug in its `Serialize`).
#[derive(Debug, serde::Deserialize)]
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("this reply cannot be encoded");
    }
}

courier::remote_message!(
    Hang = "test.flaky.hang",
    Restart = "test.flaky.restart",
    Unanswerable = "test.flaky.unanswerable"
);

impl Handler<Unanswerable> for Flaky {
    type Result = MessageResult<Unanswerable>;
    fn handle(&mut self, _: Unanswerable, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Unencodable)
    }
}

impl Handler<Hang> for Flaky {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Hang, _: &mut Context<Self>) -> Self::Result {
        Box::pin(actix::fut::wrap_future(std::future::pending()))
    }
}

impl Handler<Restart> for Flaky {
    type Result = u32;
    fn handle(&mut self, _: Restart, ctx: &mut Context<Self>) -> u32 {
        ctx.stop();
        7
    }
}

/// A call the actor drops unanswered while it keeps running (here its
/// answering future is cancelled by an in-place restart) is a "dropped"
/// failure: not a panic, and not a dead reference, since the actor still
/// answers.
#[test]
fn a_call_dropped_by_a_running_actor_is_a_dropped_failure() {
    run(async {
        tokio::time::timeout(WAIT * 3, async {
            let server = node(Some("tcp://127.0.0.1:0")).await;
            server
                .export(actix::Supervisor::start(|_| Flaky))
                .handles::<Hang>()
                .handles::<Restart>()
                .handles::<Unanswerable>()
                .register("flaky")
                .unwrap();
            let addr = server.local_addrs()[0].to_string();
            let client = node(None).await;
            let flaky = client.lookup::<Flaky>(&addr, "flaky").await.unwrap();
            let hung = actix::spawn(flaky.send(Hang));
            // The hanging call reaches the actor before the restart does.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(flaky.send(Restart).await.unwrap(), 7);
            match hung.await.unwrap() {
                Err(RemoteError::Remote(f)) => assert_eq!(f.type_name, "dropped", "{}", f.message),
                other => panic!("{other:?}"),
            }
            // The same reference still reaches the (restarted) actor.
            assert_eq!(flaky.send(Restart).await.unwrap(), 7);

            // A panic while encoding a reply is the connection's, not the
            // actor's, wherever the reply is written: that connection
            // ends, the actor lives on and answers over a new one.
            // (An actor nobody restarts, so that it would show.)
            server
                .export(Flaky.start())
                .handles::<Restart>()
                .handles::<Unanswerable>()
                .register("plain")
                .unwrap();
            let plain = client.lookup::<Flaky>(&addr, "plain").await.unwrap();
            let e = plain.send(Unanswerable).await.unwrap_err();
            assert!(matches!(e, RemoteError::ConnectionLost { .. }), "{e}");
            let again = client.lookup::<Flaky>(&addr, "plain").await.unwrap();
            assert_eq!(again.send(Restart).await.unwrap(), 7);
        })
        .await
        .expect("answered in time");
    });
}

#[test]
fn wrong_cookie_is_refused_on_both_sides() {
    run(async {
        let server = node(Some("tcp://127.0.0.1:0")).await;
        export_counter(&server, "counter");
        let addr = server.local_addrs()[0].to_string();
        let intruder = Node::builder()
            .cookie("not the test cookie at all!")
            .start()
            .await
            .unwrap();
        let e = intruder
            .lookup::<Counter>(&addr, "counter")
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::Authentication { .. }), "{e}");
        assert!(
            eventually(WAIT, || server.stats().handshakes_failed == 1).await,
            "the server saw the failure"
        );
        assert_eq!(server.stats().calls_in, 0, "no application message arrived");
        assert_eq!(server.stats().connections, 0);
    });
}

#[test]
fn short_cookie_is_a_clear_error() {
    run(async {
        let e = Node::builder().cookie("short").start().await.unwrap_err();
        assert!(e.to_string().contains("16 bytes"), "{e}");
    });
}

/// A call that outlasts its timeout fails with `Timeout`.
async fn a_slow_call_times_out(counter: &RemoteAddr<Counter>) {
    let e = counter
        .send(Slow(2_000))
        .timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::Timeout { .. }), "{e}");
}

#[test]
fn local_references_skip_the_wire() {
    run(async {
        let server = node(None).await;
        let counter = export_counter(&server, "counter");
        assert!(counter.is_local());
        assert_eq!(counter.send(Add(2)).await.unwrap(), Ok(2));
        // The same errors as through a connection: a timeout, and a panic
        // reported as a remote failure, after which the restarted actor
        // answers under the same reference.
        a_slow_call_times_out(&counter).await;
        let e = counter.send(Crash).await.unwrap_err();
        let RemoteError::Remote(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(f.type_name, "panic");
        assert!(f.message.contains("test.counter.crash"), "{}", f.message);
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        // A call behind one that stops the actor: a "stopped" failure.
        let quit = counter.send(Quit);
        let behind = counter.send(Get);
        quit.await.unwrap();
        let e = behind.await.unwrap_err();
        assert!(
            matches!(&e, RemoteError::Remote(f) if f.type_name == "stopped"),
            "{e}"
        );
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
        // Typed through a recipient, the call is boxed and answers alike.
        let add = counter.recipient::<Add>();
        assert_eq!(add.send(Add(1)).await.unwrap(), Ok(2));
        assert_eq!(server.stats().calls_in, 0);
    });
}

#[test]
fn references_travel_to_a_third_node_and_are_released() {
    run(async {
        let a = node(Some("tcp://127.0.0.1:0")).await;
        let b = node(Some("tcp://127.0.0.1:0")).await;
        let c = node(None).await;
        export_room(&a, "room");
        let a_addr = a.local_addrs()[0].to_string();

        // B joins A's room with a member of its own.
        let room_from_b = b.lookup::<Room>(&a_addr, "room").await.unwrap();
        let member = new_member(&b);
        assert_eq!(
            room_from_b
                .send(Join {
                    member: member.clone(),
                    name: "bob".into()
                })
                .await
                .unwrap(),
            1
        );
        // B's member is exported, held by A.
        let ex = b.exports();
        let m = ex
            .iter()
            .find(|e| e.name.is_none())
            .expect("member exported");
        assert_eq!(m.holders.len(), 1);
        assert_eq!(m.holders[0].peer, a.id());

        // C asks A for the members and calls B's member directly.
        let room_from_c = c.lookup::<Room>(&a_addr, "room").await.unwrap();
        let members = room_from_c.send(Members).await.unwrap();
        assert_eq!(members.len(), 1);
        let (name, bob) = &members[0];
        assert_eq!(name, "bob");
        assert_eq!(
            bob.id().unwrap().node,
            b.id(),
            "a live reference to B's actor, not a proxy"
        );
        assert_eq!(bob.send(Say("hi bob".into())).await.unwrap(), 1);
        assert_eq!(member.send(Heard).await.unwrap(), vec!["hi bob".to_owned()]);
        // C now holds its own count at B.
        assert!(
            eventually(WAIT, || b
                .exports()
                .iter()
                .any(|e| e.holders.iter().any(|h| h.peer == c.id())))
            .await
        );

        // Everyone lets go: the room drops bob, C drops its copies.
        assert_eq!(room_from_b.send(Leave("bob".into())).await.unwrap(), 0);
        drop(members);
        drop(member);
        assert!(
            eventually(WAIT, || b.exports().iter().all(|e| e.name.is_some())).await,
            "B's export table is back to its named actors: {:?}",
            b.exports()
        );
        assert!(eventually(WAIT, || c.stats().imports <= 1).await);
    });
}

#[test]
fn too_many_references_is_a_typed_error() {
    run(async {
        let a = node(Some("tcp://127.0.0.1:0")).await;
        export_room(&a, "room");
        let a_addr = a.local_addrs()[0].to_string();
        let b = Node::builder()
            .cookie(COOKIE)
            .limits(Limits {
                max_refs_per_peer: 2,
                ..Limits::default()
            })
            .start()
            .await
            .unwrap();
        let room = b.lookup::<Room>(&a_addr, "room").await.unwrap();
        let mut kept = Vec::new();
        for i in 0..2 {
            let m = new_member(&b);
            room.send(Join {
                member: m.clone(),
                name: format!("m{i}"),
            })
            .await
            .unwrap();
            kept.push(m);
        }
        let e = room
            .send(Join {
                member: new_member(&b),
                name: "one too many".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::LimitReached { max: 2, .. }), "{e}");
        // Nothing half-counted: still two holds.
        assert_eq!(b.exports().len(), 2);
    });
}

struct Watcher(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
impl Actor for Watcher {
    type Context = Context<Self>;
}
impl Handler<ActorDown> for Watcher {
    type Result = ();
    fn handle(&mut self, m: ActorDown, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(format!("actor {:?}", m.reason));
    }
}
impl Handler<NodeDown> for Watcher {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(format!("node {}", m.node));
    }
}

#[test]
fn a_peer_that_leaves_turns_references_dead_and_fires_monitors() {
    run(async {
        let (server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = Watcher(seen.clone()).start();
        client.monitor(&counter, w.clone().recipient());
        client.monitor_node(server.id(), w.recipient());
        let pending = counter.send(Slow(5_000));
        let pending = actix::spawn(pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.shutdown().await;
        let e = pending.await.unwrap().unwrap_err();
        assert!(matches!(e, RemoteError::ConnectionLost { .. }), "{e}");
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
        assert!(eventually(WAIT, || seen.lock().unwrap().len() == 2).await);
        assert_eq!(client.stats().imports, 0);
        assert!(client.peers().is_empty());
    });
}

#[test]
fn handlers_see_the_authenticated_caller() {
    run(async {
        let (_server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        let who = counter.send(WhoAmI::default()).await.unwrap();
        assert_eq!(who, Some(format!("{} default", client.id())));
    });
}

#[test]
fn unregistering_tells_holders_their_references_are_dead() {
    run(async {
        let (server, client, addr) = server_and_client().await;
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        client.monitor(&counter, Watcher(seen.clone()).start().recipient());
        assert!(server.unregister("counter"));
        assert!(!server.unregister("counter"));
        assert!(eventually(WAIT, || !seen.lock().unwrap().is_empty()).await);
        assert_eq!(seen.lock().unwrap()[0], "actor ActorStopped");
        let e = counter.send(Get).await.unwrap_err();
        assert!(
            matches!(
                e,
                RemoteError::DeadReference {
                    reason: DeadReason::ActorStopped,
                    ..
                }
            ),
            "{e}"
        );
        let e = client
            .lookup::<Counter>(&addr, "counter")
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::UnknownActor { .. }), "{e}");
    });
}

#[test]
fn a_flood_of_one_way_messages_meets_backpressure_not_unbounded_memory() {
    run(async {
        let server = Node::builder()
            .cookie(COOKIE)
            .listen("tcp://127.0.0.1:0")
            .limits(Limits {
                max_inbound_in_flight: 4,
                ..Limits::default()
            })
            .start()
            .await
            .unwrap();
        export_counter(&server, "counter");
        let addr = server.local_addrs()[0].to_string();
        let client = Node::builder()
            .cookie(COOKIE)
            .limits(Limits {
                command_queue: 32,
                ..Limits::default()
            })
            .start()
            .await
            .unwrap();
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        let before = server.stats().calls_in;
        // The sender never yields, so the server (on this thread) reads
        // nothing meanwhile: frames go to the socket until it is full,
        // then wait in the connection's queues, which are bounded in
        // frames and in bytes. 5,000 messages of 16 KiB (80 MB) are far
        // more than they and the kernel's buffers hold.
        let mut full = 0;
        let mut sent = 0u64;
        for _ in 0..5_000 {
            match counter.do_send(Blob(vec![7; 16 * 1024])) {
                Ok(()) => sent += 1,
                Err(RemoteError::MailboxFull { .. }) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(full > 0, "the sender was never pushed back ({sent} sent)");
        // What was accepted is delivered, and the connection still works.
        let total = counter
            .send(Get)
            .timeout(Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(total, 0);
        assert_eq!(server.stats().calls_in - before, sent + 1);
        assert_eq!(counter.send(Add(1)).await.unwrap(), Ok(1));
    });
}
