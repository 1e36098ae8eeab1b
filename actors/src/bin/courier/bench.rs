//! `courier bench`: request/reply and one-way rates against an echo actor,
//! on a running `courier node` or on a local pair of nodes.
//!
//! The measuring functions ([`request_reply`], [`one_way`]) take a
//! reference and a progress callback and know nothing of the command line
//! or the output, so a shared benchmark module can take them over (or this
//! command can call into one) without touching the rest.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::echo::{export_echo, Echo, EchoRequest, OneWay, Payload, Received, ECHO};
use courier::{Node, RemoteAddr, RemoteError};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::common::{self, classify, count, us, ConnArgs, Failure};

/// Flags of `courier bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A running `courier node` to measure against (its echo actor);
    /// default: a pair of nodes in this process.
    addr: Option<String>,

    /// The transport of the local pair.
    #[arg(long, value_name = "SCHEME", default_value = "tcp",
          value_parser = ["tcp", "unix", "quic"])]
    local: String,

    /// Request/reply round trips to time (after a warm-up of a tenth).
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    requests: u64,

    /// One-way messages to send.
    #[arg(long, default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    one_way: u64,

    /// Payload bytes per message.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(0..=(8 << 20)))]
    size: u64,

    /// Print the results as JSON.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    conn: ConnArgs,
}

/// Round trips: nearest-rank quantiles of the measured calls.
#[derive(Debug, Serialize)]
pub struct RoundTrips {
    pub calls: u64,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub calls_per_sec: f64,
}

/// One-way messages: from the first send until the echo actor counted the
/// last.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub messages: u64,
    pub secs: f64,
    pub messages_per_sec: f64,
    pub payload_mib_per_sec: f64,
}

/// What `courier bench` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub payload_bytes: u64,
    pub request_reply: Option<RoundTrips>,
    pub one_way: Option<Throughput>,
}

/// How long waiting for one reply, or for the last one-way message to be
/// counted, may take before the run is abandoned.
const STALL: Duration = Duration::from_secs(30);

pub fn run(config: Option<&Path>, args: Args) -> Result<(), Failure> {
    if args.requests == 0 && args.one_way == 0 {
        return Err(Failure::usage(
            "nothing to measure: --requests and --one-way are both 0",
        ));
    }
    let cfg = common::load(config, args.conn.overrides()?)?;
    common::block_on(async move {
        let (echo, target, nodes) = match &args.addr {
            Some(addr) => {
                let node = common::client_node(&cfg, addr).await?;
                let echo = common::within(common::timeout(&cfg), node.lookup::<Echo>(addr, ECHO))
                    .await
                    .map_err(|e| match e {
                        RemoteError::UnknownActor { .. } => Failure::failed(format!(
                            "{addr} has no echo actor ({ECHO}): measure against `courier node`"
                        )),
                        e => classify(&e, addr),
                    })?;
                (echo, addr.clone(), vec![node])
            }
            None => local_pair(&args.local).await?,
        };
        if !args.json {
            println!("courier bench: {target}, {}-byte payloads", args.size);
        }
        let payload = vec![0xa5; args.size as usize];
        let mut report = Report {
            target: target.clone(),
            payload_bytes: args.size,
            request_reply: None,
            one_way: None,
        };
        let fail = |e: RemoteError| classify(&e, &target);
        if args.requests > 0 {
            let warmup = (args.requests / 10).min(1_000);
            let bar = bar("request/reply", warmup + args.requests, args.json);
            let rtts = request_reply(&echo, &payload, warmup, args.requests, &|n| bar.inc(n))
                .await
                .map_err(fail)?;
            bar.finish_and_clear();
            let r = round_trips(rtts);
            if !args.json {
                println!(
                    "request/reply  {:>11} calls     median {}  p99 {}  min {}  max {}  {} calls/s",
                    count(r.calls),
                    us(r.median_us),
                    us(r.p99_us),
                    us(r.min_us),
                    us(r.max_us),
                    count(r.calls_per_sec as u64)
                );
            }
            report.request_reply = Some(r);
        }
        if args.one_way > 0 {
            let bar = bar("one-way", args.one_way, args.json);
            let took = one_way(&echo, &payload, args.one_way, &|n| bar.inc(n))
                .await
                .map_err(fail)?;
            bar.finish_and_clear();
            let secs = took.as_secs_f64().max(1e-9);
            let t = Throughput {
                messages: args.one_way,
                secs,
                messages_per_sec: args.one_way as f64 / secs,
                payload_mib_per_sec: (args.one_way * args.size) as f64 / secs / (1 << 20) as f64,
            };
            if !args.json {
                println!(
                    "one-way        {:>11} messages  {:.3} s  {} messages/s  {:.1} MiB/s of payload",
                    count(t.messages),
                    t.secs,
                    count(t.messages_per_sec as u64),
                    t.payload_mib_per_sec
                );
            }
            report.one_way = Some(t);
        }
        if args.json {
            let text = serde_json::to_string_pretty(&report)
                .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
            println!("{text}");
        }
        drop(echo);
        for n in nodes {
            n.shutdown().await;
        }
        Ok(())
    })
}

/// Times `n` sequential calls after `warmup` untimed ones.
pub async fn request_reply(
    echo: &RemoteAddr<Echo>,
    payload: &[u8],
    warmup: u64,
    n: u64,
    progress: &dyn Fn(u64),
) -> Result<Vec<Duration>, RemoteError> {
    let mut rtts = Vec::with_capacity(n as usize);
    for i in 0..warmup + n {
        let t = Instant::now();
        let back = echo
            .send(EchoRequest(Payload(payload.to_vec())))
            .timeout(STALL)
            .await?;
        let rtt = t.elapsed();
        if back.0.len() != payload.len() {
            return Err(RemoteError::Protocol {
                peer: "the echo actor".into(),
                reason: format!("sent {} bytes, got {} back", payload.len(), back.0.len()),
            });
        }
        if i >= warmup {
            rtts.push(rtt);
        }
        if i % 64 == 63 {
            progress(64);
        }
    }
    progress((warmup + n) % 64);
    Ok(rtts)
}

/// Sends `n` one-way messages as fast as the connection takes them, and
/// returns how long until the echo actor had counted them all.
pub async fn one_way(
    echo: &RemoteAddr<Echo>,
    payload: &[u8],
    n: u64,
    progress: &dyn Fn(u64),
) -> Result<Duration, RemoteError> {
    let before = echo.send(Received).timeout(STALL).await?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut stalled_since: Option<Instant> = None;
    while sent < n {
        match echo.do_send(OneWay(Payload(payload.to_vec()))) {
            Ok(()) => {
                sent += 1;
                stalled_since = None;
                if sent % 1024 == 0 {
                    progress(1024);
                }
            }
            Err(RemoteError::MailboxFull { .. }) => {
                // The connection's queue is full: let the driver write.
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STALL {
                    return Err(RemoteError::Timeout { after: STALL });
                }
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e),
        }
    }
    progress(n % 1024);
    let deadline = Instant::now() + STALL;
    loop {
        let got = echo
            .send(Received)
            .timeout(STALL)
            .await?
            .saturating_sub(before);
        if got >= n {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            return Err(RemoteError::Timeout { after: STALL });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn round_trips(mut rtts: Vec<Duration>) -> RoundTrips {
    rtts.sort_unstable();
    let n = rtts.len().max(1);
    let at = |q: f64| {
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        rtts.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let total: f64 = rtts.iter().map(Duration::as_secs_f64).sum();
    RoundTrips {
        calls: rtts.len() as u64,
        min_us: at(0.0),
        median_us: at(0.5),
        p99_us: at(0.99),
        max_us: at(1.0),
        calls_per_sec: if total > 0.0 {
            rtts.len() as f64 / total
        } else {
            0.0
        },
    }
}

fn bar(what: &str, len: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    // Drawn on stderr only when it is a terminal.
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

/// Two nodes in this process, joined over `scheme` on loopback, one with
/// an echo actor; returns a reference to it from the other.
async fn local_pair(scheme: &str) -> Result<(RemoteAddr<Echo>, String, Vec<Node>), Failure> {
    // A cookie only this process knows: the pair listens on loopback only.
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw)
        .map_err(|e| Failure::failed(format!("no randomness for a cookie: {e}")))?;
    let cookie: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let failed = |e: RemoteError| Failure::failed(format!("cannot start the local pair: {e}"));
    let (listen, transport): (String, Option<Arc<dyn courier::Transport>>) = match scheme {
        "unix" => {
            let path =
                std::env::temp_dir().join(format!("courier-bench-{}.sock", std::process::id()));
            (format!("unix://{}", path.display()), None)
        }
        "quic" => {
            use courier::transports::quic::{Identity, PeerTrust, QuicConfig};
            let id = Identity::generate("localhost")
                .map_err(|e| Failure::failed(format!("cannot make a certificate: {e}")))?;
            let trust = PeerTrust::pinned([id.fingerprint()]);
            let t = courier::transports::AnyTransport::builder()
                .quic(QuicConfig::new(id, trust))
                .build()
                .map_err(|e| Failure::failed(format!("cannot set up QUIC: {e}")))?;
            ("quic://127.0.0.1:0".to_owned(), Some(Arc::new(t)))
        }
        _ => ("tcp://127.0.0.1:0".to_owned(), None),
    };
    let with_transport = |b: courier::NodeBuilder| match &transport {
        Some(t) => b.transport(t.clone()),
        None => b,
    };
    let server = with_transport(Node::builder().name("bench-server").cookie(&cookie))
        .listen(listen)
        .start()
        .await
        .map_err(failed)?;
    export_echo(&server).map_err(failed)?;
    let addr = server.local_addrs()[0].to_string();
    let client = with_transport(Node::builder().name("bench-client").cookie(&cookie))
        .start()
        .await
        .map_err(failed)?;
    let echo = client.lookup::<Echo>(&addr, ECHO).await.map_err(failed)?;
    Ok((
        echo,
        format!("local pair over {addr}"),
        vec![client, server],
    ))
}
