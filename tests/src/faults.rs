//! A fault-injecting transport decorator, for latency, loss and partition
//! tests where `tc netem` may be missing.
//!
//! [`FaultyTransport`] wraps any `Arc<dyn Transport>`; every link it makes
//! (dialed or accepted) obeys one shared [`Faults`] handle that the test
//! keeps:
//!
//! | fault | what the node sees |
//! |---|---|
//! | [`Faults::set_delay`] | each received frame is held back this long (order kept) |
//! | [`Faults::cut`] | every link alive now fails at once, both ways; the socket is closed, so the peer sees the end too |
//! | [`Faults::corrupt_next`] | the next n received frames each have one byte flipped |
//! | [`Faults::drop_next`] | the next n received frames vanish (the link stays up) |
//! | [`Faults::stall`] | nothing is delivered or sent, nothing is closed: a partition or a frozen peer, until [`Faults::heal`] |
//!
//! Faults act on the receiving side of the wrapped node's links (and a stall
//! on both sides), so wrapping one node of a pair is enough.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use courier_tests::faults::{Faults, FaultyTransport};
//! let faults = Faults::new();
//! let transport = FaultyTransport::wrap(Arc::new(courier::transports::AnyTransport::new()), &faults);
//! let node = courier::Node::builder().transport(transport).start().await.unwrap();
//! faults.stall();
//! // ... calls through `node` now wait; heal() lets them through.
//! faults.heal();
//! # drop(node); }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use courier_runtime::transport::{
    Address, BoxFut, Frame, Link, LinkCaps, Listener, Transport, TransportError,
};

#[derive(Default)]
struct State {
    delay: Duration,
    /// Links made before this epoch are cut.
    cut_epoch: u64,
    corrupt: u64,
    drop: u64,
    stalled: bool,
    wakers: Vec<Waker>,
    stats: FaultStats,
}

/// What the decorator did, for tests to check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Links made (dialed and accepted).
    pub links: u64,
    /// Frames delivered to the node.
    pub delivered: u64,
    /// Frames corrupted.
    pub corrupted: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// Links cut.
    pub cut: u64,
}

/// The handle a test keeps to inject faults into every link of a
/// [`FaultyTransport`]. Cheap to clone; all clones control the same links.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<State>>);

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Faults")
            .field("delay", &st.delay)
            .field("stalled", &st.stalled)
            .field("stats", &st.stats)
            .finish()
    }
}

impl Faults {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fault state poisoned")
    }

    fn wake_all(st: &mut State) {
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    /// Holds every received frame back for `d` (zero: none).
    pub fn set_delay(&self, d: Duration) {
        self.lock().delay = d;
    }

    /// Fails every link that exists now; links made later are fine.
    pub fn cut(&self) {
        let mut st = self.lock();
        st.cut_epoch += 1;
        Self::wake_all(&mut st);
    }

    /// Flips one byte in each of the next `n` frames received.
    pub fn corrupt_next(&self, n: u64) {
        self.lock().corrupt += n;
    }

    /// Drops the next `n` frames received.
    pub fn drop_next(&self, n: u64) {
        self.lock().drop += n;
    }

    /// Stops delivering and sending, without closing anything.
    pub fn stall(&self) {
        self.lock().stalled = true;
    }

    /// Ends a stall; frames held by the kernel meanwhile flow again.
    pub fn heal(&self) {
        let mut st = self.lock();
        st.stalled = false;
        Self::wake_all(&mut st);
    }

    /// Whether a stall is in force.
    pub fn is_stalled(&self) -> bool {
        self.lock().stalled
    }

    /// Counters so far.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }
}

/// A transport whose links obey a [`Faults`] handle.
pub struct FaultyTransport {
    inner: Arc<dyn Transport>,
    faults: Faults,
}

impl fmt::Debug for FaultyTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTransport")
            .field("inner", &self.inner)
            .finish()
    }
}

impl FaultyTransport {
    /// Wraps `inner`; the links it makes obey `faults`.
    pub fn wrap(inner: Arc<dyn Transport>, faults: &Faults) -> Arc<dyn Transport> {
        Arc::new(Self {
            inner,
            faults: faults.clone(),
        })
    }
}

fn wrap_link(inner: Box<dyn Link>, faults: &Faults) -> Box<dyn Link> {
    let epoch = {
        let mut st = faults.lock();
        st.stats.links += 1;
        st.cut_epoch
    };
    Box::new(FaultyLink {
        inner: Some(inner),
        faults: faults.clone(),
        epoch,
        held: VecDeque::new(),
        timer: None,
        caps: None,
        peer: String::new(),
    })
}

impl Transport for FaultyTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        let fut = self.inner.connect(to);
        let faults = self.faults.clone();
        Box::pin(async move { Ok(wrap_link(fut.await?, &faults)) })
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        let fut = self.inner.listen(at);
        let faults = self.faults.clone();
        Box::pin(async move {
            let inner = fut.await?;
            Ok(Box::new(FaultyListener { inner, faults }) as Box<dyn Listener>)
        })
    }
}

struct FaultyListener {
    inner: Box<dyn Listener>,
    faults: Faults,
}

impl fmt::Debug for FaultyListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyListener")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Listener for FaultyListener {
    fn local_addr(&self) -> Address {
        self.inner.local_addr()
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Box<dyn Link>, TransportError>> {
        self.inner
            .poll_accept(cx)
            .map(|r| r.map(|l| wrap_link(l, &self.faults)))
    }
}

struct FaultyLink {
    /// `None` once cut: the socket is closed at once.
    inner: Option<Box<dyn Link>>,
    faults: Faults,
    epoch: u64,
    /// Received frames waiting out the delay, with when they are due.
    held: VecDeque<(tokio::time::Instant, Frame)>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    caps: Option<LinkCaps>,
    peer: String,
}

impl fmt::Debug for FaultyLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyLink")
            .field("inner", &self.inner)
            .field("held", &self.held.len())
            .finish()
    }
}

fn cut_error() -> TransportError {
    TransportError::io(
        "faults: the link was cut",
        std::io::Error::from(std::io::ErrorKind::ConnectionReset),
    )
}

impl FaultyLink {
    /// The inner link, unless cut (then it is dropped now: the peer sees the
    /// socket close) or stalled (then `Pending`, woken by `heal`/`cut`).
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let mut st = self.faults.lock();
        if self.inner.is_some() && st.cut_epoch > self.epoch {
            st.stats.cut += 1;
            drop(st);
            if let Some(l) = self.inner.take() {
                self.caps = Some(l.caps());
                self.peer = l.peer_addr();
            }
            return Poll::Ready(Err(cut_error()));
        }
        if self.inner.is_none() {
            return Poll::Ready(Err(cut_error()));
        }
        if st.stalled {
            if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                st.wakers.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn inner(&mut self) -> &mut Box<dyn Link> {
        self.inner.as_mut().expect("checked: not cut")
    }
}

impl Link for FaultyLink {
    fn caps(&self) -> LinkCaps {
        match &self.inner {
            Some(l) => l.caps(),
            None => self.caps.expect("caps kept when cut"),
        }
    }

    fn set_max_frame_len(&mut self, max: usize) {
        if let Some(l) = &mut self.inner {
            l.set_max_frame_len(max);
        }
    }

    fn peer_addr(&self) -> String {
        match &self.inner {
            Some(l) => l.peer_addr(),
            None => self.peer.clone(),
        }
    }

    fn channel_binding(&self) -> Option<[u8; 32]> {
        self.inner.as_ref().and_then(|l| l.channel_binding())
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.check(cx) {
            Poll::Ready(Ok(())) => self.inner().poll_ready(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn start_send(&mut self, frame: Frame) -> Result<(), TransportError> {
        match &mut self.inner {
            Some(l) => l.start_send(frame),
            None => Err(cut_error()),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.check(cx) {
            Poll::Ready(Ok(())) => self.inner().poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match &mut self.inner {
            Some(l) => l.poll_close(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        loop {
            match self.check(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => return Poll::Pending,
            }
            let inner = self.inner.as_mut().expect("checked: not cut");
            // Take in whatever arrived; keep it behind the delay.
            let mut ended = None;
            loop {
                match inner.poll_recv(cx) {
                    Poll::Ready(Some(Ok(mut frame))) => {
                        let mut st = self.faults.lock();
                        if st.drop > 0 {
                            st.drop -= 1;
                            st.stats.dropped += 1;
                            continue;
                        }
                        if st.corrupt > 0 && !frame.payload.is_empty() {
                            st.corrupt -= 1;
                            st.stats.corrupted += 1;
                            let mut b = frame.payload.to_vec();
                            let at = b.len() / 2;
                            b[at] ^= 0x5a;
                            frame.payload = b.into();
                        }
                        let due = tokio::time::Instant::now() + st.delay;
                        self.held.push_back((due, frame));
                    }
                    Poll::Ready(other) => {
                        ended = Some(other);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if let Some((due, _)) = self.held.front() {
                if *due <= tokio::time::Instant::now() {
                    let (_, frame) = self.held.pop_front().expect("not empty");
                    self.faults.lock().stats.delivered += 1;
                    return Poll::Ready(Some(Ok(frame)));
                }
                let due = *due;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                timer.as_mut().reset(due);
                if timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
                return Poll::Pending;
            }
            // Nothing held back: the end of the stream (or an error) is
            // delivered after every frame before it.
            return match ended {
                Some(end) => Poll::Ready(end),
                None => Poll::Pending,
            };
        }
    }
}
