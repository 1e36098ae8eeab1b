//! The node-info actor: every node exports it under [`NODE_INFO`], and it
//! answers [`Ls`] (names, peers, exports and who holds them), [`Stats`]
//! (the node's counters) and [`Ping`] (the cheapest round trip). The `courier ls` and `courier stats` commands are
//! its clients; any program can be one:
//!
//! ```no_run
//! # async fn demo(node: &courier::Node) -> Result<(), courier::RemoteError> {
//! use courier::info::{Ls, NodeInfo, NODE_INFO};
//!
//! let info = node.lookup::<NodeInfo>("tcp://127.0.0.1:7000", NODE_INFO).await?;
//! // The inner error only says the node is shutting down.
//! let listing = info.send(Ls).await?.unwrap_or_else(|e| panic!("{e}"));
//! for e in &listing.exports {
//!     for h in &e.holders {
//!         println!("{} holds {} references to {}", h.peer, h.count, e.actor);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Like every exported actor it is reachable only over an authenticated
//! connection: a peer must complete the handshake (prove it has the
//! cookie) before any frame of its is decoded as a message, so nothing is
//! answered before that. What it reveals (names, peer ids and addresses,
//! counters) is what any authenticated peer could learn by looking names
//! up; it offers no way to change the node.

use std::sync::{Arc, Weak};
use std::time::Instant;

use actix::{Actor, Context, Handler, Message};
use serde::{Deserialize, Serialize};

use crate::node::{Node, NodeShared, NodeStats};
use crate::{NodeId, RemoteError};

/// The reserved name under which every node exports its node-info actor.
pub const NODE_INFO: &str = "courier.node-info";

/// The node-info actor. Started and exported by [`crate::NodeBuilder::start`];
/// peers reach it with `lookup::<NodeInfo>(addr, NODE_INFO)`.
pub struct NodeInfo {
    node: Weak<NodeShared>,
    started: Instant,
}

impl Actor for NodeInfo {
    type Context = Context<Self>;
}

/// Asks for the node's names, peers and exports: [`NodeListing`].
#[derive(Clone, Copy, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<NodeListing, String>")]
pub struct Ls;

/// Asks for the node's counters: [`StatsReport`].
#[derive(Clone, Copy, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<StatsReport, String>")]
pub struct Stats;

/// Replies with its number: the cheapest round trip, which `courier ping`
/// times.
#[derive(Clone, Copy, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Ping(pub u64);

crate::remote_message!(
    Ls = "courier.node-info.ls",
    Stats = "courier.node-info.stats",
    Ping = "courier.node-info.ping",
);

/// Who a node is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Its node id, 32 hex digits.
    pub node: String,
    /// Its incarnation (fresh at each start), hex.
    pub incarnation: String,
    /// Its human name, if it has one.
    pub name: Option<String>,
    /// The addresses it listens on.
    pub listen: Vec<String>,
}

/// A node's names, peers and exported actors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeListing {
    /// The node answering.
    pub identity: NodeIdentity,
    /// Its established connections.
    pub peers: Vec<PeerListing>,
    /// Its exported actors (named or not), with who holds references. The
    /// built-in root and node-info actors are left out.
    pub exports: Vec<ExportListing>,
}

/// One established connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerListing {
    /// The peer's node id, 32 hex digits.
    pub node: String,
    /// The peer's incarnation, hex.
    pub incarnation: String,
    /// The key the peer proved it holds.
    pub key_id: String,
    /// The transport: `tcp`, `unix`, `quic` or `fd`.
    pub scheme: String,
    /// The peer's address as the node sees it.
    pub remote: String,
}

/// One exported actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportListing {
    /// Its local id on the node, `slot.generation`.
    pub actor: String,
    /// Its registered name, if any.
    pub name: Option<String>,
    /// Its Rust type.
    pub actor_type: String,
    /// The message types it handles remotely.
    pub message_types: Vec<String>,
    /// Peers holding references to it, with how many each.
    pub holders: Vec<HolderListing>,
    /// How many times it was restarted.
    pub restarts: u64,
}

/// A peer's hold on an exported actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderListing {
    /// The peer's node id, 32 hex digits.
    pub peer: String,
    /// References sent to it and not yet released.
    pub count: u64,
}

/// A node's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The node answering.
    pub identity: NodeIdentity,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// The counters.
    pub stats: NodeStats,
}

/// A node id as 32 hex digits (its `Display` shows only the first 16).
pub fn node_hex(id: &NodeId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

impl NodeInfo {
    fn node(&self) -> Result<Node, String> {
        self.node
            .upgrade()
            .map(|shared| Node { shared })
            .ok_or_else(|| "the node is shutting down".to_owned())
    }
}

fn identity(node: &Node) -> NodeIdentity {
    NodeIdentity {
        node: node_hex(&node.id()),
        incarnation: node.incarnation().to_string(),
        name: node.shared.name.clone(),
        listen: node.local_addrs().iter().map(|a| a.to_string()).collect(),
    }
}

impl Handler<Ls> for NodeInfo {
    type Result = Result<NodeListing, String>;

    fn handle(&mut self, _: Ls, _: &mut Context<Self>) -> Self::Result {
        let node = self.node()?;
        let peers = node
            .peers()
            .into_iter()
            .map(|p| PeerListing {
                node: node_hex(&p.node),
                incarnation: p.incarnation.to_string(),
                key_id: p.key_id,
                scheme: p.scheme.to_owned(),
                remote: p.remote,
            })
            .collect();
        let mut exports: Vec<ExportListing> = node
            .exports()
            .into_iter()
            .map(|e| ExportListing {
                actor: e.id.local.to_string(),
                name: e.name,
                actor_type: e.actor_type.to_owned(),
                message_types: e.message_types.iter().map(|t| (*t).to_owned()).collect(),
                holders: e
                    .holders
                    .iter()
                    .map(|h| HolderListing {
                        peer: node_hex(&h.peer),
                        count: h.count,
                    })
                    .collect(),
                restarts: e.restarts,
            })
            .collect();
        exports.sort_by(|a, b| (&a.name, &a.actor).cmp(&(&b.name, &b.actor)));
        Ok(NodeListing {
            identity: identity(&node),
            peers,
            exports,
        })
    }
}

impl Handler<Stats> for NodeInfo {
    type Result = Result<StatsReport, String>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        let node = self.node()?;
        Ok(StatsReport {
            identity: identity(&node),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            stats: node.stats(),
        })
    }
}

impl Handler<Ping> for NodeInfo {
    type Result = u64;

    fn handle(&mut self, m: Ping, _: &mut Context<Self>) -> u64 {
        m.0
    }
}

/// Starts the node-info actor and registers it under [`NODE_INFO`].
pub(crate) fn export_node_info(node: &Node) -> Result<(), RemoteError> {
    let actor = NodeInfo {
        node: Arc::downgrade(&node.shared),
        started: Instant::now(),
    };
    node.export(actor.start())
        .handles::<Ls>()
        .handles::<Stats>()
        .handles::<Ping>()
        .register(NODE_INFO)
        .map(drop)
}
