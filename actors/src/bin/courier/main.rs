//! `courier`: run, inspect and measure Courier nodes.
//!
//! ```text
//! courier keygen --dir ./keys                        # cookie + QUIC certificate
//! courier node --listen tcp://0.0.0.0:7000           # a standalone node with an echo actor
//! courier ping tcp://host:7000                       # authenticate and time round trips
//! courier ls tcp://host:7000                         # names, peers, who holds what
//! courier stats tcp://host:7000 --json               # counters
//! courier bench [tcp://host:7000]                    # request/reply and one-way rates
//! ```
//!
//! Settings come from the flags, then the environment (`COURIER_*`), then
//! the TOML file given with `--config` (or `$COURIER_CONFIG`); see the
//! README's "Configuration" section. Exit codes: 0 success, 1 failure,
//! 2 bad usage or configuration, 3 unreachable or refused, 4 authentication
//! failed (wrong key), 5 certificate not trusted.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod common;
mod keygen;
mod ls;
mod node;
mod ping;
mod stats;

use common::Failure;

/// Run, inspect and measure Courier nodes.
#[derive(Debug, Parser)]
#[command(name = "courier", version)]
struct Cli {
    /// A TOML configuration file (default: $COURIER_CONFIG). Flags override
    /// environment variables, which override the file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// What to log to stderr: a level (error, warn, info, debug, trace) or
    /// targets such as `courier=debug,warn` (default: $COURIER_LOG, else
    /// info for `node`, error otherwise).
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a standalone node with the node-info and echo actors.
    Node(node::Args),
    /// Write a cookie file and a QUIC certificate and key.
    Keygen(keygen::Args),
    /// Connect, authenticate and time round trips to a node.
    Ping(ping::Args),
    /// List a node's names, peers, and who holds references to its actors.
    Ls(ls::Args),
    /// Show a node's counters.
    Stats(stats::Args),
    /// Measure request/reply and one-way rates against a node's echo actor,
    /// or a local pair of nodes.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Node(_) => "info",
        _ => "error",
    };
    if let Err(e) = common::init_logging(cli.log.as_deref(), default_log) {
        return e.report("courier");
    }
    let config = cli.config.as_deref();
    let result: Result<(), Failure> = match cli.command {
        Command::Node(a) => node::run(config, a),
        Command::Keygen(a) => keygen::run(a),
        Command::Ping(a) => ping::run(config, a),
        Command::Ls(a) => ls::run(config, a),
        Command::Stats(a) => stats::run(config, a),
        Command::Bench(a) => bench::run(config, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report("courier"),
    }
}
