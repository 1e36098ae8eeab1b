//! A node for multi-process tests: listens where told, exports a counter
//! ("counter"), a room ("room") and, as a worker, a member ("worker"), then
//! prints `READY <address>` and runs until killed.
//!
//! Usage: `courier-test-node LISTEN_ADDR [--relay ROOM_ADDR]`, or as a
//! worker with `COURIER_PARENT=fd://N` set.

use std::io::Write;

use courier::Role;
use courier_tests::{export_counter, export_room, new_member, Members, COOKIE};

#[actix::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut b = courier::Node::builder().cookie(COOKIE).heartbeat(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_millis(1500),
    );
    let worker = std::env::var(courier::WORKER_ENV).is_ok();
    if worker {
        let link = courier::worker_link_from_env().await.expect("parent link");
        b = b.link(link, Role::Initiator, "fd");
    } else if let Some(l) = args.get(1) {
        b = b.listen(l.clone());
    }
    let node = b.start().await.expect("node starts");
    export_counter(&node, "counter");
    export_room(&node, "room");
    let me = new_member(&node);
    node.export(actix::Actor::start(courier_tests::Member::default()))
        .handles::<courier_tests::Say>()
        .handles::<courier_tests::Heard>()
        .handles::<courier_tests::WriteInto>()
        .register("worker")
        .expect("free");
    // `--relay ROOM_ADDR`: fetch the members of the room at ROOM_ADDR and
    // tell each something (a reference passed on to a third node).
    if args.get(2).map(String::as_str) == Some("--relay") {
        let room_addr = args.get(3).expect("room address");
        let room = node
            .lookup::<courier_tests::Room>(room_addr, "room")
            .await
            .expect("room");
        let members = room.send(Members).await.expect("members");
        for (name, m) in &members {
            let n = m
                .send(courier_tests::Say(format!("hello {name}, from the relay")))
                .await
                .expect("say");
            println!("SAID {name} {n}");
        }
        drop(members);
        drop(room);
    }
    drop(me);
    let addrs: Vec<String> = node.local_addrs().iter().map(|a| a.to_string()).collect();
    println!("READY {}", addrs.first().cloned().unwrap_or_default());
    std::io::stdout().flush().ok();
    // Run until killed.
    futures_pending().await;
}

async fn futures_pending() {
    std::future::pending::<()>().await
}
