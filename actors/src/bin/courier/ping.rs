//! `courier ping`: connect, authenticate, and time round trips to a node's
//! node-info actor.

use std::path::Path;
use std::time::{Duration, Instant};

use courier::info::{node_hex, NodeInfo, Ping, NODE_INFO};
use courier::RemoteError;

use crate::common::{self, classify, ConnArgs, Failure};

/// Flags of `courier ping`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node: tcp://HOST:PORT, unix:///PATH or quic://HOST:PORT.
    addr: String,

    /// Round trips to make.
    #[arg(long, short = 'c', default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,

    /// Milliseconds to wait between round trips.
    #[arg(long, short = 'i', value_name = "MS", default_value_t = 200)]
    interval_ms: u64,

    #[command(flatten)]
    conn: ConnArgs,
}

pub fn run(config: Option<&Path>, args: Args) -> Result<(), Failure> {
    let cfg = common::load(config, args.conn.overrides()?)?;
    common::block_on(async move {
        let node = common::client_node(&cfg, &args.addr).await?;
        let addr = args.addr.as_str();
        let started = Instant::now();
        let peer = node.connect(addr).await.map_err(|e| classify(&e, addr))?;
        let handshake = started.elapsed();
        let timeout = common::timeout(&cfg);
        let info = common::within(timeout, node.lookup::<NodeInfo>(addr, NODE_INFO))
            .await
            .map_err(|e| classify(&e, addr))?;
        println!(
            "PING {addr}: node {} over {}, authenticated (key {:?}) in {}",
            node_hex(&peer.node),
            peer.scheme,
            peer.key_id,
            common::us(handshake.as_secs_f64() * 1e6),
        );
        let mut rtts: Vec<Duration> = Vec::with_capacity(args.count as usize);
        let mut failure: Option<RemoteError> = None;
        for seq in 1..=args.count {
            let t = Instant::now();
            match info.send(Ping(seq)).timeout(timeout).await {
                Ok(n) if n == seq => {
                    let rtt = t.elapsed();
                    rtts.push(rtt);
                    println!(
                        "reply {seq} from {addr}: time={}",
                        common::us(rtt.as_secs_f64() * 1e6)
                    );
                }
                Ok(n) => println!("reply {seq} from {addr}: wrong sequence number {n}"),
                Err(e) => {
                    println!("no reply {seq} from {addr}: {e}");
                    if matches!(
                        e,
                        RemoteError::ConnectionLost { .. } | RemoteError::DeadReference { .. }
                    ) {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if seq < args.count && args.interval_ms > 0 {
                tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            }
        }
        let lost = args.count - rtts.len() as u64;
        println!("--- {addr} ping statistics ---");
        println!("{} sent, {} received, {lost} lost", args.count, rtts.len());
        if !rtts.is_empty() {
            let s = summarize(&mut rtts);
            println!(
                "rtt min/avg/p50/p99/max = {:.3}/{:.3}/{:.3}/{:.3}/{:.3} ms",
                s[0], s[1], s[2], s[3], s[4]
            );
        }
        node.shutdown().await;
        match failure {
            Some(e) => Err(classify(&e, addr)),
            None if lost > 0 => Err(Failure::failed(format!(
                "{lost} of {} pings got no reply within {timeout:?}",
                args.count
            ))),
            None => Ok(()),
        }
    })
}

/// min, avg, p50, p99, max in milliseconds (nearest rank).
fn summarize(rtts: &mut [Duration]) -> [f64; 5] {
    rtts.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rank = |q: f64| {
        let i = (q * rtts.len() as f64).ceil() as usize;
        rtts[i.clamp(1, rtts.len()) - 1]
    };
    let avg = rtts.iter().map(|d| ms(*d)).sum::<f64>() / rtts.len() as f64;
    [
        ms(rtts[0]),
        avg,
        ms(rank(0.5)),
        ms(rank(0.99)),
        ms(rtts[rtts.len() - 1]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_summary() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = summarize(&mut v);
        assert_eq!(s, [1.0, 50.5, 50.0, 99.0, 100.0]);
        let mut one = vec![Duration::from_millis(3)];
        assert_eq!(summarize(&mut one), [3.0; 5]);
    }
}
