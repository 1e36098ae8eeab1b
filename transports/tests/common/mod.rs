//! Shared helpers for the transport tests.
#![allow(dead_code)]

use std::future::{poll_fn, Future};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use courier_runtime::transport::{Address, Frame, Link, Listener, Transport, TransportError};
use courier_transports::quic::{Identity, PeerTrust, QuicConfig};
use courier_transports::{AnyTransport, LinkExt, ListenerExt};

/// The generous bound on any one step of a test (a slow shared machine).
pub const STEP: Duration = Duration::from_secs(60);

/// Runs `f`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

/// A transport under test and how to listen and connect with it.
pub struct Harness {
    pub name: &'static str,
    pub transport: Arc<dyn Transport>,
    kind: Kind,
    dir: Arc<tempfile::TempDir>,
    counter: AtomicUsize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp4,
    Tcp6,
    Unix,
    Fd,
    Quic,
}

impl Harness {
    fn new(name: &'static str, kind: Kind, transport: AnyTransport) -> Self {
        Self {
            name,
            transport: Arc::new(transport),
            kind,
            dir: Arc::new(tempfile::tempdir().expect("temp dir")),
            counter: AtomicUsize::new(0),
        }
    }

    pub fn tcp4() -> Self {
        Self::new("tcp4", Kind::Tcp4, AnyTransport::new())
    }

    pub fn tcp6() -> Self {
        Self::new("tcp6", Kind::Tcp6, AnyTransport::new())
    }

    pub fn unix() -> Self {
        Self::new("unix", Kind::Unix, AnyTransport::new())
    }

    pub fn fd() -> Self {
        Self::new("fd", Kind::Fd, AnyTransport::new())
    }

    pub fn quic() -> Self {
        let id = Identity::generate("localhost").expect("identity");
        let trust = PeerTrust::pinned([id.fingerprint()]);
        let mut cfg = QuicConfig::new(id, trust);
        cfg.handshake_timeout = Duration::from_secs(5);
        cfg.linger = Duration::from_secs(5);
        let t = AnyTransport::builder()
            .quic(cfg)
            .build()
            .expect("quic transport");
        Self::new("quic", Kind::Quic, t)
    }

    pub fn carries_fds(&self) -> bool {
        matches!(self.kind, Kind::Unix | Kind::Fd)
    }

    fn fresh_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("s{n}.sock"))
    }

    /// Starts a listener at a fresh address.
    pub async fn listen(&self) -> Box<dyn Listener> {
        let addr: Address = match self.kind {
            Kind::Tcp4 => "tcp://127.0.0.1:0".parse().unwrap(),
            Kind::Tcp6 => "tcp://[::1]:0".parse().unwrap(),
            Kind::Quic => "quic://127.0.0.1:0".parse().unwrap(),
            Kind::Unix => Address::Unix {
                path: self.fresh_path(),
            },
            Kind::Fd => {
                // A listening socket made elsewhere, handed over by number.
                let l = std::os::unix::net::UnixListener::bind(self.fresh_path()).unwrap();
                let fd = OwnedFd::from(l);
                Address::Fd {
                    fd: Some(std::os::fd::IntoRawFd::into_raw_fd(fd)),
                }
            }
        };
        self.transport
            .listen(&addr)
            .await
            .unwrap_or_else(|e| panic!("{}: listen on {addr}: {e}", self.name))
    }

    /// Connects to a listener's address.
    pub async fn try_connect(&self, to: &Address) -> Result<Box<dyn Link>, TransportError> {
        if self.kind == Kind::Fd {
            // A connected socket made elsewhere, handed over by number.
            let Address::Unix { path } = to else {
                panic!("fd listener reported {to}")
            };
            let path = path.clone();
            let s =
                tokio::task::spawn_blocking(move || std::os::unix::net::UnixStream::connect(path))
                    .await
                    .unwrap()
                    .map_err(|e| TransportError::io("connect", e))?;
            let n = std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(s));
            return self.transport.connect(&Address::Fd { fd: Some(n) }).await;
        }
        self.transport.connect(to).await
    }

    pub async fn connect(&self, to: &Address) -> Box<dyn Link> {
        within(STEP, "connect", self.try_connect(to))
            .await
            .unwrap_or_else(|e| panic!("{}: connect to {to}: {e}", self.name))
    }

    /// A connected pair: (client, server).
    pub async fn pair(&self) -> (Box<dyn Link>, Box<dyn Link>) {
        let mut l = self.listen().await;
        let addr = l.local_addr();
        let (c, s) = tokio::join!(self.connect(&addr), async {
            within(STEP, "accept", l.accept()).await.expect("accept")
        });
        (c, s)
    }
}

/// A payload of `len` bytes whose content depends on `seed`.
pub fn payload(seed: u32, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    Bytes::from(v)
}

/// Receives one frame, failing on error, end or timeout.
pub async fn recv_frame(link: &mut dyn Link) -> Frame {
    match within(STEP, "recv", link.recv()).await {
        Some(Ok(f)) => f,
        Some(Err(e)) => panic!("recv failed: {e}"),
        None => panic!("the link ended early"),
    }
}

/// Sends `out` and receives `expect` frames at the same time, on one link.
pub async fn exchange(link: &mut dyn Link, out: Vec<Frame>, expect: usize) -> Vec<Frame> {
    let mut out = out.into_iter().peekable();
    let mut got = Vec::new();
    let mut flushed = false;
    poll_fn(|cx| loop {
        let mut progress = false;
        while out.peek().is_some() {
            match link.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    link.start_send(out.next().unwrap()).expect("start_send");
                    flushed = false;
                    progress = true;
                }
                Poll::Ready(Err(e)) => panic!("poll_ready: {e}"),
                Poll::Pending => break,
            }
        }
        if !flushed {
            match link.poll_flush(cx) {
                Poll::Ready(Ok(())) => flushed = out.peek().is_none(),
                Poll::Ready(Err(e)) => panic!("poll_flush: {e}"),
                Poll::Pending => {}
            }
        }
        while got.len() < expect {
            match link.poll_recv(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    got.push(f);
                    progress = true;
                }
                Poll::Ready(Some(Err(e))) => panic!("poll_recv: {e}"),
                Poll::Ready(None) => panic!("the link ended early"),
                Poll::Pending => break,
            }
        }
        if got.len() == expect && out.peek().is_none() && flushed {
            return Poll::Ready(());
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    got
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
}

/// Writes `data` through a descriptor.
pub fn write_fd(fd: impl AsFd, data: &[u8]) {
    let n = rustix::io::write(fd, data).expect("write through a received descriptor");
    assert_eq!(n, data.len());
}

/// Reads exactly `len` bytes from a (blocking) descriptor.
pub fn read_fd(fd: impl AsFd, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = rustix::io::read(&fd, &mut buf[got..]).expect("read");
        assert!(n > 0, "unexpected end of pipe");
        got += n;
    }
    buf
}

/// Polls `f` once, with a waker that does nothing.
pub async fn poll_once<T>(mut f: impl FnMut(&mut std::task::Context<'_>) -> Poll<T>) -> Poll<T> {
    poll_fn(|cx| Poll::Ready(f(cx))).await
}
