//! `courier stats`: a node's counters.

use std::path::Path;

use courier::info::{Stats, StatsReport};

use crate::common::{self, bytes, count, us, ConnArgs, Failure};

/// Flags of `courier stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node: tcp://HOST:PORT, unix:///PATH or quic://HOST:PORT.
    addr: String,

    /// Print the counters as JSON (the `courier::info::StatsReport` type).
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
        Stats,
        "report",
        args.json,
        |r: &StatsReport, _: &str| render(r),
    ))
}

/// The report as text.
pub fn render(r: &StatsReport) -> String {
    use std::fmt::Write;
    let s = &r.stats;
    let mut o = String::new();
    let _ = write!(o, "node               {}", r.identity.node);
    if let Some(n) = &r.identity.name {
        let _ = write!(o, " ({n})");
    }
    let _ = writeln!(o, ", up {:.1} s", r.uptime_secs);
    let _ = writeln!(o, "connections        {}", s.connections);
    let _ = writeln!(
        o,
        "calls              {} in, {} out",
        count(s.calls_in),
        count(s.calls_out)
    );
    let _ = writeln!(
        o,
        "bytes              {} in, {} out",
        bytes(s.bytes_in),
        bytes(s.bytes_out)
    );
    let _ = writeln!(
        o,
        "exported           {} actors, {} references held by peers",
        s.exports, s.exported_refs
    );
    let _ = writeln!(o, "imported           {} actors", s.imports);
    let _ = writeln!(o, "dead peers         {}", s.peers_lost);
    let _ = writeln!(o, "handshake failures {}", s.handshakes_failed);
    let l = &s.latency;
    if l.count == 0 {
        let _ = writeln!(o, "latency            no calls made by this node");
    } else {
        let _ = writeln!(
            o,
            "latency            {} calls: min {}, avg {}, p50 {}, p99 {}, max {}",
            count(l.count),
            us(l.min_us),
            us(l.avg_us),
            us(l.p50_us),
            us(l.p99_us),
            us(l.max_us)
        );
    }
    o
}
