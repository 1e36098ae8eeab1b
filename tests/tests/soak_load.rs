//! Soak and load, short by default (CI), long with `COURIER_SOAK=1`:
//!
//! - 1,000 concurrent connections (1,000 client nodes) doing request/reply
//!   against one node;
//! - calls with references passed and dropped at random across three nodes
//!   (20,000 short, 1,000,000 long), some handed to a third node.
//!
//! At the end: zero calls lost or answered twice, every reference table
//! back to zero, and open descriptors and resident memory back within the
//! margins below of where they started.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix::prelude::*;
use courier::{Node, RemoteAddr};
use courier_tests::*;
use serde::{Deserialize, Serialize};

/// Descriptors allowed to stay open after a test (the runtime's own, the
/// test harness's).
const FD_MARGIN: usize = 16;
/// Resident memory a repeated round may add to the one before it (the
/// allocator does not hand every freed page back). A leak of one
/// connection's or one call's state per round would exceed it.
const RSS_MARGIN_KIB: u64 = 32 * 1024;

fn long() -> bool {
    std::env::var_os("COURIER_SOAK").is_some_and(|v| v != "0")
}

/// Descriptors and resident memory are the whole process's: the tests in
/// this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    actix::System::new().block_on(f);
}

async fn settle_fds(before: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let now = open_fds();
        if now <= before + FD_MARGIN || Instant::now() > end {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One round of the load test: a node, `conns` client nodes connected to
/// it, `rounds` calls from each at once, then everything shut down.
/// Returns (connect time, call time, peak descriptors, peak memory KiB).
async fn thousand_round(conns: usize, rounds: usize) -> (Duration, Duration, usize, u64) {
    let t = Instant::now();
    let server = Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_secs(1), Duration::from_secs(20))
        .listen("tcp://127.0.0.1:0")
        .start()
        .await
        .unwrap();
    export_counter(&server, "counter");
    let addr = server.local_addrs()[0].to_string();

    // Connect in waves of 32 (the node's default cap on connections in
    // the handshake is 64), then hold them all.
    let mut clients = Vec::with_capacity(conns);
    let mut refs: Vec<RemoteAddr<Counter>> = Vec::with_capacity(conns);
    for wave in 0..conns.div_ceil(32) {
        let mut joins = Vec::new();
        for _ in 0..32.min(conns - wave * 32) {
            let c = Node::builder()
                .cookie(COOKIE)
                .heartbeat(Duration::from_secs(1), Duration::from_secs(20))
                .start()
                .await
                .unwrap();
            let a = addr.clone();
            let c2 = c.clone();
            joins.push(actix::spawn(async move {
                c2.lookup::<Counter>(&a, "counter").await
            }));
            clients.push(c);
        }
        for j in joins {
            refs.push(j.await.unwrap().expect("connects"));
        }
    }
    assert_eq!(server.stats().connections, conns);
    let connected = t.elapsed();

    // Every connection makes `rounds` calls, all at once.
    let t = Instant::now();
    let tasks: Vec<_> = refs
        .iter()
        .cloned()
        .map(|r| {
            actix::spawn(async move {
                let mut n = 0u64;
                for _ in 0..rounds {
                    r.send(Add(1))
                        .timeout(Duration::from_secs(30))
                        .await
                        .expect("answered")
                        .expect("added");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut answered = 0u64;
    for task in tasks {
        answered += task.await.unwrap();
    }
    let calls = (conns * rounds) as u64;
    assert_eq!(answered, calls, "calls lost");
    let total = refs[0].send(Get).await.unwrap();
    assert_eq!(total, calls, "calls applied: none lost, none twice");
    let took = t.elapsed();
    let peak = (open_fds(), rss_kib());

    drop(refs);
    let shutdowns: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| actix::spawn(async move { c.shutdown().await }))
        .collect();
    for s in shutdowns {
        s.await.unwrap();
    }
    drop(clients);
    assert!(
        eventually(Duration::from_secs(20), || server.stats().connections == 0).await,
        "{:?}",
        server.stats()
    );
    assert_eq!(server.stats().imports, 0);
    assert!(server.exports().iter().all(|e| e.holders.is_empty()));
    server.shutdown().await;
    // Shutdown stops listening: the port refuses new connections.
    let hp = addr.trim_start_matches("tcp://").to_owned();
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(&hp)
            .is_err())
        .await,
        "{addr} still accepts connections after shutdown"
    );
    (connected, took, peak.0, peak.1)
}

#[test]
fn a_thousand_concurrent_connections_doing_request_reply() {
    let conns = 1_000usize;
    let rounds = if long() { 200 } else { 10 };
    let limit = raise_nofile(4 * conns as u64 + 256);
    assert!(
        limit >= 2 * conns as u64 + 64,
        "the open-file limit is {limit}: too low for {conns} connections (each has two ends here)"
    );
    run(async move {
        let fds0 = open_fds();
        // Two rounds warm the allocator and the runtime's pools up (the
        // allocator does not hand every freed page back at once); after
        // them, further rounds must end where the warm-up did.
        let mut first = None;
        for _ in 0..2 {
            let r = thousand_round(conns, rounds).await;
            first.get_or_insert(r);
        }
        let fds1 = settle_fds(fds0).await;
        let rss1 = rss_kib();
        let measured = if long() { 8 } else { 1 };
        let mut last = first.expect("two rounds ran");
        for _ in 0..measured {
            last = thousand_round(conns, rounds).await;
        }
        let (connected, took, peak_fds, peak_rss) = last;
        let fds2 = settle_fds(fds0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss2 = rss_kib();
        println!(
            "{conns} connections held (connected in {connected:?}); {} calls per round, \
             answered in {took:?}; {measured} measured round(s) after 2 warm-up rounds; \
             descriptors {fds0} -> {fds1} -> {peak_fds} -> {fds2}; memory after warm-up \
             {rss1} KiB, peak {peak_rss}, at the end {rss2} KiB",
            conns * rounds
        );
        assert!(
            fds1 <= fds0 + FD_MARGIN && fds2 <= fds0 + FD_MARGIN,
            "descriptors leaked: {fds0} -> {fds1} -> {fds2}"
        );
        assert!(
            rss2 <= rss1 + RSS_MARGIN_KIB,
            "memory grew from round to round: {rss1} -> {rss2} KiB"
        );
    });
}

/// A node's hub: answers pings (noticing duplicates) and holds references
/// to items, handing back the one it replaces.
#[derive(Default)]
struct Hub {
    held: Vec<Option<RemoteAddr<Item>>>,
    seen: HashSet<u64>,
}

impl Actor for Hub {
    type Context = Context<Self>;
}

/// An item: an anonymous actor whose references travel.
struct Item(u64);

impl Actor for Item {
    type Context = Context<Self>;
}

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<u64, String>")]
struct Ping(u64);

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Option<RemoteAddr<Item>>")]
struct Hold {
    item: RemoteAddr<Item>,
    slot: u8,
}

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "usize")]
struct DropAll;

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
struct Which;

courier::remote_message!(
    Ping = "soak.hub.ping",
    Hold = "soak.hub.hold",
    DropAll = "soak.hub.drop_all",
    Which = "soak.item.which",
);

impl Handler<Ping> for Hub {
    type Result = Result<u64, String>;
    fn handle(&mut self, m: Ping, _: &mut Context<Self>) -> Self::Result {
        if self.seen.insert(m.0) {
            Ok(m.0)
        } else {
            Err(format!("ping {} delivered twice", m.0))
        }
    }
}

impl Handler<Hold> for Hub {
    type Result = MessageResult<Hold>;
    fn handle(&mut self, m: Hold, _: &mut Context<Self>) -> Self::Result {
        let slot = m.slot as usize % 8;
        if self.held.len() < 8 {
            self.held.resize_with(8, || None);
        }
        MessageResult(self.held[slot].replace(m.item))
    }
}

impl Handler<DropAll> for Hub {
    type Result = usize;
    fn handle(&mut self, _: DropAll, _: &mut Context<Self>) -> usize {
        let n = self.held.iter().flatten().count();
        self.held.clear();
        n
    }
}

impl Handler<Which> for Item {
    type Result = u64;
    fn handle(&mut self, _: Which, _: &mut Context<Self>) -> u64 {
        self.0
    }
}

fn new_item(node: &Node, id: u64) -> RemoteAddr<Item> {
    node.export(Item(id).start()).handles::<Which>().anonymous()
}

/// A small deterministic generator (xorshift), so a failing run replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one operation did: calls made and answered, and an item reference
/// that came back (to be kept by the node that made the call).
struct Outcome {
    node: usize,
    calls: u64,
    answered: u64,
    got: Option<RemoteAddr<Item>>,
    error: Option<String>,
}

/// One run of the three-node workload: `total_calls` calls, then every
/// reference let go and the nodes shut down. Returns a report line.
async fn three_node_round(total_calls: u64, seed: u64) -> String {
    let window = 64;
    let t = Instant::now();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    let mut locals = Vec::new();
    for _ in 0..3 {
        let n = Node::builder()
            .cookie(COOKIE)
            .heartbeat(Duration::from_secs(1), Duration::from_secs(20))
            .listen("tcp://127.0.0.1:0")
            .start()
            .await
            .unwrap();
        let local = n
            .export(Hub::default().start())
            .handles::<Ping>()
            .handles::<Hold>()
            .handles::<DropAll>()
            .register("hub")
            .unwrap();
        addrs.push(n.local_addrs()[0].to_string());
        locals.push(local);
        nodes.push(n);
    }
    // hubs[x][y]: node x's reference to node y's hub (its own: local).
    let mut hubs: Vec<Vec<RemoteAddr<Hub>>> = Vec::new();
    for (x, n) in nodes.iter().enumerate() {
        let mut row = Vec::new();
        for (y, a) in addrs.iter().enumerate() {
            if x == y {
                row.push(locals[y].clone());
            } else {
                row.push(n.lookup::<Hub>(a, "hub").await.unwrap());
            }
        }
        hubs.push(row);
    }
    drop(locals);
    // pools[x]: item references node x holds (its own or others').
    let mut pools: Vec<Vec<RemoteAddr<Item>>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut rng = Rng(seed);
    let (mut calls, mut answered, mut next_id) = (0u64, 0u64, 0u64);
    let (mut passed, mut third_party, mut dropped) = (0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();

    while calls < total_calls {
        let mut ops = Vec::with_capacity(window);
        for _ in 0..window {
            let x = rng.below(3) as usize;
            let y = rng.below(3) as usize;
            let hub = hubs[x][y].clone();
            let roll = rng.below(100);
            next_id += 1;
            let id = next_id;
            if roll < 45 {
                ops.push(actix::spawn(async move {
                    let r = hub.send(Ping(id)).await;
                    let ok = matches!(&r, Ok(Ok(v)) if *v == id);
                    Outcome {
                        node: x,
                        calls: 1,
                        answered: u64::from(ok),
                        got: None,
                        error: (!ok).then(|| format!("ping: {r:?}")),
                    }
                }));
            } else if roll < 80 {
                // Pass a reference: a new item of x's, or one x holds
                // (perhaps another node's: a third-party hand-off).
                let pool = &mut pools[x];
                let item = if pool.is_empty() || rng.below(2) == 0 {
                    new_item(&nodes[x], id)
                } else {
                    let i = rng.below(pool.len() as u64) as usize;
                    let it = pool.swap_remove(i);
                    if it
                        .id()
                        .is_some_and(|a| a.node != nodes[x].id() && a.node != nodes[y].id())
                    {
                        third_party += 1;
                    }
                    it
                };
                passed += 1;
                let slot = rng.below(8) as u8;
                ops.push(actix::spawn(async move {
                    let r = hub.send(Hold { item, slot }).await;
                    Outcome {
                        node: x,
                        calls: 1,
                        answered: u64::from(r.is_ok()),
                        error: r.as_ref().err().map(|e| format!("hold: {e}")),
                        got: r.ok().flatten(),
                    }
                }));
            } else if roll < 95 && !pools[x].is_empty() {
                let i = rng.below(pools[x].len() as u64) as usize;
                let item = pools[x][i].clone();
                ops.push(actix::spawn(async move {
                    let r = item.send(Which).await;
                    Outcome {
                        node: x,
                        calls: 1,
                        answered: u64::from(r.is_ok()),
                        got: None,
                        error: r.err().map(|e| format!("call to an item {item:?}: {e}")),
                    }
                }));
            } else if roll < 98 && !pools[x].is_empty() {
                let i = rng.below(pools[x].len() as u64) as usize;
                drop(pools[x].swap_remove(i));
                dropped += 1;
            } else {
                ops.push(actix::spawn(async move {
                    let r = hub.send(DropAll).await;
                    Outcome {
                        node: x,
                        calls: 1,
                        answered: u64::from(r.is_ok()),
                        got: None,
                        error: r.err().map(|e| format!("drop all: {e}")),
                    }
                }));
            }
        }
        for op in ops {
            let o = op.await.unwrap();
            if let Some(e) = o.error {
                errors.push(e);
            }
            calls += o.calls;
            answered += o.answered;
            if let Some(item) = o.got {
                let pool = &mut pools[o.node];
                pool.push(item);
                if pool.len() > 32 {
                    let i = rng.below(pool.len() as u64) as usize;
                    drop(pool.swap_remove(i));
                    dropped += 1;
                }
            }
        }
        assert_eq!(answered, calls, "a call was lost or failed: {errors:?}");
    }
    let took = t.elapsed();
    let peak_rss = rss_kib();

    // Let go of everything: the tables must come back to zero.
    for row in &hubs {
        for h in row {
            h.send(DropAll).await.unwrap();
        }
    }
    pools.clear();
    drop(hubs);
    let clean = |nodes: &[Node]| {
        nodes.iter().all(|n| {
            n.stats().imports == 0
                && n.exports()
                    .iter()
                    .all(|e| e.name.as_deref() == Some("hub") && e.holders.is_empty())
        })
    };
    let ok = eventually(Duration::from_secs(30), || clean(&nodes)).await;
    for (i, n) in nodes.iter().enumerate() {
        let held: Vec<_> = n
            .exports()
            .into_iter()
            .filter(|e| !e.holders.is_empty() || e.name.is_none())
            .collect();
        assert!(
            ok,
            "node {i}: imports {}, exports still held: {held:?}",
            n.stats().imports
        );
    }
    for n in &nodes {
        n.shutdown().await;
    }
    drop(nodes);
    format!(
        "{calls} calls across three nodes in {took:?}: {answered} answered, {} lost; \
             {passed} references passed ({third_party} to a third node), {dropped} dropped; \
             tables back to zero; peak memory {peak_rss} KiB",
        calls - answered
    )
}

#[test]
fn calls_with_references_passed_and_dropped_at_random_across_three_nodes() {
    let total_calls: u64 = if long() { 1_000_000 } else { 20_000 };
    run(async move {
        let fds0 = open_fds();
        // A short warm-up round first: the allocator and the runtime's
        // pools settle; then the real run must end where it began.
        let warm = three_node_round(2_000, 7).await;
        let fds1 = settle_fds(fds0).await;
        let rss1 = rss_kib();
        let report = three_node_round(total_calls, 0x9e37_79b9_7f4a_7c15).await;
        let fds2 = settle_fds(fds0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss2 = rss_kib();
        println!("warm-up: {warm}");
        println!("{report}; descriptors {fds0} -> {fds1} -> {fds2}; memory {rss1} -> {rss2} KiB");
        assert!(
            fds1 <= fds0 + FD_MARGIN && fds2 <= fds0 + FD_MARGIN,
            "descriptors leaked: {fds0} -> {fds1} -> {fds2}"
        );
        assert!(
            rss2 <= rss1 + RSS_MARGIN_KIB,
            "memory stayed up: {rss1} -> {rss2} KiB"
        );
    });
}
