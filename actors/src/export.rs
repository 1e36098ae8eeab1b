//! Exported actors: the type-erased entries in the node's export table, and
//! the builder applications use to export an actor.

use std::any::Any;
use std::backtrace::Backtrace;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};

use actix::dev::ToEnvelope;
use actix::prelude::SendError;
use actix::{Actor, Addr, Handler, MailboxError};
use bytes::Bytes;
use courier_runtime::error::{RemoteError, RemoteFailure};
use courier_runtime::id::ActorId;
use courier_runtime::wire::ReplyStatus;
use serde::Serialize;
use tracing::{error, warn, Instrument, Span};

use crate::conn::{Command, ConnHandle};
use crate::message::{RemoteMessage, RemoteReply};
use crate::node::{Node, NodeShared};
use crate::refctx::{self, Resolved};
use crate::remote::RemoteAddr;

/// Who sent a message: the authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The peer's node id.
    pub node: courier_runtime::id::NodeId,
    /// The key it proved with: its identity in the keyring. Shared, so
    /// handing it to each message costs no allocation.
    pub key_id: std::sync::Arc<str>,
}

/// An inbound call or cast, headed for one exported actor.
pub(crate) struct Inbound<'a> {
    pub type_name: bytes::Bytes,
    pub payload: Bytes,
    pub refs: Vec<Resolved>,
    pub fds: Vec<OwnedFd>,
    pub blobs: Vec<Bytes>,
    pub reply: Option<ReplySink>,
    /// The connection it came on: its peer is the caller, and a delivery
    /// that waits counts as in flight on it (see [`InflightGuard`]).
    pub conn: &'a ConnHandle,
    /// The `call` span (actor, message type, request id).
    pub span: Span,
}

/// Counts an inbound message in flight on its connection until dropped.
pub(crate) struct InflightGuard(pub ConnHandle);

impl InflightGuard {
    pub fn new(conn: &ConnHandle) -> Self {
        conn.0.inflight.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let before = self.0 .0.inflight.fetch_sub(1, Ordering::AcqRel);
        // Wake the driver if it had stopped reading at the limit.
        if before >= self.0 .0.max_inflight {
            let _ = self.0 .0.ctl.send(Command::InboundDone);
        }
    }
}

/// Where the answer to an inbound call goes.
pub(crate) struct ReplySink {
    pub conn: ConnHandle,
    pub node: Arc<NodeShared>,
    pub request: u64,
    pub done: bool,
}

impl ReplySink {
    /// Encodes `value` (with any references or descriptors in it) as the
    /// reply command for the connection's driver.
    pub fn reply<T: Serialize>(mut self, value: &T) -> Command {
        use courier_runtime::wire::{encode_reply_head, BLOB_LEN_SIZE, REPLY_HEADER_LEN};
        self.done = true;
        let room = REPLY_HEADER_LEN;
        let built = refctx::encode_with(value, room, self.conn.0.blobs, |buf, found| {
            let refctx::Found { refs, fds, blobs } = found;
            if !fds.is_empty() && !self.conn.0.caps.carries_fds {
                self.node.discard_out(&refs);
                return Ok(self.status_command(
                    ReplyStatus::BadPayload,
                    &format!(
                        "the reply holds file descriptors, which {} cannot carry",
                        self.conn.0.scheme
                    ),
                ));
            }
            match self.node.account_out(&self.conn, &refs) {
                Ok(wire) => {
                    let head_max = room
                        + wire.len() * crate::remote::WIRE_REF_MAX
                        + blobs.len() * BLOB_LEN_SIZE;
                    let n_fds = fds.len() as u8;
                    let tag_room = self.conn.0.tag_room;
                    let frame = refctx::into_frame(buf, room, head_max, tag_room, &blobs, |out| {
                        encode_reply_head(out, self.request, ReplyStatus::Ok, n_fds, &wire, &blobs)
                    });
                    Ok(Command::ReplyFrame {
                        frame,
                        fds,
                        hold: refs,
                    })
                }
                Err(e) => Ok(self.status_command(ReplyStatus::Refused, &e.to_string())),
            }
        });
        built.unwrap_or_else(|e| self.status_command(ReplyStatus::BadPayload, &e.to_string()))
    }

    /// A failure status and a text, as the reply command.
    pub fn fail(mut self, status: ReplyStatus, text: &str) -> Command {
        self.done = true;
        self.status_command(status, text)
    }

    /// A handler failure, as the reply command.
    pub fn failed(mut self, failure: &RemoteFailure) -> Command {
        self.done = true;
        Command::Reply {
            request: self.request,
            status: ReplyStatus::Failed,
            payload: courier_runtime::codec::encode(failure).unwrap_or_default(),
            refs: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn status_command(&self, status: ReplyStatus, text: &str) -> Command {
        Command::Reply {
            request: self.request,
            status,
            payload: courier_runtime::codec::encode(text).unwrap_or_default(),
            refs: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// Work an inbound message leaves for its connection's driver.
pub(crate) enum Dispatch {
    /// Nothing more to do.
    Done,
    /// Send this reply now.
    Reply(Command),
    /// Poll this until it yields the reply (or nothing, for a cast).
    Pending(InboundFut),
    /// Like `Pending`, and read nothing more from the peer until it is done:
    /// a one-way message met a full mailbox, and later messages must not
    /// overtake it.
    Blocking(InboundFut),
}

/// A delivery in progress, polled by the connection's driver.
pub(crate) type InboundFut = Pin<Box<dyn Future<Output = Option<Command>> + Send>>;

impl Drop for ReplySink {
    fn drop(&mut self) {
        if !self.done {
            // Never leave a caller waiting: the handler went away.
            let _ = self.conn.0.ctl.send(Command::Reply {
                request: self.request,
                status: ReplyStatus::ActorStopped,
                payload: courier_runtime::codec::encode("the actor stopped before answering")
                    .unwrap_or_default(),
                refs: Vec::new(),
                fds: Vec::new(),
            });
        }
    }
}

/// An exported actor, whatever its type.
pub(crate) trait ExportedAny: Send + Sync + 'static {
    /// Decodes and delivers an inbound message.
    fn dispatch(self: Arc<Self>, inbound: Inbound) -> Dispatch;
    /// For turning a local reference back into a typed one.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// The message types it handles remotely.
    fn message_types(&self) -> Vec<&'static str>;
    /// The actor's Rust type name.
    fn actor_type(&self) -> &'static str;
    /// Forgets its id (the export was freed).
    fn clear_id(&self);
    /// How many times it was restarted.
    fn restarts(&self) -> u64;
}

type HandlerFn<A> = Box<dyn Fn(&Arc<ExportEntry<A>>, Inbound) -> Dispatch + Send + Sync>;

/// Handlers by message type name (its bytes, as they arrive).
type Handlers<A> = HashMap<&'static [u8], HandlerFn<A>, BuildHasherDefault<NameHasher>>;

/// FNV-1a over a message type name: a few instructions for a short name,
/// where SipHash costs a hundred. Only our own names are ever inserted, so
/// a peer choosing names cannot degrade the table.
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}
type Factory<A> = Box<dyn Fn() -> Addr<A> + Send + Sync>;

/// Where an export's calls go (see [`ExportEntry::with_addr`]).
enum Mailbox<A: Actor> {
    Fixed(Addr<A>),
    /// Restarted with `factory` when found dead.
    Supervised {
        addr: RwLock<Addr<A>>,
        factory: Factory<A>,
    },
}

/// One exported actor of type `A`.
pub(crate) struct ExportEntry<A: Actor> {
    pub id: Mutex<Option<ActorId>>,
    pub pinned: bool,
    /// The actor's mailbox. An export nobody restarts keeps it where every
    /// call reads it without a lock; a supervised one swaps it on restart.
    mailbox: Mailbox<A>,
    handlers: Handlers<A>,
    failure_details: bool,
    backtraces: bool,
    restarts: AtomicU64,
}

impl<A: Actor> ExportEntry<A> {
    /// The actor's mailbox; a supervised actor that died is restarted first,
    /// keeping its id.
    pub fn current_addr(&self) -> Addr<A> {
        self.with_addr(Addr::clone)
    }

    /// Runs `f` on the actor's mailbox without cloning it (a clone of an
    /// actix `Addr` allocates twice); restarts a dead supervised actor
    /// first, as [`Self::current_addr`] does.
    pub fn with_addr<R>(&self, f: impl FnOnce(&Addr<A>) -> R) -> R {
        let (lock, factory) = match &self.mailbox {
            Mailbox::Fixed(addr) => return f(addr),
            Mailbox::Supervised { addr, factory } => (addr, factory),
        };
        let addr = lock.read().expect("not poisoned");
        if addr.connected() {
            return f(&addr);
        }
        drop(addr);
        self.restart_if_dead(lock, factory);
        f(&lock.read().expect("not poisoned"))
    }

    fn restart_if_dead(&self, lock: &RwLock<Addr<A>>, factory: &Factory<A>) {
        let mut slot = lock.write().expect("not poisoned");
        if !slot.connected() {
            *slot = factory();
            let n = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(actor = std::any::type_name::<A>(), id = ?*self.id.lock().expect("not poisoned"),
                  restarts = n, "exported actor restarted");
        }
    }

    /// Whether the actor a call went to still runs: `sent_to` is the
    /// restart count read when the call went into its mailbox.
    fn still_runs(&self, sent_to: u64) -> bool {
        self.restarts.load(Ordering::Relaxed) == sent_to
            && match &self.mailbox {
                Mailbox::Fixed(addr) => addr.connected(),
                Mailbox::Supervised { addr, .. } => addr.read().expect("not poisoned").connected(),
            }
    }

    /// Why a call of `type_name` got no answer: `panic`, the panic this
    /// thread saw, as the failure to report (with its backtrace, still to
    /// be symbolized, when this export asked for backtraces); else, if the
    /// actor still `runs`, it dropped the call (a handler's future
    /// cancelled, say); else it stopped (or panicked on a thread of its
    /// own, whose log has the panic).
    fn stop_failure(
        &self,
        type_name: &str,
        panic: Option<(String, Option<Backtrace>)>,
        runs: bool,
    ) -> Stopped {
        let Some((text, backtrace)) = panic else {
            if runs {
                return Stopped::Failure(
                    RemoteFailure {
                        type_name: "dropped".into(),
                        message: format!("the actor dropped the call of {type_name} unanswered"),
                        backtrace: None,
                    },
                    None,
                );
            }
            warn!(
                actor = std::any::type_name::<A>(),
                message = type_name,
                "the actor stopped before answering"
            );
            return if matches!(self.mailbox, Mailbox::Supervised { .. }) {
                Stopped::Failure(
                    RemoteFailure {
                        type_name: "stopped".into(),
                        message: format!(
                            "the actor stopped before answering {type_name}; it was restarted"
                        ),
                        backtrace: None,
                    },
                    None,
                )
            } else {
                Stopped::Gone
            };
        };
        error!(
            actor = std::any::type_name::<A>(),
            message = type_name,
            panic = %text,
            "handler panicked"
        );
        let message = if self.failure_details {
            format!("the handler of {type_name} panicked: {text}")
        } else {
            format!("the handler of {type_name} panicked (details are in the exporting node's log)")
        };
        let failure = RemoteFailure {
            type_name: "panic".into(),
            message,
            backtrace: None,
        };
        Stopped::Failure(failure, backtrace.filter(|_| self.backtraces))
    }
}

/// How long, and how often, a call that got no answer from an actor whose
/// mailbox is still open looks again before it is told "dropped" (see
/// [`answer_closed`]).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
const STOP_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// What a call whose actor's mailbox closed is told (see
/// [`ExportEntry::stop_failure`]).
enum Stopped {
    /// A panic, or a supervised actor's stop: a failure (the actor is
    /// restarted).
    Failure(RemoteFailure, Option<Backtrace>),
    /// An actor nobody restarts stopped: the reference is dead.
    Gone,
}

impl<A: Actor> ExportedAny for ExportEntry<A> {
    fn dispatch(self: Arc<Self>, inbound: Inbound) -> Dispatch {
        match self.handlers.get(&inbound.type_name[..]) {
            Some(h) => h(&self, inbound),
            None => {
                let name = String::from_utf8_lossy(&inbound.type_name).into_owned();
                match inbound.reply {
                    Some(r) => Dispatch::Reply(r.fail(ReplyStatus::UnknownMessage, &name)),
                    None => Dispatch::Done,
                }
            }
        }
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn message_types(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self
            .handlers
            .keys()
            .filter_map(|k| std::str::from_utf8(k).ok())
            .collect();
        v.sort_unstable();
        v
    }

    fn actor_type(&self) -> &'static str {
        std::any::type_name::<A>()
    }

    fn clear_id(&self) {
        *self.id.lock().expect("not poisoned") = None;
    }

    fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

fn handler<A, M>() -> HandlerFn<A>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    Box::new(|entry: &Arc<ExportEntry<A>>, inbound: Inbound| {
        let Inbound {
            payload,
            refs,
            fds,
            blobs,
            reply,
            conn,
            span,
            ..
        } = inbound;
        let msg: M = match refctx::decode(&payload, refs, fds, blobs) {
            Ok(mut m) => {
                if M::WANTS_CALLER {
                    M::set_caller(
                        &mut m,
                        Caller {
                            node: conn.peer_node(),
                            key_id: conn.0.key_id.clone(),
                        },
                    );
                }
                m
            }
            Err(e) => {
                return match reply {
                    Some(r) => Dispatch::Reply(r.fail(ReplyStatus::BadPayload, &e.to_string())),
                    None => Dispatch::Done,
                }
            }
        };
        let Some(reply) = reply else {
            // One-way: straight into the mailbox when it has room.
            return match entry.with_addr(|addr| addr.try_send(msg)) {
                Ok(()) => Dispatch::Done,
                Err(SendError::Full(msg)) => {
                    let req = entry.with_addr(|addr| addr.send(msg));
                    let guard = InflightGuard::new(conn);
                    Dispatch::Blocking(Box::pin(async move {
                        let _guard = guard;
                        let _ = req.await;
                        None
                    }))
                }
                Err(SendError::Closed(msg)) => {
                    // The actor died; a supervised one is restarted here.
                    let _ = entry.stop_failure(M::TYPE.as_str(), take_last_panic(), false);
                    let _ = entry.current_addr().try_send(msg);
                    Dispatch::Done
                }
            };
        };
        // Which actor it went to: `with_addr` restarts a dead one first,
        // under the lock restarts take.
        let (request, sent_to) =
            entry.with_addr(|addr| (addr.send(msg), entry.restarts.load(Ordering::Relaxed)));
        Dispatch::Pending(Box::pin(Answer::<A, M> {
            request,
            reply: Some(reply),
            entry: entry.clone(),
            sent_to,
            span,
            closed: None,
            _guard: InflightGuard::new(conn),
        }))
    })
}

pin_project_lite::pin_project! {
    /// A call in the actor's mailbox, waiting for the actor's answer, which
    /// it encodes as the reply. Written out rather than as an `async`
    /// block: the driver polls one per call, and this one is smaller and
    /// enters its span only to reply.
    struct Answer<A, M>
    where
        A: Actor,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        #[pin]
        request: actix::dev::Request<A, M>,
        reply: Option<ReplySink>,
        entry: Arc<ExportEntry<A>>,
        sent_to: u64,
        span: Span,
        // The mailbox closed under the call: boxed, so that the rare
        // path's state does not weigh on every call's future.
        closed: Option<InboundFut>,
        _guard: InflightGuard,
    }
}

impl<A, M> Future for Answer<A, M>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    type Output = Option<Command>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let Some(closed) = this.closed.as_mut() {
            return closed.as_mut().poll(cx);
        }
        let answer = std::task::ready!(this.request.poll(cx));
        let reply = this.reply.take().expect("an answer is given once");
        let _entered = this.span.enter();
        match answer {
            Ok(value) => std::task::Poll::Ready(Some(reply.reply(&value))),
            Err(MailboxError::Timeout) => std::task::Poll::Ready(Some(reply.fail(
                ReplyStatus::ActorStopped,
                "the actor did not answer in time",
            ))),
            Err(MailboxError::Closed) => {
                let closed =
                    answer_closed(this.entry.clone(), reply, *this.sent_to, M::TYPE.as_str());
                let span = this.span.clone();
                let closed = this
                    .closed
                    .insert(Box::pin(async move { Some(closed.await) }.instrument(span)));
                closed.as_mut().poll(cx)
            }
        }
    }
}

/// What a call whose actor's mailbox closed under it is told (see
/// [`ExportEntry::stop_failure`]); a supervised actor is restarted.
async fn answer_closed<A: Actor>(
    entry: Arc<ExportEntry<A>>,
    reply: ReplySink,
    sent_to: u64,
    type_name: &'static str,
) -> Command {
    // From here on in the driver's task: the waker writes only answers,
    // and the timer that wakes the wait below never runs it inline.
    if crate::conn::replying_inline() {
        crate::conn::defer_to_task().await;
    }
    let panic = take_last_panic();
    let mut runs = panic.is_none() && entry.still_runs(sent_to);
    // An actor panicking on a thread of its own drops the call before its
    // mailbox closes: a moment for that, bounded.
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    while runs && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(STOP_CHECK_EVERY).await;
        runs = entry.still_runs(sent_to);
    }
    match entry.stop_failure(type_name, panic, runs) {
        Stopped::Failure(mut failure, bt) => {
            // Restart now rather than on the next message.
            let _ = entry.current_addr();
            if let Some(bt) = bt {
                // Symbolizing takes long: not on the arbiter.
                failure.backtrace = tokio::task::spawn_blocking(move || bt.to_string())
                    .await
                    .ok();
            }
            reply.failed(&failure)
        }
        Stopped::Gone => reply.fail(ReplyStatus::ActorStopped, "the actor stopped"),
    }
}

/// Builds an export: which messages the actor handles remotely, and how it
/// is named. Made by [`Node::export`] or [`Node::export_supervised`].
pub struct Export<A: Actor> {
    node: Node,
    addr: Addr<A>,
    factory: Option<Factory<A>>,
    handlers: Handlers<A>,
    failure_details: bool,
    backtraces: bool,
}

impl<A: Actor> Export<A> {
    pub(crate) fn new(node: Node, addr: Addr<A>, factory: Option<Factory<A>>) -> Self {
        Self {
            node,
            addr,
            factory,
            handlers: Handlers::default(),
            failure_details: false,
            backtraces: false,
        }
    }

    /// Lets remote callers send `M` to the actor.
    pub fn handles<M>(mut self) -> Self
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        self.handlers
            .insert(M::TYPE.as_str().as_bytes(), handler::<A, M>());
        self
    }

    /// Whether callers see the panic message and backtrace of a failed
    /// handler (off by default: they get an opaque failure, and the message
    /// is logged here). Turn it on for trusted peers only.
    pub fn failure_details(mut self, on: bool) -> Self {
        self.failure_details = on;
        self
    }

    /// Whether callers also get the backtrace of a panicked handler (off by
    /// default). Capturing one costs a little on every panic in this
    /// process once any export asks; symbolizing it runs on a blocking
    /// thread, not on the node's arbiter.
    pub fn backtraces(mut self, on: bool) -> Self {
        self.backtraces = on;
        if on {
            WANT_BACKTRACES.store(true, Ordering::Relaxed);
        }
        self
    }

    fn entry(self, pinned: bool) -> (Node, Arc<ExportEntry<A>>) {
        let entry = Arc::new(ExportEntry {
            id: Mutex::new(None),
            pinned,
            mailbox: match self.factory {
                Some(factory) => Mailbox::Supervised {
                    addr: RwLock::new(self.addr),
                    factory,
                },
                None => Mailbox::Fixed(self.addr),
            },
            handlers: self.handlers,
            failure_details: self.failure_details,
            backtraces: self.backtraces,
            restarts: AtomicU64::new(0),
        });
        (self.node, entry)
    }

    /// Exports the actor under `name` in the node's registry: peers find it
    /// with [`Node::lookup`]. It stays exported until unregistered.
    pub fn register(self, name: &str) -> Result<RemoteAddr<A>, RemoteError> {
        let (node, entry) = self.entry(true);
        node.shared.register(name, entry.clone())?;
        Ok(RemoteAddr::local(entry, &node.shared))
    }

    /// A reference to the actor without a name. It is exported when first
    /// sent to a peer and unexported when the last peer releases it.
    pub fn anonymous(self) -> RemoteAddr<A> {
        let (node, entry) = self.entry(false);
        RemoteAddr::local(entry, &node.shared)
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, Option<Backtrace>)>> = const { RefCell::new(None) };
}

/// Records panic messages per thread so a failed handler can report one.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "non-text panic payload".to_owned()
            };
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            // Captured (not yet symbolized: that is slow, and done off the
            // arbiter) only when some exporter asked for backtraces.
            let bt = WANT_BACKTRACES
                .load(Ordering::Relaxed)
                .then(Backtrace::force_capture);
            LAST_PANIC.with(|p| *p.borrow_mut() = Some((format!("{msg}{at}"), bt)));
            previous(info);
        }));
    });
}

/// Whether any export asked for backtraces (see [`Export::backtraces`]).
static WANT_BACKTRACES: AtomicBool = AtomicBool::new(false);

pub(crate) fn take_last_panic() -> Option<(String, Option<Backtrace>)> {
    LAST_PANIC.with(|p| p.borrow_mut().take())
}
