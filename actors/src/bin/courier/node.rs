//! `courier node`: a standalone node, to smoke-test and benchmark machines
//! against each other (like iperf's server side).

use std::path::{Path, PathBuf};

use courier::echo::{export_echo, ECHO};
use courier::info::{node_hex, NODE_INFO};
use courier::{Config, Node};

use crate::common::{self, ConnArgs, Failure};

/// Flags of `courier node`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Listen on ADDR: tcp://HOST:PORT, unix:///PATH, quic://HOST:PORT,
    /// fd://N (repeatable; default: $COURIER_LISTEN, else `listen` in the
    /// config file).
    #[arg(long, value_name = "ADDR", num_args = 1..)]
    listen: Vec<String>,

    /// Connect to this peer at start (repeatable).
    #[arg(long, value_name = "ADDR")]
    peer: Vec<String>,

    /// A name for logs.
    #[arg(long)]
    name: Option<String>,

    /// Heartbeat interval in milliseconds (the timeout is three times it
    /// unless configured).
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,

    #[command(flatten)]
    conn: ConnArgs,

    /// Stop after this many seconds (default: run until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
}

pub fn run(config: Option<&Path>, args: Args) -> Result<(), Failure> {
    let mut overrides: Config = args.conn.overrides()?;
    overrides.listen = args.listen;
    overrides.peers = args.peer;
    overrides.name = args.name;
    overrides.heartbeat_ms = args.heartbeat_ms;
    let cfg = common::load(config, overrides)?;
    if cfg.listen.is_empty() {
        return Err(Failure::usage(
            "courier node needs an address to listen on: --listen ADDR, COURIER_LISTEN, \
             or `listen` in the config file",
        ));
    }
    for a in &cfg.listen {
        common::check_listen_addr(a)?;
    }
    for p in &cfg.peers {
        common::check_dial_addr(p)?;
    }
    let duration = args
        .duration
        .map(|d| common::secs_to_ms(d, "--duration"))
        .transpose()?;
    common::block_on(serve(cfg, duration))
}

async fn serve(cfg: Config, duration_ms: Option<u64>) -> Result<(), Failure> {
    let quic_dir: Option<PathBuf> = cfg.quic.dir.clone();
    let builder = Node::builder().config(&cfg)?;
    let node = builder.start().await.map_err(|e| match e {
        courier::RemoteError::Unreachable { address, reason } => {
            Failure::failed(format!("cannot listen on {address}: {reason}"))
        }
        courier::RemoteError::Authentication { reason, .. } => {
            Failure::usage(format!("no usable cookie: {reason}"))
        }
        other => Failure::failed(other.to_string()),
    })?;
    export_echo(&node)
        .map_err(|e| Failure::failed(format!("cannot export the echo actor: {e}")))?;

    match &cfg.name {
        Some(n) => println!("node {} ({n})", node_hex(&node.id())),
        None => println!("node {}", node_hex(&node.id())),
    }
    for a in node.local_addrs() {
        println!("listening on {a}");
    }
    let identity = cfg
        .quic
        .identity(cfg.name.as_deref().unwrap_or("courier"))?;
    if let Some(id) = identity {
        let fp = id.fingerprint();
        match &quic_dir {
            Some(d) => println!("quic certificate sha256:{fp} ({})", d.display()),
            None => println!("quic certificate sha256:{fp}"),
        }
    }
    println!("actors: {NODE_INFO}, {ECHO}");
    println!("ready");

    wait_for_stop(duration_ms).await;
    eprintln!("courier node: stopping");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_stop(duration_ms: Option<u64>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            None
        }
    };
    let term = async {
        match &mut term {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let limit = async {
        match duration_ms {
            Some(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = limit => {}
    }
}
