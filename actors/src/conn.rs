//! One connection: a task that owns a link and its protocol session.
//!
//! The driver is a hand-written future spawned on the node's arbiter (the
//! thread that started the node), so a request and its reply stay on one
//! thread: waking another thread costs more than the rest of a local round
//! trip. It loops over four sources until none has work: frames from the
//! link, commands from references (bounded channel: the backpressure point
//! for senders), frames to write (bounded queue in front of the link's own
//! bounded queue), and the session's timer.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use courier_runtime::error::{HandshakeError, RemoteError};
use courier_runtime::handshake::PeerInfo;
use courier_runtime::id::{ActorId, NodeId, RequestIdMap};
use courier_runtime::session::{CloseReason, Event, Role, Session};
use courier_runtime::transport::{Frame, Link, LinkCaps, TransportError};
use courier_runtime::wire::{ReleaseEntry, ReplyStatus, WireRef, TAG_LEN};
use tokio::sync::{mpsc, oneshot};
use tokio::task::coop::has_budget_remaining;
use tracing::{debug, field, info, warn, Span};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::export::{Dispatch, InboundFut};
use crate::metrics::Metrics;
use crate::node::NodeShared;
use crate::refctx::{OutRef, Resolved};
use crate::timer::Deadline;

/// Commands a connection's driver takes from the rest of the node.
pub(crate) enum Command {
    Call {
        target: ActorId,
        type_name: &'static str,
        payload: Vec<u8>,
        refs: Vec<WireRef>,
        fds: Vec<OwnedFd>,
        reply: oneshot::Sender<Result<ReplyIn, RemoteError>>,
    },
    /// A call whose frame is built already (see `Session::send_call_frame`).
    CallFrame {
        target: ActorId,
        type_name: &'static str,
        frame: BytesMut,
        fds: Vec<OwnedFd>,
        /// The handles of the references in the frame, kept until it is
        /// written (see [`Hold`]).
        hold: Hold,
        reply: oneshot::Sender<Result<ReplyIn, RemoteError>>,
    },
    /// A one-way message whose frame is built already.
    CastFrame {
        target: ActorId,
        frame: BytesMut,
        fds: Vec<OwnedFd>,
        hold: Hold,
    },
    /// A reply whose frame is built already.
    ReplyFrame {
        frame: BytesMut,
        fds: Vec<OwnedFd>,
        hold: Hold,
    },
    Reply {
        request: u64,
        status: ReplyStatus,
        payload: Vec<u8>,
        refs: Vec<WireRef>,
        fds: Vec<OwnedFd>,
    },
    Release(Vec<ReleaseEntry>),
    Acquire(ActorId),
    Unlend(u64),
    Down(ActorId),
    /// An inbound call finished: reading may resume.
    InboundDone,
    Close(String),
}

/// The handles of the references a message carries, held until the
/// driver has handed the message's frame to the session. Dropping the last
/// handle to an imported actor queues a release to its owner; were the
/// handles dropped when the message is queued, that release (sent on the
/// control channel, which is never held back) could overtake the message
/// carrying the reference back to its owner, and the owner would free the
/// actor before the reference arrived. (Found by the three-node soak test.)
pub(crate) type Hold = Vec<OutRef>;

/// A reply as the caller receives it.
pub(crate) struct ReplyIn {
    pub status: ReplyStatus,
    pub payload: Bytes,
    pub refs: Vec<Resolved>,
    pub fds: Vec<OwnedFd>,
    pub blobs: Vec<Bytes>,
}

/// Shared view of an established connection.
pub(crate) struct ConnShared {
    pub id: u64,
    pub peer: PeerInfo,
    pub caps: LinkCaps,
    pub scheme: &'static str,
    pub remote: String,
    /// Where third parties can reach the peer: the address we dialed, else
    /// the first address it announced, else empty.
    pub reach: String,
    pub tx: mpsc::Sender<Command>,
    /// Unbounded: reference traffic and replies that must never be lost.
    pub ctl: mpsc::UnboundedSender<Command>,
    pub max_inflight: usize,
    pub closed: AtomicBool,
    pub close_reason: Mutex<Option<String>>,
    pub inflight: AtomicUsize,
    /// Room a frame needs after its envelope: the MAC tag, if frames carry
    /// one. Frames are allocated to their exact size, so that freezing one
    /// allocates nothing more.
    pub tag_room: usize,
    /// Whether the peer takes [`crate::Blob`]s beside the payload.
    pub blobs: bool,
    /// The peer's key id, shared by every [`crate::Caller`] made for it.
    pub key_id: Arc<str>,
    /// The driver, for sending without a queue (see [`ConnHandle::send_inline`]).
    pub driver: Weak<DriverCell>,
}

/// A cheap handle to an established connection.
#[derive(Clone)]
pub(crate) struct ConnHandle(pub Arc<ConnShared>);

impl ConnHandle {
    pub fn peer_node(&self) -> NodeId {
        self.0.peer.node
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    pub fn lost(&self) -> RemoteError {
        RemoteError::ConnectionLost {
            peer: self.0.peer.node,
            reason: self
                .0
                .close_reason
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_else(|| "the connection closed".into()),
        }
    }

    /// Queues a command, waiting for room (backpressure).
    pub async fn send(&self, cmd: Command) -> Result<(), RemoteError> {
        if self.is_closed() {
            return Err(self.lost());
        }
        self.0.tx.send(cmd).await.map_err(|_| self.lost())
    }

    /// Hands `cmd` to the driver directly, when the caller runs on the
    /// driver's own thread and the driver is idle: no channel. Its frame
    /// waits in the driver's queue, and the driver's task is woken once to
    /// write everything that gathered meanwhile, so many calls and one-way
    /// messages share one write (writing each at once made 64 concurrent
    /// callers on TCP 2.5 times slower and no single call measurably
    /// faster). Otherwise gives `cmd` back, to be queued with
    /// [`Self::send`] or [`Self::try_send`].
    // The command comes back as it went in, to be queued; boxing it would
    // cost an allocation on exactly the path this exists to make cheap.
    #[allow(clippy::result_large_err)]
    pub fn send_inline(&self, cmd: Command) -> Result<(), NotInline> {
        let Some(cell) = self.0.driver.upgrade() else {
            return Err(NotInline::Queue(cmd));
        };
        let Ok(mut d) = cell.driver.try_lock() else {
            return Err(NotInline::Queue(cmd));
        };
        d.send_inline(cmd)
    }

    /// Sends a one-way message to `target` with its frame built straight
    /// into the link's send buffer by `encode` (see
    /// [`Driver::cast_in_place`]): no frame buffer of its own, no queue, no
    /// copy. `encode` answers false when the message cannot go this way
    /// (it carries references, descriptors or blobs).
    pub fn cast_in_place(
        &self,
        target: ActorId,
        encode: &mut dyn FnMut(&mut BytesMut) -> Result<bool, RemoteError>,
    ) -> Result<InPlace, RemoteError> {
        let Some(cell) = self.0.driver.upgrade() else {
            return Ok(InPlace::No);
        };
        let Ok(mut d) = cell.driver.try_lock() else {
            return Ok(InPlace::No);
        };
        d.cast_in_place(target, encode)
    }

    /// Queues a command without waiting; a full queue gives it back
    /// (`Ok(Err(cmd))`), to be queued with [`Self::send`].
    #[allow(clippy::result_large_err)]
    pub fn try_queue(&self, cmd: Command) -> Result<Result<(), Command>, RemoteError> {
        if self.is_closed() {
            return Err(self.lost());
        }
        match self.0.tx.try_send(cmd) {
            Ok(()) => Ok(Ok(())),
            Err(mpsc::error::TrySendError::Full(cmd)) => Ok(Err(cmd)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.lost()),
        }
    }

    /// Queues a command without waiting; a full queue is `MailboxFull`.
    pub fn try_send(&self, cmd: Command, actor: ActorId) -> Result<(), RemoteError> {
        self.try_queue(cmd)?
            .map_err(|_| RemoteError::MailboxFull { actor })
    }
}

/// What came of [`ConnHandle::cast_in_place`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InPlace {
    /// Sent (or dropped as the queued path would drop it, with a log).
    Sent,
    /// The link's send buffer is at its budget and the socket full: the
    /// sender is told `MailboxFull`.
    Full,
    /// Not this way now: build the frame and send it with
    /// [`ConnHandle::send_inline`] or [`ConnHandle::try_send`].
    No,
}

/// Why [`ConnHandle::send_inline`] gave a command back.
pub(crate) enum NotInline {
    /// The driver is busy, on another thread, or not open: queue it.
    Queue(Command),
    /// As many frames wait as the queues hold, behind a socket that takes
    /// no more: a one-way sender is told `MailboxFull`; a caller waits
    /// for room in the command queue.
    Full(Command),
}

impl NotInline {
    pub fn into_command(self) -> Command {
        match self {
            Self::Queue(c) | Self::Full(c) => c,
        }
    }
}

/// Lets the node end an inbound handshake from outside its driver, to make
/// room when too many connections are in the handshake at once.
#[derive(Default)]
pub(crate) struct Eviction {
    evicted: AtomicBool,
    /// The handshake ended (either way): nothing left to evict.
    done: AtomicBool,
    waker: Mutex<Option<std::task::Waker>>,
}

impl Eviction {
    /// Whether the handshake is still running.
    pub fn is_live(&self) -> bool {
        !self.done.load(Ordering::Acquire) && !self.evicted.load(Ordering::Acquire)
    }

    /// Asks the driver to drop the handshake; `false` if it already ended.
    pub fn evict(&self) -> bool {
        if !self.is_live() {
            return false;
        }
        self.evicted.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().expect("not poisoned").take() {
            w.wake();
        }
        true
    }
}

/// Frames waiting in front of the link before commands stop being taken.
const OUTQ_MAX: usize = 256;
/// Bytes of frames waiting in front of the link before commands stop
/// being taken (one frame may go past it).
const OUTQ_BYTES_MAX: usize = 1 << 20;
/// What an inline send may leave waiting (see `send_inline`): this many
/// bytes, and as many frames as the frame queue and command queue hold.
const INLINE_BYTES_MAX: usize = 2 * OUTQ_BYTES_MAX;
/// Commands taken per pass, frames read per pass: fairness between sources.
const BATCH: usize = 64;
/// Batches of queued commands an inline send takes (writing a full frame
/// queue between them) before it joins the command queue instead.
const INLINE_ROUNDS: usize = 4;
/// How long a closing connection may take to flush.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A call sent and not yet answered.
struct Pending {
    reply: oneshot::Sender<Result<ReplyIn, RemoteError>>,
    sent: Instant,
    /// `call` span: actor, message type, request id.
    span: Span,
}

pub(crate) struct Driver {
    node: Arc<NodeShared>,
    link: Box<dyn Link>,
    session: Session,
    conn_id: u64,
    rx: mpsc::Receiver<Command>,
    tx: Option<mpsc::Sender<Command>>,
    ctl_rx: mpsc::UnboundedReceiver<Command>,
    ctl_tx: Option<mpsc::UnboundedSender<Command>>,
    scheme: &'static str,
    dial: Option<String>,
    handle: Option<ConnHandle>,
    established: Option<oneshot::Sender<Result<ConnHandle, RemoteError>>>,
    outq: VecDeque<Frame>,
    /// Bytes of the frames in `outq`.
    outq_bytes: usize,
    pending: RequestIdMap<Pending>,
    /// The session's next deadline (see [`crate::timer`]).
    timer: Deadline,
    timer_at: Option<Instant>,
    /// The time read for the current round of work (see `round_now`).
    clock: Option<Instant>,
    closing_since: Option<Instant>,
    link_done: bool,
    remote: String,
    max_inflight: usize,
    /// Set for inbound links while their handshake runs.
    pub(crate) eviction: Option<Arc<Eviction>>,
    /// Inbound calls being handled: polled here, so a reply goes straight
    /// into the session without another task or channel.
    inbound: Deliveries,
    /// A one-way delivery waiting for mailbox room; reading waits for it.
    blocking: Option<InboundFut>,
    /// `conn` span: id, scheme, remote address, and the peer once known.
    span: Span,
    /// Whether reading is paused at the inbound limit (logged once per pause).
    paused: bool,
    /// Why the link failed, kept for the error when it fails mid-handshake
    /// (a QUIC peer refusing our certificate, say).
    link_error: Option<String>,
    /// The cell this driver lives in (for the connection handle) and the
    /// waker and thread of the task polling it: see [`DriverCell`].
    cell: Weak<DriverCell>,
    task_waker: Option<Waker>,
    task_thread: u64,
    /// The waker inbound calls are polled with, and what it shares with
    /// the driver (see [`InboundWake`]); made for the current task waker
    /// and thread.
    inbound_wake: Option<(Arc<InboundWake>, Waker)>,
    /// A panic caught in [`Driver::reply_inline`], resumed by the task.
    panic: Option<Box<dyn std::any::Any + Send>>,
    finished: bool,
    /// The task was woken to write what inline sends queued.
    flush_scheduled: bool,
    /// The link's last flush found the socket full: it wakes the task
    /// when there is room, and inline sends do not write until then.
    write_blocked: bool,
    /// Frames an inline send may leave queued: [`OUTQ_MAX`] plus the
    /// command queue's capacity (see `send_inline`).
    inline_max: usize,
    /// Counted here, added to the node's metrics once per poll: an atomic
    /// add per frame costs more than the rest of the counting.
    counts: Counts,
    /// Whether the command queues and the timer hold our waker (see
    /// [`Waiting`]).
    rx_waiting: Waiting,
    ctl_waiting: Waiting,
    timer_waiting: Waiting,
}

/// Whether a source the driver polled holds its task's waker: it answered
/// `Pending` with coop budget left (without budget, tokio answers
/// `Pending` without registering). Such a source wakes the task when it
/// has something, so until it shows it has (a queue not empty, a deadline
/// passed) polling it again would only register the same waker again,
/// which costs more than the check. Anything that takes from a queue
/// outside `poll` resets it to `No`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Waiting {
    No,
    Yes,
}

impl Waiting {
    /// Polls a queue through `poll`, noting whether it kept the waker.
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<Option<T>>,
    ) -> Option<T> {
        let budget = has_budget_remaining();
        match poll(cx) {
            Poll::Ready(Some(item)) => {
                *self = Waiting::No;
                Some(item)
            }
            // A closed queue has nothing more to give either.
            Poll::Ready(None) | Poll::Pending => {
                *self = Waiting::after_pending(budget);
                None
            }
        }
    }

    fn after_pending(had_budget: bool) -> Self {
        if had_budget {
            Waiting::Yes
        } else {
            Waiting::No
        }
    }

    /// Whether to poll the source; `idle` is whether it shows nothing new.
    fn needs_poll(self, idle: bool) -> bool {
        self == Waiting::No || !idle
    }
}

/// Counters a driver gathers between two polls (see `Driver::flush_counts`).
#[derive(Default)]
struct Counts {
    calls_in: u64,
    calls_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A connection's driver, shared by the task that polls it and by callers
/// on the same thread that send through it directly
/// ([`ConnHandle::send_inline`]). The lock is only ever tried by callers,
/// so a busy driver (or one on another thread) means the queue, never a
/// wait.
pub(crate) struct DriverCell {
    driver: Mutex<Driver>,
}

/// The task polling a connection's driver.
pub(crate) struct DriverTask(Arc<DriverCell>);

impl DriverTask {
    pub fn new(driver: Driver) -> Self {
        let cell = Arc::new(DriverCell {
            driver: Mutex::new(driver),
        });
        cell.driver.lock().expect("not poisoned").cell = Arc::downgrade(&cell);
        Self(cell)
    }
}

impl Future for DriverTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut d = self.0.driver.lock().expect("not poisoned");
        if let Some(payload) = d.panic.take() {
            drop(d);
            std::panic::resume_unwind(payload);
        }
        match &d.task_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => {
                d.task_waker = Some(cx.waker().clone());
                d.inbound_wake = None;
            }
        }
        let thread = thread_token();
        if d.task_thread != thread {
            d.task_thread = thread;
            d.inbound_wake = None;
        }
        if d.inbound_wake.is_none() {
            let wake = Arc::new(InboundWake {
                cell: Arc::downgrade(&self.0),
                task: cx.waker().clone(),
                thread,
                polling: AtomicBool::new(false),
                again: AtomicBool::new(false),
            });
            d.inbound_wake = Some((wake.clone(), Waker::from(wake)));
        }
        d.flush_scheduled = false;
        let done = Pin::new(&mut *d).poll(cx);
        d.flush_counts();
        if done.is_ready() {
            d.finished = true;
            d.task_waker = None;
        }
        done
    }
}

impl Drop for DriverTask {
    fn drop(&mut self) {
        // Nothing may be handed to a driver no task will poll again (a
        // runtime shutting down drops tasks without finishing them).
        let mut d = match self.0.driver.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        d.finished = true;
        d.task_waker = None;
        d.inbound_wake = None;
    }
}

/// The inbound calls a driver is handling. The first has a slot of its
/// own, polled directly with the driver's inbound waker: a call handled
/// alone (a caller waiting on each reply) costs no task of
/// `FuturesUnordered`'s, an allocation and a wake more per call. Calls
/// that arrive while it is taken go to `rest`, which polls only those
/// woken.
#[derive(Default)]
struct Deliveries {
    first: Option<InboundFut>,
    rest: FuturesUnordered<InboundFut>,
}

impl Deliveries {
    fn push(&mut self, f: InboundFut) {
        if self.first.is_none() {
            self.first = Some(f);
        } else {
            self.rest.push(f);
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// Polls the call in the first slot: its reply (if any) once done.
    fn poll_first(&mut self, cx: &mut Context<'_>) -> Poll<Option<Command>> {
        let Some(f) = self.first.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(f.as_mut().poll(cx));
        self.first = None;
        Poll::Ready(out)
    }
}

/// The waker a driver polls its inbound calls with. An actor's task that
/// answers a call wakes it; on the driver's thread, with the driver idle,
/// the reply is taken and written there and then
/// ([`Driver::reply_inline`]) instead of by another poll of the driver's
/// task: a task switch less per call served, as [`Driver::send_inline`]
/// saves one per call made. Anywhere else it wakes the driver's task.
///
/// While the driver itself polls the calls (`polling`), a wake is only
/// noted (`again`) and the driver polls them once more: among those wakes
/// is the one `FuturesUnordered` gives itself after polling every future
/// it holds, which would otherwise cost a poll of the driver's task per
/// call received.
struct InboundWake {
    cell: Weak<DriverCell>,
    task: Waker,
    thread: u64,
    polling: AtomicBool,
    again: AtomicBool,
}

impl std::task::Wake for InboundWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.thread == thread_token() {
            if self.polling.load(Ordering::Relaxed) {
                self.again.store(true, Ordering::Relaxed);
                return;
            }
            // Only from inside a task's poll (an actor answering): not
            // from the runtime's own timer or I/O wakes, which run outside
            // any task (and outside the arbiter's `LocalSet`), nor while
            // the thread unwinds.
            if !std::thread::panicking() && tokio::task::try_id().is_some() {
                if let Some(cell) = self.cell.upgrade() {
                    if let Ok(mut d) = cell.driver.try_lock() {
                        // A panic here is the driver's, not the actor's
                        // (whose task this runs in): it is carried to the
                        // driver's task and goes on there, ending the
                        // connection as it would have.
                        match std::panic::catch_unwind(AssertUnwindSafe(|| d.reply_inline())) {
                            Ok(true) => return,
                            Ok(false) => {}
                            Err(payload) => {
                                let _ = crate::export::take_last_panic();
                                d.panic = Some(payload);
                            }
                        }
                    }
                }
            }
        }
        self.task.wake_by_ref();
    }
}

std::thread_local! {
    static REPLYING_INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Set while [`Driver::reply_inline`] polls inbound calls, so inside
/// whatever woke it: an actor's task, or the dropping of an actor's
/// mailbox (which may be a runtime shutting down).
struct ReplyingInline(bool);

impl ReplyingInline {
    fn enter() -> Self {
        Self(REPLYING_INLINE.replace(true))
    }
}

impl Drop for ReplyingInline {
    fn drop(&mut self) {
        REPLYING_INLINE.set(self.0);
    }
}

/// Whether an inbound call is being polled from the waker its actor
/// called rather than by the driver's task. A call whose actor stopped
/// then waits for the task ([`defer_to_task`]): what it does next (find
/// the panic, restart the actor, answer the peer) belongs there, not
/// inside an actor's drop, and not during a runtime's shutdown.
pub(crate) fn replying_inline() -> bool {
    REPLYING_INLINE.get()
}

/// Returns `Pending` once, waking itself: polled again by the driver's
/// task (see [`replying_inline`]).
pub(crate) async fn defer_to_task() {
    let mut deferred = false;
    std::future::poll_fn(|cx| {
        if deferred {
            Poll::Ready(())
        } else {
            deferred = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

/// A number for the calling thread, unique among the process's threads.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}

impl Driver {
    /// Takes `cmd` from a caller on the driver's thread while its task is
    /// not running (see [`ConnHandle::send_inline`]). Commands already
    /// queued go first, so one sender's messages keep their order; the
    /// task is woken once to write what gathered.
    #[allow(clippy::result_large_err)]
    fn send_inline(&mut self, cmd: Command) -> Result<(), NotInline> {
        if !self.open_to_this_thread() {
            return Err(NotInline::Queue(cmd));
        }
        let Some(waker) = self.task_waker.take() else {
            return Err(NotInline::Queue(cmd));
        };
        let span = self.span.clone();
        let _entered = span.enter();
        self.clock = None;
        let mut cx = Context::from_waker(&waker);
        let mut wake = false;
        // A sender faster than the socket fills the frame queue. A full
        // queue is a large write's worth, so it is written here. When the
        // socket takes no more, frames wait in the frame queue, up to the
        // command queue's size again (`inline_max`), rather than going
        // through the command queue as well: the same bound on what
        // waits, at less cost per message.
        let mut drained = false;
        let mut full = false;
        for _ in 0..INLINE_ROUNDS {
            // Until the socket wakes the task, trying again would only
            // cost a failed system call per message.
            if self.outq_full() && !self.write_blocked && self.poll_write(&mut cx).is_err() {
                wake = true;
                break;
            }
            if self.drain_queued() {
                drained = true;
                full = self.outq.len() >= self.inline_max || self.outq_bytes >= INLINE_BYTES_MAX;
                break;
            }
        }
        let is_call = matches!(cmd, Command::CallFrame { .. });
        let result = if drained && !full {
            self.on_command(cmd);
            Ok(())
        } else if full {
            Err(NotInline::Full(cmd))
        } else {
            // More queued than a few batches, or the link failed: join
            // the queue behind them.
            Err(NotInline::Queue(cmd))
        };
        self.handle_events();
        wake |= !drained;
        // The only call in flight, alone in the queue: nobody will add to
        // this write, so it goes out now rather than after a poll of the
        // driver's task (a task switch per round trip). Calls made while
        // others are in flight, and one-way messages, still gather for one
        // write per poll.
        let alone = drained && is_call && self.pending.len() == 1 && self.outq.len() == 1;
        wake |= self.write_or_schedule(alone, &waker);
        if wake || self.link_done || self.session.is_closed() {
            waker.wake_by_ref();
        }
        self.task_waker = Some(waker);
        result
    }

    /// After work handed in directly: writes at once when `now` (nobody
    /// will add to this write), else notes that the task is to write what
    /// gathers. With the task's waker: a socket that takes only part
    /// wakes the task when it has room, and an error is the task's to
    /// handle on its next poll. True when the task is to be woken.
    fn write_or_schedule(&mut self, now: bool, task_waker: &Waker) -> bool {
        if now {
            match self.poll_write(&mut Context::from_waker(task_waker)) {
                Ok(_) if self.outq.is_empty() => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        self.schedule_flush()
    }

    /// Takes the reply of the one inbound call being handled and writes
    /// it, from [`InboundWake`]: on the driver's thread, the driver idle.
    /// False when the driver cannot take work here (or more calls are
    /// being handled), and its task is to be woken instead.
    fn reply_inline(&mut self) -> bool {
        // With more calls being handled, their replies gather for one
        // poll of the task and one write (per reply here cost 2% more per
        // call with 64 callers).
        if self.inbound.len() != 1 || !self.open_to_this_thread() {
            return false;
        }
        let Some(task_waker) = self.task_waker.take() else {
            return false;
        };
        let span = self.span.clone();
        let _entered = span.enter();
        self.clock = None;
        let mut wake = false;
        let replied = {
            let _inline = ReplyingInline::enter();
            self.poll_inbound(&mut Context::from_waker(&task_waker), true)
        };
        self.handle_events();
        if replied {
            let alone = self.inbound.is_empty() && !self.write_blocked;
            wake |= self.write_or_schedule(alone, &task_waker);
        }
        if wake || self.link_done || self.session.is_closed() {
            task_waker.wake_by_ref();
        }
        self.task_waker = Some(task_waker);
        true
    }

    /// Hands the replies of the inbound calls that finished to the
    /// session, polling the calls with the inbound waker (`cx` only when
    /// there is none). True if there was any. `inline` when called from
    /// [`Self::reply_inline`]: a call that asks to be polled again (one
    /// whose actor stopped, see [`replying_inline`]) is left to the task.
    fn poll_inbound(&mut self, cx: &mut Context<'_>, inline: bool) -> bool {
        let Some((wake, waker)) = self.inbound_wake.take() else {
            return self.take_replies(cx);
        };
        let mut icx = Context::from_waker(&waker);
        wake.polling.store(true, Ordering::Relaxed);
        let mut replied = false;
        let mut rounds = 0;
        loop {
            replied |= self.take_replies(&mut icx);
            if !wake.again.swap(false, Ordering::Relaxed) {
                break;
            }
            // Woken while polled: `FuturesUnordered` after polling each
            // call once, or a call that yields. The second pass finds
            // nothing to do in the first case; a call that keeps yielding
            // gets another turn after other tasks.
            rounds += 1;
            if inline || rounds == 4 {
                wake.task.wake_by_ref();
                break;
            }
        }
        wake.polling.store(false, Ordering::Relaxed);
        self.inbound_wake = Some((wake, waker));
        replied
    }

    /// Hands the replies of the inbound calls that finished to the session
    /// (see [`Deliveries`]). True if there was any.
    fn take_replies(&mut self, cx: &mut Context<'_>) -> bool {
        let mut replied = false;
        if let Poll::Ready(Some(cmd)) = self.inbound.poll_first(cx) {
            self.on_command(cmd);
            replied = true;
        }
        while let Poll::Ready(Some(cmd)) = self.inbound.rest.poll_next_unpin(cx) {
            if let Some(cmd) = cmd {
                self.on_command(cmd);
                replied = true;
            }
        }
        replied
    }

    /// A one-way message built into the link's send buffer, on the same
    /// terms as [`Self::send_inline`] (the caller on the driver's thread,
    /// the driver idle), and only when no frame waits in front of the
    /// link, so it cannot overtake one. The session checks and signs it
    /// in place; the task is woken once to write what gathered.
    fn cast_in_place(
        &mut self,
        target: ActorId,
        encode: &mut dyn FnMut(&mut BytesMut) -> Result<bool, RemoteError>,
    ) -> Result<InPlace, RemoteError> {
        if !self.open_to_this_thread() || self.task_waker.is_none() {
            return Ok(InPlace::No);
        }
        // Queued commands go first: `send_inline` takes them.
        if !self.ctl_rx.is_empty() || !self.rx.is_empty() {
            return Ok(InPlace::No);
        }
        self.pump_session();
        if !self.outq.is_empty() {
            return Ok(InPlace::No);
        }
        if !self.link.begin_frame() {
            // The link's queue is over budget: a large write's worth, so
            // written here, as `send_inline` writes a full frame queue
            // (not while the socket is known to be full).
            let Some(waker) = self.task_waker.clone() else {
                return Ok(InPlace::No);
            };
            if !self.write_blocked && self.poll_write(&mut Context::from_waker(&waker)).is_err() {
                return Ok(InPlace::No);
            }
            if !self.link.begin_frame() {
                // A full socket behind a full send buffer is the sender's
                // backpressure (the frame queue is left to messages that
                // cannot go this way).
                return Ok(if self.write_blocked {
                    InPlace::Full
                } else {
                    InPlace::No
                });
            }
        }
        let Some(buf) = self.link.frame_buf() else {
            let _ = self.link.end_frame(false);
            return Ok(InPlace::No);
        };
        let start = buf.len();
        let built = match encode(buf) {
            Ok(true) => {
                let t = *self.clock.get_or_insert_with(now);
                match self.session.send_cast_in_place(t, target, buf, start) {
                    Ok(()) => Ok(InPlace::Sent),
                    Err(e) => {
                        // Handled as by the queued path: nothing to send.
                        self.span
                            .in_scope(|| debug!(error = %e, "one-way message dropped"));
                        let _ = self.link.end_frame(false);
                        return Ok(InPlace::Sent);
                    }
                }
            }
            Ok(false) => Ok(InPlace::No),
            Err(e) => Err(e),
        };
        let keep = matches!(built, Ok(InPlace::Sent));
        let len = buf.len() - start;
        let ended = self.link.end_frame(keep);
        if !keep {
            // Taken back out: it goes the usual way, or was an error.
            return built;
        }
        let wake = match ended {
            Ok(()) => {
                self.counts.bytes_out += len as u64;
                self.schedule_flush()
            }
            Err(e) => {
                // The session counted and signed it, the link refused it:
                // the peer would find the next frame out of sequence, so
                // the link is given up, as when `start_send` refuses.
                self.link_failed(&e);
                self.handle_events();
                true
            }
        };
        if wake {
            if let Some(w) = &self.task_waker {
                w.wake_by_ref();
            }
        }
        built
    }

    /// Handles what the session has to say (events that carry no
    /// descriptors).
    #[inline]
    fn handle_events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            self.on_event(ev, &mut None);
        }
    }

    /// The link failed with `e`: nothing more is read or written, and the
    /// session learns the peer is lost.
    fn link_failed(&mut self, e: &TransportError) {
        self.link_done = true;
        self.link_error = Some(e.to_string());
        self.session.handle_link_lost(e.to_string());
    }

    /// Whether a caller may hand work to this driver directly (see
    /// [`Self::send_inline`]): it runs on the driver's thread, and the
    /// connection is established and open.
    fn open_to_this_thread(&self) -> bool {
        !self.finished
            && !self.link_done
            && self.task_thread == thread_token()
            && self.session.is_established()
            && !self.session.is_closed()
    }

    /// Notes that the task is to be woken to write what gathered; true
    /// unless it already was since its last poll.
    fn schedule_flush(&mut self) -> bool {
        !std::mem::replace(&mut self.flush_scheduled, true)
    }

    /// Adds what this driver counted since the last poll to the node's
    /// metrics.
    fn flush_counts(&mut self) {
        let c = std::mem::take(&mut self.counts);
        let m = &self.node.metrics;
        for (counter, n) in [
            (&m.calls_out, c.calls_out),
            (&m.bytes_in, c.bytes_in),
            (&m.bytes_out, c.bytes_out),
        ] {
            if n > 0 {
                Metrics::add(counter, n);
            }
        }
        if c.calls_in > 0 {
            self.node.count_calls_in(c.calls_in);
        }
    }

    /// Takes the commands already queued, control ones first as in `poll`.
    /// False when a batch's worth was taken and more may be waiting.
    fn drain_queued(&mut self) -> bool {
        // The usual case, checked for less than two `try_recv`s cost.
        if self.ctl_rx.is_empty() && self.rx.is_empty() {
            return true;
        }
        // A command taken may have used up the waker its queue held.
        let mut n = 0;
        while n < BATCH {
            let Ok(c) = self.ctl_rx.try_recv() else { break };
            self.ctl_waiting = Waiting::No;
            self.on_command(c);
            n += 1;
        }
        while n < BATCH {
            let Ok(c) = self.rx.try_recv() else {
                return true;
            };
            self.rx_waiting = Waiting::No;
            self.on_command(c);
            n += 1;
        }
        false
    }

    /// Wraps a fresh link. `established` hears the handshake's outcome.
    pub fn new(
        node: Arc<NodeShared>,
        mut link: Box<dyn Link>,
        role: Role,
        scheme: &'static str,
        dial: Option<String>,
        established: Option<oneshot::Sender<Result<ConnHandle, RemoteError>>>,
    ) -> Result<Self, RemoteError> {
        let caps = link.caps();
        let mut config = node.session_config(&caps, &link.peer_addr());
        config.max_frame = config
            .max_frame
            .min(caps.max_frame_len.saturating_sub(TAG_LEN));
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| RemoteError::Protocol {
            peer: link.peer_addr(),
            reason: format!("no randomness for the handshake nonce: {e}"),
        })?;
        let session =
            Session::new(config, role, now(), nonce, link.channel_binding()).map_err(|e| {
                RemoteError::Protocol {
                    peer: link.peer_addr(),
                    reason: e.to_string(),
                }
            })?;
        link.set_max_frame_len(session.max_frame_len());
        let (tx, rx) = mpsc::channel(node.limits.command_queue);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let remote = link.peer_addr();
        let max_inflight = node.limits.max_inbound_in_flight;
        let inline_max = OUTQ_MAX + node.limits.command_queue;
        let conn_id = node.next_conn_id();
        let span = tracing::info_span!("conn", id = conn_id, scheme, remote = %remote, ?role,
                                       peer = field::Empty);
        Ok(Self {
            conn_id,
            node,
            link,
            session,
            rx,
            tx: Some(tx),
            ctl_rx,
            ctl_tx: Some(ctl_tx),
            scheme,
            dial,
            handle: None,
            established,
            outq: VecDeque::new(),
            outq_bytes: 0,
            pending: RequestIdMap::default(),
            timer: Deadline::new(),
            timer_at: None,
            clock: None,
            closing_since: None,
            link_done: false,
            remote,
            max_inflight,
            eviction: None,
            inbound: Deliveries::default(),
            blocking: None,
            span,
            paused: false,
            link_error: None,
            cell: Weak::new(),
            task_waker: None,
            task_thread: 0,
            inbound_wake: None,
            panic: None,
            finished: false,
            flush_scheduled: false,
            write_blocked: false,
            inline_max,
            counts: Counts::default(),
            rx_waiting: Waiting::No,
            ctl_waiting: Waiting::No,
            timer_waiting: Waiting::No,
        })
    }

    /// Drops the handshake if the node evicted it; otherwise remembers who
    /// to wake. Forgets the eviction handle once the handshake is over.
    fn check_eviction(&mut self, cx: &mut Context<'_>) {
        let Some(ev) = &self.eviction else { return };
        if self.session.is_established() || self.session.is_closed() {
            ev.done.store(true, Ordering::Release);
            self.eviction = None;
            return;
        }
        if ev.evicted.load(Ordering::Acquire) {
            debug!(remote = %self.remote, "handshake evicted: too many connections in the handshake");
            self.eviction = None;
            self.session.evict();
            self.handle_events();
            return;
        }
        *ev.waker.lock().expect("not poisoned") = Some(cx.waker().clone());
    }

    fn pump_session(&mut self) {
        while let Some(body) = self.session.poll_transmit() {
            self.outq_bytes += body.len();
            self.outq.push_back(Frame::new(body));
        }
    }

    /// The time for this round of the driver's loop: read once per round
    /// rather than once per frame, which is plenty for heartbeats and the
    /// latency histogram.
    fn round_now(&mut self) -> Instant {
        *self.clock.get_or_insert_with(now)
    }

    /// After the session took (or refused) a call: remember who waits for
    /// the reply, or tell the caller why it was not sent.
    fn call_sent(
        &mut self,
        sent: Result<u64, RemoteError>,
        target: ActorId,
        type_name: &str,
        bytes: usize,
        reply: oneshot::Sender<Result<ReplyIn, RemoteError>>,
        fds: Vec<OwnedFd>,
    ) {
        match sent {
            Ok(request) => {
                self.counts.calls_out += 1;
                let span = tracing::debug_span!("call", actor = %target, msg = type_name, request);
                span.in_scope(|| debug!(bytes, "call sent"));
                let sent_at = self.round_now();
                self.pending.insert(
                    request,
                    Pending {
                        reply,
                        sent: sent_at,
                        span,
                    },
                );
                self.attach_fds(fds);
            }
            Err(e) => {
                if let RemoteError::LimitReached { what, max } = &e {
                    warn!(what, max, actor = %target, msg = type_name, "limit reached");
                }
                let _ = reply.send(Err(e));
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let t = self.round_now();
        match cmd {
            Command::Call {
                target,
                type_name,
                payload,
                refs,
                fds,
                reply,
            } => {
                self.pump_session();
                let sent =
                    self.session
                        .send_call(t, target, type_name, &refs, &payload, fds.len() as u8);
                self.call_sent(sent, target, type_name, payload.len(), reply, fds);
            }
            Command::Reply {
                request,
                status,
                payload,
                refs,
                fds,
            } => {
                self.pump_session();
                let sent =
                    self.session
                        .send_reply(t, request, status, &refs, &payload, fds.len() as u8);
                match sent {
                    Ok(()) => self.attach_fds(fds),
                    Err(e) => self.reply_not_sent(t, request, &e),
                }
            }
            Command::CallFrame {
                target,
                type_name,
                frame,
                fds,
                hold,
                reply,
            } => {
                self.pump_session();
                let bytes = frame.len();
                let sent = self.session.send_call_frame(t, target, frame);
                self.call_sent(sent, target, type_name, bytes, reply, fds);
                drop(hold);
            }
            Command::CastFrame {
                target,
                frame,
                fds,
                hold,
            } => {
                self.pump_session();
                match self.session.send_cast_frame(t, target, frame) {
                    Ok(()) => self.attach_fds(fds),
                    Err(e) => debug!(error = %e, "one-way message dropped"),
                }
                drop(hold);
            }
            Command::ReplyFrame { frame, fds, hold } => {
                self.pump_session();
                let request = courier_runtime::wire::reply_request(&frame);
                match self.session.send_reply_frame(t, frame) {
                    Ok(()) => self.attach_fds(fds),
                    Err(e) => {
                        if let Some(request) = request {
                            self.reply_not_sent(t, request, &e);
                        }
                    }
                }
                drop(hold);
            }
            Command::Release(entries) => {
                let _ = self.session.send_release(t, &entries);
            }
            Command::Acquire(actor) => {
                if let Ok(request) = self.session.send_acquire(t, actor) {
                    self.node.note_acquire(self.conn_id, request, actor);
                }
            }
            Command::Unlend(token) => {
                let _ = self.session.send_unlend(t, token);
            }
            Command::Down(actor) => {
                let _ = self.session.send_down(t, actor);
            }
            Command::InboundDone => {}
            Command::Close(why) => self.session.close(t, &why),
        }
    }

    /// A reply the session refused (too large, say): the caller is told
    /// so rather than left waiting.
    fn reply_not_sent(&mut self, t: Instant, request: u64, e: &RemoteError) {
        debug!(error = %e, request, "reply not sent");
        let text = courier_runtime::codec::encode(&e.to_string()).unwrap_or_default();
        let _ = self
            .session
            .send_reply(t, request, ReplyStatus::TooLarge, &[], &text, 0);
    }

    fn attach_fds(&mut self, fds: Vec<OwnedFd>) {
        self.pump_session();
        if !fds.is_empty() {
            if let Some(f) = self.outq.back_mut() {
                f.fds = fds;
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let Frame { payload, fds } = frame;
        self.counts.bytes_in += payload.len() as u64;
        let t = self.round_now();
        let first = self.session.receive(t, payload);
        let mut fds = Some(fds);
        if let Some(ev) = first {
            self.on_event(ev, &mut fds);
        }
        while let Some(ev) = self.session.poll_event() {
            self.on_event(ev, &mut fds);
        }
    }

    fn on_event(&mut self, ev: Event, fds: &mut Option<Vec<OwnedFd>>) {
        match ev {
            Event::Established(peer) => {
                if let Some(e) = self.eviction.take() {
                    e.done.store(true, Ordering::Release);
                }
                let caps = self.link.caps();
                self.link.set_max_frame_len(self.session.max_frame_len());
                let reach = self
                    .dial
                    .clone()
                    .or_else(|| peer.listen.first().cloned())
                    .unwrap_or_default();
                let key_id: Arc<str> = Arc::from(peer.key_id.as_str());
                let handle = ConnHandle(Arc::new(ConnShared {
                    blobs: peer.features & courier_runtime::wire::features::BLOBS != 0,
                    key_id,
                    driver: self.cell.clone(),
                    id: self.conn_id,
                    reach,
                    peer,
                    caps,
                    scheme: self.scheme,
                    remote: self.dial.clone().unwrap_or_else(|| self.remote.clone()),
                    tx: self.tx.take().expect("established once"),
                    ctl: self.ctl_tx.take().expect("established once"),
                    max_inflight: self.max_inflight,
                    closed: AtomicBool::new(false),
                    close_reason: Mutex::new(None),
                    inflight: AtomicUsize::new(0),
                    tag_room: if self.session.frame_mac() {
                        courier_runtime::wire::TAG_LEN
                    } else {
                        0
                    },
                }));
                self.span.record("peer", field::display(handle.0.peer.node));
                info!(peer = %handle.0.peer.node, key = %handle.0.peer.key_id, remote = %self.remote,
                      mac = self.session.frame_mac(), "peer authenticated");
                self.node.register_conn(&handle, self.dial.as_deref());
                self.handle = Some(handle.clone());
                if let Some(tx) = self.established.take() {
                    let _ = tx.send(Ok(handle));
                }
            }
            Event::Call(call) | Event::Cast(call) => {
                let Some(h) = &self.handle else { return };
                let fds = fds.take().unwrap_or_default();
                self.counts.calls_in += 1;
                let dispatched = self.node.dispatch_inbound(h, call, fds);
                match dispatched {
                    Dispatch::Done => {}
                    Dispatch::Reply(cmd) => self.on_command(cmd),
                    Dispatch::Pending(f) => self.inbound.push(f),
                    Dispatch::Blocking(f) => match &self.blocking {
                        // Only one at a time: reading stops while it waits.
                        None => self.blocking = Some(f),
                        Some(_) => self.inbound.push(f),
                    },
                }
            }
            Event::Reply(reply) => {
                let Some(h) = self.handle.clone() else { return };
                let refs = self.node.resolve_refs(&h, &reply.refs);
                let fds = fds.take().unwrap_or_default();
                let r = ReplyIn {
                    status: reply.status,
                    payload: reply.payload,
                    refs,
                    fds,
                    blobs: reply.blobs,
                };
                if let Some(p) = self.pending.remove(&reply.request) {
                    let rtt = self.round_now().saturating_duration_since(p.sent);
                    self.node.metrics.latency.record(rtt);
                    p.span.in_scope(|| {
                        debug!(status = ?r.status, rtt_us = rtt.as_micros() as u64, "reply received")
                    });
                    let _ = p.reply.send(Ok(r));
                }
                // Else the caller gave up; dropping `r` releases its refs.
            }
            Event::Release(entries) => {
                let Some(h) = self.handle.clone() else { return };
                if let Err(e) = self.node.handle_release(&h, &entries) {
                    warn!(peer = %h.peer_node(), error = %e, "peer broke the reference protocol");
                    self.session
                        .close(now(), &format!("reference protocol: {e}"));
                }
            }
            Event::Acquire {
                request,
                incarnation,
                target,
            } => {
                let Some(h) = self.handle.clone() else { return };
                let ok = self.node.handle_acquire(&h, incarnation, target);
                let _ = self.session.send_acquired(now(), request, ok);
            }
            Event::Acquired { request, ok } => {
                self.node.handle_acquired(self.conn_id, request, ok);
            }
            Event::Unlend { token } => {
                let Some(h) = self.handle.clone() else { return };
                self.node.handle_unlend(&h, token);
            }
            Event::Down {
                incarnation,
                target,
            } => {
                let Some(h) = self.handle.clone() else { return };
                self.node.handle_down(ActorId {
                    node: h.peer_node(),
                    incarnation,
                    local: target,
                });
            }
            Event::Closed { reason, pending } => self.on_closed(reason, pending),
        }
    }

    fn on_closed(&mut self, reason: CloseReason, _pending: Vec<u64>) {
        if let Some(e) = self.eviction.take() {
            e.done.store(true, Ordering::Release);
        }
        let text = reason.to_string();
        self.closing_since = Some(now());
        // Frames not yet handed to the link go nowhere when the peer is
        // dead or broke the protocol: their callers are told the
        // connection was lost, so the calls must not be applied later
        // (after a partition heals, say). Only the session's own goodbye,
        // still in its queue, goes out on a protocol error.
        match &reason {
            CloseReason::HeartbeatTimeout { .. } => {
                self.outq.clear();
                self.outq_bytes = 0;
                while self.session.poll_transmit().is_some() {}
            }
            CloseReason::Protocol(_) => {
                self.outq.clear();
                self.outq_bytes = 0;
            }
            _ => {}
        }
        match &self.handle {
            Some(h) => {
                match &reason {
                    CloseReason::PeerGoodbye(_) | CloseReason::LocalClose(_) => {
                        info!(peer = %h.peer_node(), reason = %text, "connection closed")
                    }
                    _ => warn!(peer = %h.peer_node(), reason = %text, "connection lost"),
                }
                *h.0.close_reason.lock().expect("not poisoned") = Some(text.clone());
                h.0.closed.store(true, Ordering::Release);
                let err = h.lost();
                for (_, p) in self.pending.drain() {
                    let _ = p.reply.send(Err(err.clone()));
                }
                self.node.conn_closed(h);
            }
            None => {
                let err = match (&reason, self.link_error.take()) {
                    (CloseReason::Handshake(HandshakeError::Closed), Some(why)) => {
                        RemoteError::Unreachable {
                            address: self.remote.clone(),
                            reason: format!("the connection failed during the handshake: {why}"),
                        }
                    }
                    (CloseReason::Handshake(e), _) => handshake_error(&self.remote, e),
                    (other, _) => RemoteError::Unreachable {
                        address: self.remote.clone(),
                        reason: other.to_string(),
                    },
                };
                warn!(remote = %self.remote, error = %err, "handshake failed");
                self.node.handshake_ended();
                self.node.handshake_failed();
                if let Some(tx) = self.established.take() {
                    let _ = tx.send(Err(err));
                }
            }
        }
        self.rx.close();
        self.ctl_rx.close();
    }

    fn drain_rx_after_close(&mut self) {
        // Calls queued after the close fail at once.
        while let Ok(cmd) = self.rx.try_recv() {
            self.rx_waiting = Waiting::No;
            if let Command::Call { reply, .. } | Command::CallFrame { reply, .. } = cmd {
                let err = match &self.handle {
                    Some(h) => h.lost(),
                    None => RemoteError::Protocol {
                        peer: self.remote.clone(),
                        reason: "connection closed".into(),
                    },
                };
                let _ = reply.send(Err(err));
            }
        }
    }

    /// Writes what is queued. Returns an error when the link failed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, TransportError> {
        let mut progress = false;
        self.pump_session();
        while !self.outq.is_empty() {
            match self.link.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let f = self.outq.pop_front().expect("not empty");
                    self.outq_bytes -= f.payload.len();
                    self.counts.bytes_out += f.payload.len() as u64;
                    self.link.start_send(f)?;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        match self.link.poll_flush(cx) {
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(())) => {
                self.write_blocked = false;
                Ok(progress)
            }
            Poll::Pending => {
                self.write_blocked = true;
                Ok(progress)
            }
        }
    }

    /// Whether the frame queue holds a full write's worth.
    fn outq_full(&self) -> bool {
        self.outq.len() >= OUTQ_MAX || self.outq_bytes >= OUTQ_BYTES_MAX
    }

    fn accepting_commands(&self) -> bool {
        self.session.is_established() && !self.outq_full() && !self.session.is_closed()
    }

    fn reading_allowed(&self) -> bool {
        if self.blocking.is_some() {
            return false;
        }
        match &self.handle {
            Some(h) => h.0.inflight.load(Ordering::Acquire) < self.max_inflight,
            None => true,
        }
    }
}

fn handshake_error(remote: &str, e: &HandshakeError) -> RemoteError {
    if e.is_authentication() {
        RemoteError::Authentication {
            peer: remote.to_owned(),
            reason: e.to_string(),
        }
    } else {
        RemoteError::Protocol {
            peer: remote.to_owned(),
            reason: format!("handshake: {e}"),
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let span = this.span.clone();
        let _entered = span.enter();
        this.check_eviction(cx);
        // Each round polls every source once, in the order work flows:
        // frames in, then the deliveries they started, then commands, then
        // frames out. A source that returned `Pending` has our waker, so
        // another round is needed only when a step leaves work for an
        // earlier one (`again`): a batch limit hit, reading held back and
        // since allowed, a command queue that was full and has room, or
        // the timer firing.
        for _round in 0..32 {
            let mut again = false;
            this.clock = None;

            // Frames in.
            let mut read_held = true;
            let mut read_full = false;
            if !this.link_done && this.reading_allowed() {
                read_held = false;
                let mut n = 0;
                loop {
                    if n == BATCH {
                        again = true;
                        read_full = true;
                        break;
                    }
                    n += 1;
                    match this.link.poll_recv(cx) {
                        Poll::Ready(Some(Ok(frame))) => this.on_frame(frame),
                        Poll::Ready(Some(Err(e))) => {
                            this.link_failed(&e);
                            again = true;
                            break;
                        }
                        Poll::Ready(None) => {
                            this.link_done = true;
                            this.session
                                .handle_link_lost("the peer closed the connection");
                            again = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                    if !this.reading_allowed() {
                        read_held = true;
                        break;
                    }
                }
                this.handle_events();
            }

            // Deliveries, including any just started (a new future is
            // first polled here): their replies go straight out.
            if let Some(f) = this.blocking.as_mut() {
                if let Poll::Ready(cmd) = f.as_mut().poll(cx) {
                    this.blocking = None;
                    if let Some(cmd) = cmd {
                        this.on_command(cmd);
                    }
                }
            }
            this.poll_inbound(cx, false);

            // While reading is paused by our own backpressure, the peer
            // is not to blame for the silence.
            let allowed = this.reading_allowed();
            if read_held && allowed && !this.link_done {
                again = true;
            }
            if !allowed {
                this.session.handle_activity(now());
            }
            if !allowed && !this.paused {
                warn!(
                    max = this.max_inflight,
                    "limit reached: inbound calls in flight; reading paused"
                );
            } else if allowed && this.paused {
                debug!("reading resumed");
            }
            this.paused = !allowed;

            // Control commands in (never held back: they are small and
            // must not be lost).
            if this.session.is_established()
                && !this.session.is_closed()
                && this.ctl_waiting.needs_poll(this.ctl_rx.is_empty())
            {
                let mut n = 0;
                loop {
                    if n == BATCH {
                        again = true;
                        break;
                    }
                    n += 1;
                    match this.ctl_waiting.poll(cx, |cx| this.ctl_rx.poll_recv(cx)) {
                        Some(cmd) => this.on_command(cmd),
                        None => break,
                    }
                }
            }

            // Commands in.
            let mut commands_held = true;
            if this.accepting_commands() {
                commands_held = false;
                let mut n = 0;
                while this.rx_waiting.needs_poll(this.rx.is_empty()) {
                    if n == BATCH {
                        again = true;
                        break;
                    }
                    n += 1;
                    match this.rx_waiting.poll(cx, |cx| this.rx.poll_recv(cx)) {
                        Some(cmd) => this.on_command(cmd),
                        None => break,
                    }
                    if !this.accepting_commands() {
                        commands_held = true;
                        break;
                    }
                }
                this.handle_events();
            }

            // Frames out.
            if !this.link_done {
                if let Err(e) = this.poll_write(cx) {
                    this.link_failed(&e);
                    this.handle_events();
                    again = true;
                }
            }
            if commands_held && this.accepting_commands() {
                again = true;
            }

            // Time.
            if let Some(at) = this.session.poll_timeout() {
                // The deadline moves later with every frame; re-arming the
                // timer each time costs more than letting it fire early
                // once and re-arming then (`handle_timeout` does nothing
                // before the deadline).
                if this.timer_at.is_none_or(|armed| armed > at) {
                    this.timer_at = Some(at);
                    this.timer.reset(at);
                    this.timer_waiting = Waiting::No;
                }
                // Polled again only once its deadline passed: until then
                // the timer holds our waker from the last poll.
                let now = this.round_now();
                let due = this.timer_at.is_some_and(|t| now >= t);
                if this.timer_waiting.needs_poll(!due) {
                    if this.timer.poll(now, cx).is_ready() {
                        this.timer_waiting = Waiting::No;
                        this.timer_at = None;
                        this.session.handle_timeout(now);
                        this.handle_events();
                        again = true;
                    } else {
                        this.timer_waiting = Waiting::Yes;
                    }
                }
            }

            // Ending.
            if this.session.is_closed() {
                this.drain_rx_after_close();
                this.pump_session();
                let flushed = this.outq.is_empty()
                    && !this.link_done
                    && matches!(this.link.poll_close(cx), Poll::Ready(_));
                let late = this
                    .closing_since
                    .is_some_and(|t| now().duration_since(t) >= CLOSE_GRACE);
                if flushed || this.link_done || late {
                    if this.session.is_established() || this.handle.is_none() {
                        // Never established: make sure the node forgets it.
                    }
                    return Poll::Ready(());
                }
                let grace_end = this.closing_since.map(|t| t + CLOSE_GRACE);
                // Armed for the grace's end unless the timer will wake us
                // sooner; a deadline already past (a heartbeat's, which the
                // closed session no longer polls) wakes no one again.
                let now = this.round_now();
                let armed_sooner = |at| this.timer_at.is_some_and(|t| t <= at && t > now);
                if let Some(at) = grace_end.filter(|&at| !armed_sooner(at)) {
                    this.timer_at = Some(at);
                    this.timer.reset(at);
                    this.timer_waiting = Waiting::No;
                    if this.timer.poll(now, cx).is_ready() {
                        // Passed since the check above read the clock: the
                        // next poll ends the connection.
                        cx.waker().wake_by_ref();
                    }
                }
            }

            if !again {
                return Poll::Pending;
            }
            if read_full {
                // A batch of frames read: let the actors they went to run
                // before reading more (what they free is what the next
                // batch allocates, still warm), then continue.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        // Still busy after many rounds: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let span = self.span.clone();
        let _entered = span.enter();
        if !self.session.is_closed() {
            self.session.handle_link_lost("the node is shutting down");
            self.handle_events();
        }
        self.flush_counts();
    }
}
