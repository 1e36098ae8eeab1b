//! The baselines: the same work on a bare socket, with and without CBOR.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::actors::Msg;
use crate::report::Rate;
use crate::Kind;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Stream for T {}
pub type Io = Box<dyn Stream>;

static SOCKETS: AtomicUsize = AtomicUsize::new(0);

/// A connected pair of byte streams over `kind`.
pub async fn pair(kind: Kind, dir: &Path) -> (Io, Io) {
    crate::progress(&format!("raw pair {kind:?}"));
    match kind {
        Kind::Tcp => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let (c, s) = tokio::join!(tokio::net::TcpStream::connect(a), l.accept());
            let c = c.unwrap();
            let s = s.unwrap().0;
            c.set_nodelay(true).unwrap();
            s.set_nodelay(true).unwrap();
            (Box::new(c), Box::new(s))
        }
        Kind::Unix => {
            let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
            let p = dir.join(format!("raw-{n}.sock"));
            let l = tokio::net::UnixListener::bind(&p).unwrap();
            let (c, s) = tokio::join!(tokio::net::UnixStream::connect(&p), l.accept());
            let _ = std::fs::remove_file(&p);
            (Box::new(c.unwrap()), Box::new(s.unwrap().0))
        }
        Kind::Fd => {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            (Box::new(a), Box::new(b))
        }
        Kind::Quic => crate::raw::quic_pair().await,
    }
}

/// A raw QUIC "socket": one bidirectional quinn stream.
pub async fn quic_pair() -> (Io, Io) {
    let (c, s) = courier_transports::quic::raw_stream_pair()
        .await
        .expect("quinn stream pair");
    (Box::new(c), Box::new(s))
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) {
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await.unwrap();
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> bool {
    let mut len = [0u8; 4];
    if let Err(e) = r.read_exact(&mut len).await {
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!("read_frame: {e}");
        }
        return false;
    }
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(buf).await.is_ok()
}

fn encode(m: &Msg) -> Vec<u8> {
    let mut v = Vec::with_capacity(96);
    ciborium::into_writer(m, &mut v).unwrap();
    v
}

fn decode(b: &[u8]) -> Msg {
    ciborium::from_reader(b).unwrap()
}

fn spawn_echo(s: Io, cbor: bool) {
    actix::spawn(async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut buf = Vec::new();
        while read_frame(&mut r, &mut buf).await {
            if cbor {
                let m = decode(&buf);
                write_frame(&mut w, &encode(&m)).await;
            } else {
                write_frame(&mut w, &buf).await;
            }
        }
    });
}

/// Request/reply, 64-byte payload, one at a time, on a socket of its own
/// (see `rtt_interleaved` in `main.rs`).
pub struct Rtt {
    r: BufReader<tokio::io::ReadHalf<Io>>,
    w: tokio::io::WriteHalf<Io>,
    buf: Vec<u8>,
    raw: Vec<u8>,
    cbor: bool,
}

impl Rtt {
    pub async fn new(kind: Kind, dir: &Path, cbor: bool) -> Self {
        let (c, s) = pair(kind, dir).await;
        spawn_echo(s, cbor);
        let (r, w) = tokio::io::split(c);
        Self {
            r: BufReader::with_capacity(64 * 1024, r),
            w,
            buf: Vec::new(),
            raw: vec![0x5au8; 64],
            cbor,
        }
    }

    /// Round trip number `i`.
    pub async fn one(&mut self, i: u64) {
        if self.cbor {
            write_frame(&mut self.w, &encode(&Msg::new(i))).await;
            assert!(read_frame(&mut self.r, &mut self.buf).await);
            assert_eq!(decode(&self.buf).id, i);
        } else {
            write_frame(&mut self.w, &self.raw).await;
            assert!(read_frame(&mut self.r, &mut self.buf).await);
        }
    }
}

/// One-way 64-byte messages as fast as the socket takes them, written in
/// batches; the receiver counts (and decodes) each, then acknowledges.
pub async fn oneway(kind: Kind, dir: &Path, n: usize, cbor: bool) -> Rate {
    let (c, s) = pair(kind, dir).await;
    let done = actix::spawn(async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut buf = Vec::new();
        let mut sum = 0u64;
        for i in 0..n {
            if !read_frame(&mut r, &mut buf).await {
                eprintln!("server: stream ended after {i} of {n} frames");
                return sum;
            }
            if cbor {
                sum += decode(&buf).id;
            }
        }
        write_frame(&mut w, b"ok").await;
        w.flush().await.unwrap();
        // Keep the stream open until the client has read the
        // acknowledgement and hung up (QUIC drops unsent data on close).
        let _ = read_frame(&mut r, &mut buf).await;
        sum
    });
    let t = Instant::now();
    let (mut r, w) = tokio::io::split(c);
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let raw = vec![0x5au8; 64];
    for i in 0..n {
        if cbor {
            write_frame(&mut w, &encode(&Msg::new(i as u64))).await;
        } else {
            write_frame(&mut w, &raw).await;
        }
    }
    w.flush().await.unwrap();
    let mut buf = Vec::new();
    assert!(read_frame(&mut r, &mut buf).await);
    let elapsed = t.elapsed();
    drop((r, w));
    let _ = done.await;
    Rate::new(n as f64, elapsed, "msg/s")
}

/// 1 MiB requests, each acknowledged.
pub async fn big(kind: Kind, dir: &Path, n: usize) -> Rate {
    let (c, s) = pair(kind, dir).await;
    actix::spawn(async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut buf = Vec::new();
        while read_frame(&mut r, &mut buf).await {
            write_frame(&mut w, &(buf.len() as u64).to_be_bytes()).await;
        }
    });
    let (r, mut w) = tokio::io::split(c);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let payload = vec![0x33u8; 1 << 20];
    let mut buf = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        write_frame(&mut w, &payload).await;
        assert!(read_frame(&mut r, &mut buf).await);
    }
    Rate::new((n << 20) as f64 / 1e6, t.elapsed(), "MB/s")
}

/// `depth` requests outstanding on one connection.
pub async fn pipelined(kind: Kind, dir: &Path, n: usize, depth: usize) -> Rate {
    let (c, s) = pair(kind, dir).await;
    spawn_echo(s, true);
    let (r, w) = tokio::io::split(c);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let mut buf = Vec::new();
    let t = Instant::now();
    let mut sent = 0;
    for _ in 0..depth.min(n) {
        write_frame(&mut w, &encode(&Msg::new(sent as u64))).await;
        sent += 1;
    }
    w.flush().await.unwrap();
    for _ in 0..n {
        assert!(read_frame(&mut r, &mut buf).await);
        let _ = decode(&buf);
        if sent < n {
            write_frame(&mut w, &encode(&Msg::new(sent as u64))).await;
            sent += 1;
            w.flush().await.unwrap();
        }
    }
    Rate::new(n as f64, t.elapsed(), "calls/s")
}

/// `conns` TCP connections each doing `per` round trips, all at once.
pub async fn many_connections(dir: &Path, conns: usize, per: usize) -> Rate {
    let mut clients = Vec::new();
    for _ in 0..conns {
        let (c, s) = pair(Kind::Tcp, dir).await;
        spawn_echo(s, true);
        clients.push(c);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(actix::spawn(async move {
            let (r, mut w) = tokio::io::split(c);
            let mut r = BufReader::with_capacity(64 * 1024, r);
            let mut buf = Vec::new();
            for i in 0..per {
                write_frame(&mut w, &encode(&Msg::new(i as u64))).await;
                assert!(read_frame(&mut r, &mut buf).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let _ = Duration::ZERO;
    Rate::new((conns * per) as f64, t.elapsed(), "calls/s")
}
