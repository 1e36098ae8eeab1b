//! A node for multi-process tests: listens where told, exports a counter
//! ("counter"), a room ("room") and, as a worker, a member ("worker"), then
//! prints `READY <address>` and runs until killed.
//!
//! Usage: `courier-test-node LISTEN_ADDR [--relay ROOM_ADDR]
//! [--node-id HEX32] [--heartbeat INTERVAL_MS TIMEOUT_MS]`, or as a worker
//! with `COURIER_PARENT=fd://N` set. A fixed `--node-id` makes a restarted
//! process the same node under a new incarnation.

use std::io::Write;
use std::time::Duration;

use courier::{NodeId, Role};
use courier_tests::{export_counter, export_room, new_member, Members, COOKIE};

fn parse_node_id(hex: &str) -> NodeId {
    assert_eq!(hex.len(), 32, "--node-id takes 32 hex digits");
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits");
    }
    NodeId(b)
}

#[actix::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut listen = None;
    let mut relay = None;
    let mut node_id = None;
    let mut heartbeat = (Duration::from_millis(500), Duration::from_millis(1500));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().expect("flag value").clone();
        match a.as_str() {
            "--relay" => relay = Some(value()),
            "--node-id" => node_id = Some(parse_node_id(&value())),
            "--heartbeat" => {
                let i = value().parse().expect("interval ms");
                let t = value().parse().expect("timeout ms");
                heartbeat = (Duration::from_millis(i), Duration::from_millis(t));
            }
            other => listen = Some(other.to_owned()),
        }
    }
    let mut b = courier::Node::builder()
        .cookie(COOKIE)
        .heartbeat(heartbeat.0, heartbeat.1);
    if let Some(id) = node_id {
        b = b.node_id(id);
    }
    let worker = std::env::var(courier::WORKER_ENV).is_ok();
    if worker {
        let link = courier::worker_link_from_env().await.expect("parent link");
        b = b.link(link, Role::Initiator, "fd");
    } else if let Some(l) = listen {
        b = b.listen(l);
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
    if let Some(room_addr) = relay {
        let room = node
            .lookup::<courier_tests::Room>(&room_addr, "room")
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
    std::future::pending::<()>().await
}
