//! Property tests of distributed reference counting: random sequences of
//! export, send, send-again, pass-on, drop, delivery, release and connection
//! loss across two and three nodes. Every run must end with every table
//! empty, and no actor may be freed while a node still holds a live handle
//! to it (other than one still securing its own count).

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use crate::id::{ActorId, Incarnation, NodeId};
use crate::refs::{Exports, HandOff, Imports};
use crate::wire::ReleaseEntry;

#[derive(Clone, Debug)]
enum Msg {
    Ref { actor: ActorId, loan: Option<u64> },
    Release(Vec<ReleaseEntry>),
    Acquire(ActorId),
    Acquired(ActorId, bool),
    Unlend(u64),
}

struct Node {
    id: NodeId,
    exports: Exports<usize>,
    /// Which app actor (index) is exported under which id.
    exported: HashMap<usize, ActorId>,
    imports: Imports,
    /// Live handles per imported actor.
    handles: HashMap<ActorId, u32>,
    /// Handles made dead by a connection loss (dropping them does nothing).
    dead_handles: u32,
}

struct World {
    nodes: Vec<Node>,
    links: HashMap<(usize, usize), VecDeque<Msg>>,
    app_actors: usize,
    /// Whether a connection was lost (loans may then break).
    killed: bool,
}

#[derive(Clone, Debug)]
enum Op {
    /// `from` sends a reference to `to`: its own actor, or one it holds.
    Send { from: usize, to: usize, pick: usize },
    /// Deliver the next message on the link `from -> to`.
    Deliver { from: usize, to: usize },
    /// `node` drops one handle.
    Drop { node: usize, pick: usize },
    /// `node` sends its batched releases and unlends.
    Flush { node: usize },
    /// The connection between `a` and `b` is lost.
    Kill { a: usize, b: usize },
}

fn node_id(i: usize) -> NodeId {
    NodeId([i as u8 + 1; 16])
}

fn index_of(id: NodeId) -> usize {
    id.0[0] as usize - 1
}

impl World {
    fn new(n: usize) -> Self {
        let nodes = (0..n)
            .map(|i| Node {
                id: node_id(i),
                exports: Exports::new(node_id(i), Incarnation(7), u64::MAX),
                exported: HashMap::new(),
                imports: Imports::new(),
                handles: HashMap::new(),
                dead_handles: 0,
            })
            .collect();
        Self {
            nodes,
            links: HashMap::new(),
            app_actors: 3,
            killed: false,
        }
    }

    fn push(&mut self, from: usize, to: usize, m: Msg) {
        self.links.entry((from, to)).or_default().push_back(m);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send { from, to, pick } => self.send(from, to, pick),
            Op::Deliver { from, to } => {
                if let Some(m) = self.links.get_mut(&(from, to)).and_then(|q| q.pop_front()) {
                    self.deliver(from, to, m);
                }
            }
            Op::Drop { node, pick } => self.drop_handle(node, pick),
            Op::Flush { node } => self.flush(node),
            Op::Kill { a, b } => self.kill(a, b),
        }
    }

    fn send(&mut self, from: usize, to: usize, pick: usize) {
        if from == to {
            return;
        }
        let n = &mut self.nodes[from];
        let mut held: Vec<ActorId> = n.handles.keys().copied().collect();
        held.sort();
        let choice = pick % (self.app_actors + held.len());
        let to_id = node_id(to);
        let msg = if choice < self.app_actors {
            // One of its own actors: export it if needed, count the send.
            let id = match n.exported.get(&choice) {
                Some(id) => *id,
                None => {
                    let id = n.exports.export(choice, false);
                    n.exported.insert(choice, id);
                    id
                }
            };
            n.exports.note_sent(id.local, to_id).unwrap();
            Msg::Ref {
                actor: id,
                loan: None,
            }
        } else {
            let actor = held[choice - self.app_actors];
            if actor.node == to_id {
                // Back to its owner: no counting needed.
                Msg::Ref { actor, loan: None }
            } else {
                let token = n.imports.lend(actor, to_id).unwrap();
                Msg::Ref {
                    actor,
                    loan: Some(token),
                }
            }
        };
        self.push(from, to, msg);
    }

    fn deliver(&mut self, from: usize, to: usize, m: Msg) {
        let from_id = node_id(from);
        let n = &mut self.nodes[to];
        match m {
            Msg::Ref { actor, loan } => {
                if actor.node == n.id {
                    return; // Its own actor: a local reference.
                }
                match loan {
                    None => {
                        n.imports.receive_direct(actor);
                    }
                    Some(token) => {
                        if n.imports.receive_third_party(actor, from_id, token)
                            == HandOff::MustAcquire
                        {
                            let owner = index_of(actor.node);
                            self.push(to, owner, Msg::Acquire(actor));
                        }
                    }
                }
                *self.nodes[to].handles.entry(actor).or_insert(0) += 1;
            }
            Msg::Release(entries) => {
                for e in entries {
                    if let Some((_, app)) = n
                        .exports
                        .release(from_id, e.incarnation, e.target, e.count)
                        .unwrap()
                    {
                        n.exported.remove(&app);
                    }
                }
            }
            Msg::Acquire(actor) => {
                let ok = n.exports.note_sent(actor.local, from_id).is_ok();
                self.push(to, from, Msg::Acquired(actor, ok));
            }
            Msg::Acquired(actor, ok) => {
                assert!(
                    ok || self.killed,
                    "an acquire failed although the lender held a loan"
                );
                let dead = n.imports.acquired(actor, ok).unwrap();
                assert_eq!(dead, !ok);
                if dead {
                    if let Some(c) = n.handles.remove(&actor) {
                        n.dead_handles += c;
                    }
                }
            }
            Msg::Unlend(token) => n.imports.unlend(token, from_id).unwrap(),
        }
    }

    fn drop_handle(&mut self, node: usize, pick: usize) {
        let n = &mut self.nodes[node];
        let mut held: Vec<ActorId> = n.handles.keys().copied().collect();
        held.sort();
        if held.is_empty() {
            n.dead_handles = n.dead_handles.saturating_sub(1);
            return;
        }
        let actor = held[pick % held.len()];
        let c = n.handles.get_mut(&actor).unwrap();
        *c -= 1;
        if *c == 0 {
            n.handles.remove(&actor);
            n.imports.handles_dropped(actor);
        }
    }

    fn flush(&mut self, node: usize) {
        while let Some((owner, entries)) = self.nodes[node].imports.poll_release() {
            self.push(node, index_of(owner), Msg::Release(entries));
        }
        while let Some((lender, token)) = self.nodes[node].imports.poll_unlend() {
            self.push(node, index_of(lender), Msg::Unlend(token));
        }
    }

    fn kill(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        self.killed = true;
        self.links.remove(&(a, b));
        self.links.remove(&(b, a));
        for (x, y) in [(a, b), (b, a)] {
            let peer = node_id(y);
            let n = &mut self.nodes[x];
            for (_, app) in n.exports.peer_lost(peer) {
                n.exported.remove(&app);
            }
            for actor in n.imports.peer_lost(peer) {
                if let Some(c) = n.handles.remove(&actor) {
                    n.dead_handles += c;
                }
            }
        }
    }

    /// No live handle points at a freed export, unless its holder is still
    /// acquiring its own count (a loan broken by a connection loss).
    fn check_no_premature_free(&self, allow_acquiring: bool) {
        for n in &self.nodes {
            for actor in n.handles.keys() {
                let owner = &self.nodes[index_of(actor.node)];
                let alive = owner.exports.get(actor.incarnation, actor.local).is_ok();
                let excused = allow_acquiring && n.imports.is_acquiring(actor);
                assert!(
                    alive || excused,
                    "node {} holds a live handle to {actor}, which its owner freed",
                    index_of(n.id)
                );
            }
        }
        for ((from, _), q) in &self.links {
            for m in q {
                if let Msg::Ref { actor, .. } = m {
                    let owner = &self.nodes[index_of(actor.node)];
                    // A reference in flight from a node that holds it live
                    // keeps its target alive the same way.
                    if self.nodes[*from].handles.contains_key(actor) || actor.node == node_id(*from)
                    {
                        let alive = owner.exports.get(actor.incarnation, actor.local).is_ok();
                        assert!(
                            alive || allow_acquiring,
                            "in-flight reference to freed {actor}"
                        );
                    }
                }
            }
        }
    }

    /// Drops everything and runs the protocol to rest; every table must
    /// then be empty.
    fn wind_down(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            n.dead_handles = 0;
            let held: Vec<ActorId> = n.handles.drain().map(|(a, _)| a).collect();
            for a in held {
                n.imports.handles_dropped(a);
            }
        }
        for _ in 0..10_000 {
            for i in 0..self.nodes.len() {
                self.flush(i);
            }
            let Some(&key) = self
                .links
                .iter()
                .find(|(_, q)| !q.is_empty())
                .map(|(k, _)| k)
            else {
                break;
            };
            let m = self.links.get_mut(&key).unwrap().pop_front().unwrap();
            self.deliver(key.0, key.1, m);
            // Handles created by late deliveries are dropped at once.
            for i in 0..self.nodes.len() {
                let held: Vec<ActorId> = self.nodes[i].handles.drain().map(|(a, _)| a).collect();
                for a in held {
                    self.nodes[i].imports.handles_dropped(a);
                }
            }
        }
        assert!(self.links.values().all(|q| q.is_empty()), "livelock");
        for n in &self.nodes {
            assert!(
                n.exports.is_empty(),
                "node {} still exports {} actors",
                index_of(n.id),
                n.exports.len()
            );
            assert!(
                n.imports.is_empty(),
                "node {} still imports {} actors ({} loans)",
                index_of(n.id),
                n.imports.len(),
                n.imports.loans()
            );
        }
    }
}

fn op(n: usize, kills: bool) -> impl Strategy<Value = Op> {
    let weights_kill = if kills { 1 } else { 0 };
    prop_oneof![
        4 => (0..n, 0..n, 0usize..16).prop_map(|(from, to, pick)| Op::Send { from, to, pick }),
        6 => (0..n, 0..n).prop_map(|(from, to)| Op::Deliver { from, to }),
        3 => (0..n, 0usize..16).prop_map(|(node, pick)| Op::Drop { node, pick }),
        2 => (0..n).prop_map(|node| Op::Flush { node }),
        weights_kill => (0..n, 0..n).prop_map(|(a, b)| Op::Kill { a, b }),
    ]
}

fn run(n: usize, ops: &[Op], kills: bool) {
    let mut w = World::new(n);
    for o in ops {
        w.apply(o);
        w.check_no_premature_free(kills);
    }
    w.wind_down();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn two_nodes_end_empty(ops in proptest::collection::vec(op(2, false), 0..200)) {
        run(2, &ops, false);
    }

    #[test]
    fn three_nodes_with_hand_offs_end_empty(ops in proptest::collection::vec(op(3, false), 0..300)) {
        run(3, &ops, false);
    }

    #[test]
    fn three_nodes_with_connection_loss_end_empty(ops in proptest::collection::vec(op(3, true), 0..300)) {
        run(3, &ops, true);
    }
}
