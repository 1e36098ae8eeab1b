//! `courier ls`: a node's names, peers, and which peers hold references to
//! each of its exported actors (a leak detector for distributed reference
//! counting).

use std::path::Path;

use courier::info::{node_hex, Ls, NodeInfo, NodeListing, NODE_INFO};

use crate::common::{self, classify, ConnArgs, Failure};

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
    common::block_on(async move {
        let node = common::client_node(&cfg, &args.addr).await?;
        let addr = args.addr.as_str();
        let timeout = common::timeout(&cfg);
        let info = common::within(timeout, node.lookup::<NodeInfo>(addr, NODE_INFO))
            .await
            .map_err(|e| classify(&e, addr))?;
        let listing = info
            .send(Ls)
            .timeout(timeout)
            .await
            .map_err(|e| classify(&e, addr))?
            .map_err(|e| Failure::failed(format!("{addr} could not list: {e}")))?;
        let me = node_hex(&node.id());
        if args.json {
            let text = serde_json::to_string_pretty(&listing)
                .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
            println!("{text}");
        } else {
            print!("{}", render(&listing, &me));
        }
        node.shutdown().await;
        Ok(())
    })
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
