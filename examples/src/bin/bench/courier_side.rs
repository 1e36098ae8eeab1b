//! The same work through Courier: two nodes, a remote actor.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use courier::{Node, RemoteAddr, RemoteError, Role};
use courier_transports::quic::{Identity, PeerTrust, QuicConfig};
use courier_transports::{AnyTransport, StreamConfig};

use crate::actors::*;
use crate::report::{Rate, Sample};
use crate::Kind;

const COOKIE: &str = "courier benchmark cookie";
static SOCKETS: AtomicUsize = AtomicUsize::new(0);

fn quic_transport() -> Arc<AnyTransport> {
    thread_local! {
        static ID: Identity = Identity::generate("courier-bench").expect("certificate");
    }
    let id = ID.with(Clone::clone);
    let trust = PeerTrust::pinned([id.fingerprint()]);
    Arc::new(
        AnyTransport::builder()
            .quic(QuicConfig::new(id, trust))
            .build()
            .expect("quic transport"),
    )
}

fn builder() -> courier::NodeBuilder {
    Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_secs(5), Duration::from_secs(60))
}

/// A server node exporting a sink, a client node, and the client's
/// reference to the sink, connected over `kind`.
pub async fn setup(kind: Kind, dir: &Path) -> (Node, Node, RemoteAddr<Sink>) {
    crate::progress(&format!("courier pair {kind:?}"));
    match kind {
        Kind::Fd => {
            let (a, b) = courier_transports::fd::socketpair(&StreamConfig::default()).unwrap();
            let server = builder().start().await.unwrap();
            export(&server, "sink");
            let client = builder().start().await.unwrap();
            let (s, c) = tokio::join!(
                server.add_link(a, Role::Acceptor, "fd"),
                client.add_link(b, Role::Initiator, "fd")
            );
            s.unwrap();
            c.unwrap();
            let sink = client.lookup_on::<Sink>(server.id(), "sink").await.unwrap();
            (server, client, sink)
        }
        _ => {
            let (listen, t): (String, Option<Arc<AnyTransport>>) = match kind {
                Kind::Tcp => ("tcp://127.0.0.1:0".into(), None),
                Kind::Unix => {
                    let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
                    (format!("unix://{}/courier-{n}.sock", dir.display()), None)
                }
                Kind::Quic => ("quic://127.0.0.1:0".into(), Some(quic_transport())),
                Kind::Fd => unreachable!(),
            };
            let mut sb = builder().listen(listen);
            let mut cb = builder();
            if let Some(t) = t {
                sb = sb.transport(t.clone());
                cb = cb.transport(t);
            }
            let server = sb.start().await.unwrap();
            export(&server, "sink");
            let addr = server.local_addrs()[0].to_string();
            let client = cb.start().await.unwrap();
            let sink = client.lookup::<Sink>(&addr, "sink").await.unwrap();
            (server, client, sink)
        }
    }
}

async fn teardown(server: Node, client: Node) {
    client.shutdown().await;
    server.shutdown().await;
}

/// Request/reply with a 64-byte payload, one at a time, between two nodes
/// of its own (see `rtt_interleaved` in `main.rs`).
pub struct Rtt {
    server: Node,
    client: Node,
    sink: RemoteAddr<Sink>,
}

impl Rtt {
    pub async fn new(kind: Kind, dir: &Path) -> Self {
        let (server, client, sink) = setup(kind, dir).await;
        Self {
            server,
            client,
            sink,
        }
    }

    /// Round trip number `i`.
    pub async fn one(&mut self, i: u64) {
        let r = self.sink.send(Echo(Msg::new(i))).await.unwrap();
        assert_eq!(r.id, i);
    }

    pub async fn finish(self) {
        teardown(self.server, self.client).await;
    }
}

pub async fn oneway(kind: Kind, dir: &Path, n: usize) -> Rate {
    let (server, client, sink) = setup(kind, dir).await;
    let t = Instant::now();
    let mut i = 0;
    let mut spins = 0u64;
    while i < n {
        match sink.do_send(Cast(Msg::new(i as u64))) {
            Ok(()) => i += 1,
            Err(RemoteError::MailboxFull { .. }) => {
                spins += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Wait until every message was handled.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = sink.send(Count).await.unwrap();
        if c as usize >= n || Instant::now() > deadline {
            assert_eq!(c as usize, n, "one-way messages lost");
            break;
        }
        tokio::task::yield_now().await;
    }
    let elapsed = t.elapsed();
    let _ = spins;
    teardown(server, client).await;
    Rate::new(n as f64, elapsed, "msg/s")
}

/// 1 MiB calls: as a [`courier::Blob`] (`inline` false), or as a `Bytes`
/// field inside the CBOR payload.
pub async fn big(kind: Kind, dir: &Path, n: usize, inline: bool) -> Rate {
    let (server, client, sink) = setup(kind, dir).await;
    // One payload, shared by every message (`Bytes` clones are reference
    // counts), as the raw baseline writes one buffer: the measure is the
    // transfer, not building 1 MiB per call.
    let payload = bytes::Bytes::from(vec![0x33u8; 1 << 20]);
    let t = Instant::now();
    for _ in 0..n {
        let len = if inline {
            sink.send(BigInline(payload.clone())).await.unwrap()
        } else {
            sink.send(Big(courier::Blob::new(payload.clone())))
                .await
                .unwrap()
        };
        assert_eq!(len, 1 << 20);
    }
    let elapsed = t.elapsed();
    teardown(server, client).await;
    Rate::new((n << 20) as f64 / 1e6, elapsed, "MB/s")
}

pub async fn concurrent(kind: Kind, dir: &Path, n: usize, callers: usize) -> Rate {
    let (server, client, sink) = setup(kind, dir).await;
    let per = n / callers;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let sink = sink.clone();
        tasks.push(actix::spawn(async move {
            for i in 0..per {
                let r = sink
                    .send(Echo(Msg::new((c * per + i) as u64)))
                    .await
                    .unwrap();
                assert_eq!(r.id, (c * per + i) as u64);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t.elapsed();
    teardown(server, client).await;
    Rate::new((per * callers) as f64, elapsed, "calls/s")
}

/// Calls each carrying a reference to an actor of the caller's: every one
/// is counted on the way out and released (in batches) when the receiver
/// drops it.
pub async fn refs(kind: Kind, dir: &Path, n: usize) -> Rate {
    let (server, client, sink) = setup(kind, dir).await;
    let mine = anonymous(&client);
    let t = Instant::now();
    for _ in 0..n {
        sink.send(TakeRef(mine.clone())).await.unwrap();
    }
    let elapsed = t.elapsed();
    // The releases must bring the export table back to empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.exports().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(client.exports().is_empty(), "references not released");
    teardown(server, client).await;
    Rate::new(n as f64, elapsed, "calls/s")
}

/// Calls each carrying an open descriptor.
pub async fn fds(kind: Kind, dir: &Path, n: usize) -> Rate {
    let (server, client, sink) = setup(kind, dir).await;
    let (_r, w): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
    let t = Instant::now();
    for _ in 0..n {
        sink.send(TakeFd(courier::Fd(w.try_clone().unwrap())))
            .await
            .unwrap();
    }
    let elapsed = t.elapsed();
    teardown(server, client).await;
    Rate::new(n as f64, elapsed, "calls/s")
}

pub async fn many_connections(_dir: &Path, conns: usize, per: usize) -> Rate {
    let server = builder().listen("tcp://127.0.0.1:0").start().await.unwrap();
    export(&server, "sink");
    let addr = server.local_addrs()[0].to_string();
    let mut clients = Vec::new();
    for _ in 0..conns {
        let c = builder().start().await.unwrap();
        let s = c.lookup::<Sink>(&addr, "sink").await.unwrap();
        clients.push((c, s));
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (_, s) in &clients {
        let s = s.clone();
        tasks.push(actix::spawn(async move {
            for i in 0..per {
                s.send(Echo(Msg::new(i as u64))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t.elapsed();
    for (c, _) in clients {
        c.shutdown().await;
    }
    server.shutdown().await;
    Rate::new((conns * per) as f64, elapsed, "calls/s")
}

pub async fn actix_local(n: usize) -> Rate {
    let a = Sink::default().start();
    let t = Instant::now();
    for i in 0..n {
        a.send(Echo(Msg::new(i as u64))).await.unwrap();
    }
    Rate::new(n as f64, t.elapsed(), "calls/s")
}

/// The floor under any one-way rate through actix: `do_send` of the same
/// message to a local actor, until all are handled.
pub async fn actix_local_oneway(n: usize) -> Rate {
    let a = Sink::default().start();
    let t = Instant::now();
    for i in 0..n {
        let mut m = Cast(Msg::new(i as u64));
        loop {
            match a.try_send(m) {
                Ok(()) => break,
                Err(actix::prelude::SendError::Full(back)) => {
                    m = back;
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let c = a.send(Count).await.unwrap();
    assert_eq!(c as usize, n, "one-way messages lost");
    Rate::new(n as f64, t.elapsed(), "msg/s")
}

pub async fn courier_local(n: usize) -> Rate {
    let node = builder().start().await.unwrap();
    let s = export(&node, "local");
    let t = Instant::now();
    for i in 0..n {
        s.send(Echo(Msg::new(i as u64))).await.unwrap();
    }
    Rate::new(n as f64, t.elapsed(), "calls/s")
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Resident memory per idle connection (both ends and the client node),
/// and per exported reference held by a peer (Courier's share: the actix
/// actors themselves are measured apart and subtracted).
pub async fn memory(_dir: &Path, conns: usize, refs: usize) -> Vec<Sample> {
    let server = builder().listen("tcp://127.0.0.1:0").start().await.unwrap();
    export(&server, "sink");
    let addr = server.local_addrs()[0].to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = rss();
    let mut clients = Vec::new();
    for _ in 0..conns {
        let c = builder().start().await.unwrap();
        let s = c.lookup::<Sink>(&addr, "sink").await.unwrap();
        clients.push((c, s));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let per_conn = rss().saturating_sub(before) as f64 / conns as f64;

    // Actors alone.
    let before = rss();
    let plain: Vec<_> = (0..refs).map(|_| Sink::default().start()).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let per_actor = rss().saturating_sub(before) as f64 / refs as f64;
    drop(plain);
    // Actors exported and held by a peer.
    let (_, sink) = &clients[0];
    let node = &clients[0].0;
    let before = rss();
    let mut all = Vec::new();
    for chunk in 0..refs.div_ceil(100) {
        let batch: Vec<_> = (0..100.min(refs - chunk * 100))
            .map(|_| anonymous(node))
            .collect();
        sink.send(KeepRefs(batch.clone())).await.unwrap();
        all.extend(batch);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let per_ref = rss().saturating_sub(before) as f64 / refs as f64 - per_actor;
    drop(all);
    for (c, _) in clients {
        c.shutdown().await;
    }
    server.shutdown().await;
    vec![
        Sample::new(
            "tcp",
            "memory",
            "courier",
            "per_connection",
            per_conn,
            "bytes",
        ),
        Sample::new(
            "tcp",
            "memory",
            "courier",
            "per_exported_ref",
            per_ref.max(0.0),
            "bytes",
        ),
        Sample::new("local", "memory", "actix", "per_actor", per_actor, "bytes"),
    ]
}
