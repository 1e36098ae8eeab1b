//! `courier ls`: a node's names, peers, and which peers hold references to
//! each of its exported actors (a leak detector for distributed reference
//! counting).

use std::path::Path;

use courier::info::{Ls, NodeListing};

use crate::common::{self, ConnArgs, Failure};

/// Flags of `courier ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node: tcp://HOST:PORT, unix:///PATH or quic://HOST:PORT.
    addr: String,

    /// Print the listing as JSON.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    conn: ConnArgs,
}

pub fn run(config: Option<&Path>, args: Args) -> Result<(), Failure> {
    let cfg = common::load(config, args.conn.overrides()?)?;
    common::block_on(common::ask_node_info(
        &cfg,
        &args.addr,
        Ls,
        "list",
        args.json,
        |l: &NodeListing, me: &str| render(l, me),
    ))
}

/// The listing as text; `me` is this command's own node id, marked among
/// the peers.
pub fn render(l: &NodeListing, me: &str) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let id = &l.identity;
    let _ = write!(o, "node {}", id.node);
    if let Some(n) = &id.name {
        let _ = write!(o, " ({n})");
    }
    let _ = writeln!(o, ", incarnation {}", id.incarnation);
    for a in &id.listen {
        let _ = writeln!(o, "listening on {a}");
    }

    let named: Vec<_> = l.exports.iter().filter(|e| e.name.is_some()).collect();
    let _ = writeln!(o, "\nnames: {}", named.len());
    for e in &named {
        let _ = writeln!(
            o,
            "  {:<24} actor {:<8} {}",
            e.name.as_deref().unwrap_or_default(),
            e.actor,
            e.actor_type
        );
    }

    let _ = writeln!(o, "\npeers: {}", l.peers.len());
    if !l.peers.is_empty() {
        let _ = writeln!(
            o,
            "  {:<32}  {:<6}  {:<10}  REMOTE",
            "NODE", "SCHEME", "KEY"
        );
    }
    for p in &l.peers {
        let you = if p.node == me { "  (this command)" } else { "" };
        let _ = writeln!(
            o,
            "  {:<32}  {:<6}  {:<10}  {}{you}",
            p.node, p.scheme, p.key_id, p.remote
        );
    }

    let _ = writeln!(o, "\nexports: {}", l.exports.len());
    for e in &l.exports {
        let total: u64 = e.holders.iter().map(|h| h.count).sum();
        let _ = writeln!(
            o,
            "  actor {} {} ({}), restarts {}, handles {}",
            e.actor,
            e.name.as_deref().unwrap_or("(anonymous)"),
            e.actor_type,
            e.restarts,
            e.message_types.join(", ")
        );
        if e.holders.is_empty() {
            let _ = writeln!(o, "    held by no peer");
        }
        for h in &e.holders {
            let _ = writeln!(
                o,
                "    held by {}: {} reference{}",
                h.peer,
                h.count,
                if h.count == 1 { "" } else { "s" }
            );
        }
        if e.holders.len() > 1 {
            let _ = writeln!(o, "    total: {total} references");
        }
    }
    o
}
