//! Typed references to actors, local or remote.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Handler, MailboxError};
use courier_runtime::error::{DeadReason, RemoteError, RemoteFailure};
use courier_runtime::id::ActorId;
use courier_runtime::wire::ReplyStatus;
use pin_project_lite::pin_project;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::oneshot;

use crate::conn::{Command, ConnHandle, InPlace, NotInline, ReplyIn};
use crate::export::ExportEntry;
use crate::message::{RemoteMessage, RemoteReply};
use crate::node::NodeShared;
use crate::refctx::{self, OutRef, Resolved};

/// The shared state behind every handle to one imported actor.
pub(crate) struct Imported {
    pub id: ActorId,
    pub instance: u64,
    pub owner_addr: String,
    pub node: Weak<NodeShared>,
    pub conn: Mutex<Option<ConnHandle>>,
    pub dead: Mutex<Option<DeadReason>>,
    /// Set once `dead` is: every send checks this, not the lock.
    pub is_dead: AtomicBool,
}

impl Imported {
    /// A handle that is dead from the start (not in any table).
    pub fn dead(id: ActorId, reason: DeadReason) -> Arc<Self> {
        Arc::new(Self {
            id,
            instance: 0,
            owner_addr: String::new(),
            node: Weak::new(),
            conn: Mutex::new(None),
            dead: Mutex::new(Some(reason)),
            is_dead: AtomicBool::new(true),
        })
    }

    pub fn dead_reason(&self) -> Option<DeadReason> {
        if !self.is_dead.load(Ordering::Acquire) {
            return None;
        }
        *self.dead.lock().expect("not poisoned")
    }

    pub fn mark_dead(&self, reason: DeadReason) {
        let mut d = self.dead.lock().expect("not poisoned");
        if d.is_none() {
            *d = Some(reason);
            self.is_dead.store(true, Ordering::Release);
        }
    }

    fn dead_error(&self, reason: DeadReason) -> RemoteError {
        RemoteError::DeadReference {
            actor: self.id,
            reason,
        }
    }

    /// The connection to the owner if there is one (or why the reference
    /// is dead); `None` when it must be made first ([`Self::connection`]).
    pub fn connected(&self) -> Option<Result<(Arc<NodeShared>, ConnHandle), RemoteError>> {
        if let Some(r) = self.dead_reason() {
            return Some(Err(self.dead_error(r)));
        }
        let Some(node) = self.node.upgrade() else {
            return Some(Err(self.dead_error(DeadReason::NodeUnreachable)));
        };
        let c = self.conn.lock().expect("not poisoned").clone()?;
        if c.is_closed() {
            self.mark_dead(DeadReason::NodeUnreachable);
            return Some(Err(self.dead_error(DeadReason::NodeUnreachable)));
        }
        Some(Ok((node, c)))
    }

    /// The connection to the owner, made if needed (for a reference handed
    /// over by a third node).
    pub async fn connection(&self) -> Result<(Arc<NodeShared>, ConnHandle), RemoteError> {
        if let Some(known) = self.connected() {
            return known;
        }
        let node = self
            .node
            .upgrade()
            .ok_or(self.dead_error(DeadReason::NodeUnreachable))?;
        let c = node.connect_node(self.id.node, &self.owner_addr).await?;
        if c.0.peer.incarnation != self.id.incarnation {
            self.mark_dead(DeadReason::OldIncarnation);
            return Err(self.dead_error(DeadReason::OldIncarnation));
        }
        *self.conn.lock().expect("not poisoned") = Some(c.clone());
        Ok((node, c))
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            node.import_dropped(self.id, self.instance);
        }
    }
}

pub(crate) enum Target<A: Actor> {
    Local(Arc<ExportEntry<A>>, Weak<NodeShared>),
    Remote(Arc<Imported>),
}

/// A typed reference to an actor of type `A`, on this node or another.
///
/// Like actix's `Addr<A>`: `send` for request/reply, `do_send` for one-way
/// messages, for every `M` the actor handles remotely. A reference to an
/// actor on this node goes straight to its mailbox, without encoding.
///
/// A `RemoteAddr` is also a plain serde field: put it in a message and the
/// receiver gets a live reference to the same actor (not a proxy), counted
/// so the exporter knows when the last holder dropped it.
pub struct RemoteAddr<A: Actor> {
    target: Target<A>,
    _actor: PhantomData<fn() -> A>,
}

impl<A: Actor> Clone for RemoteAddr<A> {
    fn clone(&self) -> Self {
        Self {
            target: match &self.target {
                Target::Local(e, n) => Target::Local(e.clone(), n.clone()),
                Target::Remote(r) => Target::Remote(r.clone()),
            },
            _actor: PhantomData,
        }
    }
}

impl<A: Actor> fmt::Debug for RemoteAddr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Local(e, _) => write!(
                f,
                "RemoteAddr<{}>(local {:?})",
                std::any::type_name::<A>(),
                *e.id.lock().expect("not poisoned")
            ),
            Target::Remote(r) => write!(
                f,
                "RemoteAddr<{}>({}{})",
                std::any::type_name::<A>(),
                r.id,
                if r.dead_reason().is_some() {
                    ", dead"
                } else {
                    ""
                }
            ),
        }
    }
}

impl<A: Actor> RemoteAddr<A> {
    pub(crate) fn local(entry: Arc<ExportEntry<A>>, node: &Arc<NodeShared>) -> Self {
        Self {
            target: Target::Local(entry, Arc::downgrade(node)),
            _actor: PhantomData,
        }
    }

    pub(crate) fn remote(imported: Arc<Imported>) -> Self {
        Self {
            target: Target::Remote(imported),
            _actor: PhantomData,
        }
    }

    pub(crate) fn from_resolved(r: Resolved) -> Result<Self, String> {
        match r {
            Resolved::Remote(i) => Ok(Self::remote(i)),
            Resolved::Dead(id, reason) => Ok(Self::remote(Imported::dead(id, reason))),
            Resolved::Local(exported, node) => {
                let found = exported.actor_type();
                exported
                    .as_any()
                    .downcast::<ExportEntry<A>>()
                    .map(|e| Self {
                        target: Target::Local(e, node),
                        _actor: PhantomData,
                    })
                    .map_err(|_| {
                        format!(
                            "the reference is to a {found}, not a {}",
                            std::any::type_name::<A>()
                        )
                    })
            }
        }
    }

    /// The actor's id, or `None` for a local actor not exported yet (it is
    /// exported when first sent to a peer).
    pub fn id(&self) -> Option<ActorId> {
        match &self.target {
            Target::Local(e, _) => *e.id.lock().expect("not poisoned"),
            Target::Remote(r) => Some(r.id),
        }
    }

    /// Whether the actor lives on this node.
    pub fn is_local(&self) -> bool {
        matches!(self.target, Target::Local(..))
    }

    /// Why the reference is dead, if it is known to be.
    pub fn dead_reason(&self) -> Option<DeadReason> {
        match &self.target {
            Target::Local(e, _) => {
                (!e.with_addr(|a| a.connected())).then_some(DeadReason::ActorStopped)
            }
            Target::Remote(r) => r.dead_reason(),
        }
    }

    /// Sends `msg` and waits for the typed reply. Add
    /// [`Request::timeout`] to bound the wait.
    #[inline]
    pub fn send<M>(&self, msg: M) -> Request<M::Result, Call<A, M>>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        // The local case first and on its own: actix's request is then
        // built where the returned `Request` holds it, not moved there.
        if let Target::Local(entry, _) = &self.target {
            return Request::new(local_call(entry, msg));
        }
        Request::new(self.call(msg))
    }

    /// The future behind [`Self::send`]: a local actor is asked through its
    /// mailbox with no allocation of ours; a remote one through its
    /// connection.
    #[inline]
    fn call<M>(&self, msg: M) -> Call<A, M>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        let inner = match &self.target {
            Target::Local(entry, _) => return local_call(entry, msg),
            Target::Remote(imp) => match imp.connected() {
                // Connected (the usual case): the call goes now, as actix's
                // `Addr::send` queues at once, and the future only waits
                // for the reply: no future of ours to allocate.
                Some(Ok((node, conn))) => start_call(&node, conn, imp, msg),
                Some(Err(e)) => CallInner::Failed { error: Some(e) },
                // A reference handed over by a third node: connect first.
                None => {
                    let imp = imp.clone();
                    CallInner::Remote {
                        fut: Box::pin(async move {
                            let (node, conn) = imp.connection().await?;
                            Call {
                                inner: start_call::<A, M>(&node, conn, &imp, msg),
                            }
                            .await
                        }),
                    }
                }
            },
        };
        Call { inner }
    }

    /// Sends `msg` one way. Errors that can be known at once (dead
    /// reference, full queue, descriptors on a link that cannot carry them)
    /// are returned; delivery itself is not confirmed.
    pub fn do_send<M>(&self, msg: M) -> Result<(), RemoteError>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        match &self.target {
            Target::Local(entry, _) => entry.with_addr(|a| a.try_send(msg)).map_err(|e| match e {
                actix::prelude::SendError::Full(_) => RemoteError::MailboxFull {
                    actor: entry.id.lock().expect("not poisoned").unwrap_or(ActorId {
                        node: courier_runtime::id::NodeId([0; 16]),
                        incarnation: courier_runtime::id::Incarnation(0),
                        local: courier_runtime::id::LocalId::ROOT,
                    }),
                },
                actix::prelude::SendError::Closed(_) => RemoteError::DeadReference {
                    actor: entry.id.lock().expect("not poisoned").unwrap_or(ActorId {
                        node: courier_runtime::id::NodeId([0; 16]),
                        incarnation: courier_runtime::id::Incarnation(0),
                        local: courier_runtime::id::LocalId::ROOT,
                    }),
                    reason: DeadReason::ActorStopped,
                },
            }),
            Target::Remote(imp) => {
                if let Some(r) = imp.dead_reason() {
                    return Err(imp.dead_error(r));
                }
                let conn = imp.conn.lock().expect("not poisoned").clone();
                let Some(conn) = conn else {
                    // Not connected yet (a handed-over reference): connect
                    // in the background, then send.
                    let this = self.clone();
                    actix::spawn(async move {
                        if let Err(e) = this.send(msg).await {
                            tracing::debug!(error = %e, "one-way message not delivered");
                        }
                    });
                    return Ok(());
                };
                if conn.is_closed() {
                    imp.mark_dead(DeadReason::NodeUnreachable);
                    return Err(imp.dead_error(DeadReason::NodeUnreachable));
                }
                let node = imp
                    .node
                    .upgrade()
                    .ok_or(imp.dead_error(DeadReason::NodeUnreachable))?;
                // Straight into the link's buffer when the driver is free
                // and the message plain (no references, descriptors or
                // blobs); otherwise a frame of its own, handed over below.
                match conn.cast_in_place(imp.id, &mut |buf| {
                    encode_cast_in_place(&node, imp.id, M::TYPE.as_str(), conn.0.blobs, &msg, buf)
                })? {
                    InPlace::Sent => return Ok(()),
                    InPlace::Full => return Err(RemoteError::MailboxFull { actor: imp.id }),
                    InPlace::No => {}
                }
                let (frame, fds, hold) =
                    build_frame(&node, &conn, imp.id, M::TYPE.as_str(), 0, &msg)?;
                let cmd = Command::CastFrame {
                    target: imp.id,
                    frame,
                    fds,
                    hold,
                };
                match conn.send_inline(cmd) {
                    Ok(()) => Ok(()),
                    Err(NotInline::Full(_)) => Err(RemoteError::MailboxFull { actor: imp.id }),
                    Err(NotInline::Queue(cmd)) => conn.try_send(cmd, imp.id),
                }
            }
        }
    }
}

/// Encodes `msg` and builds its call (`request` is
/// [`REQUEST_TO_ASSIGN`](courier_runtime::wire::REQUEST_TO_ASSIGN)) or cast
/// (`request` 0) frame for `conn`, counting the references it carries: the
/// payload is written once into warm scratch memory and copied once, into
/// the frame.
/// The frame of a call or cast, its descriptors, and the handles of the
/// references in it (to be held until the frame is written: see
/// `conn::Hold`).
type Built = (bytes::BytesMut, Vec<std::os::fd::OwnedFd>, Vec<OutRef>);

fn build_frame<T: serde::Serialize>(
    node: &NodeShared,
    conn: &ConnHandle,
    target: ActorId,
    type_name: &str,
    request: u64,
    msg: &T,
) -> Result<Built, RemoteError> {
    use courier_runtime::wire::{encode_call_head, CallHeader, BLOB_LEN_SIZE, CALL_HEADER_LEN};
    let room = CALL_HEADER_LEN + type_name.len();
    refctx::encode_with(msg, room, conn.0.blobs, |buf, found| {
        let refctx::Found { refs, fds, blobs } = found;
        if let Err(e) = check_fds(conn, fds.len()) {
            node.discard_out(&refs);
            return Err(e);
        }
        let wire = node.account_out(conn, &refs)?;
        let header = CallHeader {
            request,
            incarnation: target.incarnation,
            target: target.local,
            fds: fds.len() as u8,
        };
        let head_max = room + wire.len() * WIRE_REF_MAX + blobs.len() * BLOB_LEN_SIZE;
        let frame = refctx::into_frame(buf, room, head_max, conn.0.tag_room, &blobs, |out| {
            encode_call_head(out, &header, type_name, &wire, &blobs)
        });
        Ok((frame, fds, refs))
    })
}

/// Encodes a one-way message's envelope and payload into `buf` (see
/// [`ConnHandle::cast_in_place`]); false if it needs a frame of its own.
fn encode_cast_in_place<T: serde::Serialize>(
    node: &NodeShared,
    target: ActorId,
    type_name: &str,
    blobs_ok: bool,
    msg: &T,
    buf: &mut bytes::BytesMut,
) -> Result<bool, RemoteError> {
    use courier_runtime::wire::{encode_call_head, CallHeader};
    let header = CallHeader {
        request: 0,
        incarnation: target.incarnation,
        target: target.local,
        fds: 0,
    };
    refctx::encode_in_place(
        msg,
        buf,
        blobs_ok,
        |refs| node.discard_out(refs),
        |out| encode_call_head(out, &header, type_name, &[], &[]),
    )
}

/// Room reserved for one reference in an envelope's head (its encoding
/// is shorter).
pub(crate) const WIRE_REF_MAX: usize = 64;

fn check_fds(conn: &ConnHandle, n: usize) -> Result<(), RemoteError> {
    if n > 0 && !conn.0.caps.carries_fds {
        return Err(RemoteError::TransportCannot {
            transport: conn.0.scheme.to_owned(),
            what: "carry file descriptors (use unix:// or fd://)".into(),
        });
    }
    if n > conn.0.caps.max_fds_per_frame {
        return Err(RemoteError::LimitReached {
            what: "file descriptors in one message",
            max: conn.0.caps.max_fds_per_frame as u64,
        });
    }
    Ok(())
}

/// A call to an actor on this node: actix's own request, asked of the
/// export's current mailbox.
#[inline(always)]
fn local_call<A, M>(entry: &ExportEntry<A>, msg: M) -> Call<A, M>
where
    A: Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    Call {
        inner: CallInner::Local {
            req: entry.with_addr(|a| a.send(msg)),
        },
    }
}

/// Sends a call to the remote actor `imp` over `conn`: written at once
/// when the caller is on the connection's thread (see
/// [`ConnHandle::send_inline`]), else queued for the connection's driver;
/// only when that queue is full does a boxed future wait for room. Either
/// way what is left is to wait for the reply.
fn start_call<A, M>(
    node: &NodeShared,
    conn: ConnHandle,
    imp: &Arc<Imported>,
    msg: M,
) -> CallInner<A, M>
where
    A: Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    let (frame, fds, hold) = match build_frame(
        node,
        &conn,
        imp.id,
        M::TYPE.as_str(),
        courier_runtime::wire::REQUEST_TO_ASSIGN,
        &msg,
    ) {
        Ok(built) => built,
        Err(e) => return CallInner::Failed { error: Some(e) },
    };
    drop(msg);
    let (tx, rx) = oneshot::channel();
    let cmd = Command::CallFrame {
        target: imp.id,
        type_name: M::TYPE.as_str(),
        frame,
        fds,
        hold,
        reply: tx,
    };
    // Written by this thread, or queued for the connection's; only a full
    // queue leaves sending to the future.
    let queued = match conn.send_inline(cmd) {
        Ok(()) => Ok(()),
        Err(back) => match conn.try_queue(back.into_command()) {
            Ok(queued) => queued,
            Err(e) => return CallInner::Failed { error: Some(e) },
        },
    };
    match queued {
        Ok(()) => CallInner::Waiting {
            rx,
            conn,
            imp: imp.clone(),
        },
        Err(cmd) => {
            let imp = imp.clone();
            CallInner::Remote {
                fut: Box::pin(async move {
                    conn.send(cmd).await?;
                    wait_reply::<M>(rx.await, &conn, &imp)
                }),
            }
        }
    }
}

/// What a call's reply (or the end of its wait) means to the caller.
fn wait_reply<M: RemoteMessage>(
    got: Result<Result<ReplyIn, RemoteError>, oneshot::error::RecvError>,
    conn: &ConnHandle,
    imp: &Imported,
) -> Result<M::Result, RemoteError>
where
    M::Result: RemoteReply,
{
    let reply = got.map_err(|_| conn.lost())??;
    decode_reply::<M::Result>(reply, imp, M::TYPE.as_str())
}

pub(crate) fn decode_reply<R: RemoteReply>(
    reply: ReplyIn,
    imp: &Imported,
    type_name: &str,
) -> Result<R, RemoteError> {
    let text = || courier_runtime::codec::decode::<String>(&reply.payload).unwrap_or_default();
    match reply.status {
        ReplyStatus::Ok => refctx::decode(&reply.payload, reply.refs, reply.fds, reply.blobs),
        ReplyStatus::Failed => Err(RemoteError::Remote(
            courier_runtime::codec::decode(&reply.payload).unwrap_or(RemoteFailure {
                type_name: "unknown".into(),
                message: "the remote handler failed (its failure could not be decoded)".into(),
                backtrace: None,
            }),
        )),
        ReplyStatus::UnknownActor | ReplyStatus::ActorStopped => {
            imp.mark_dead(DeadReason::ActorStopped);
            Err(RemoteError::DeadReference {
                actor: imp.id,
                reason: DeadReason::ActorStopped,
            })
        }
        ReplyStatus::UnknownMessage => Err(RemoteError::UnknownMessage {
            actor: imp.id,
            message_type: type_name.to_owned(),
        }),
        ReplyStatus::MailboxFull => Err(RemoteError::MailboxFull { actor: imp.id }),
        ReplyStatus::BadPayload => Err(RemoteError::Codec {
            op: "decode (on the remote node)",
            type_name: type_name.to_owned(),
            reason: text(),
        }),
        ReplyStatus::TooLarge => Err(RemoteError::Protocol {
            peer: imp.id.node.to_string(),
            reason: format!("the reply was too large: {}", text()),
        }),
        ReplyStatus::Refused => Err(RemoteError::Protocol {
            peer: imp.id.node.to_string(),
            reason: format!("refused: {}", text()),
        }),
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, RemoteError>> + Send>>;

pin_project! {
    /// A request on its way: await it for the reply. As actix's
    /// `Addr::send` queues at once, the message goes when the request is
    /// made, and dropping the request then loses only the reply. Two cases
    /// wait for the first poll instead, as actix's request does when a
    /// mailbox is full: a connection whose command queue is full (the
    /// backpressure point) sends when there is room, and a reference still
    /// to connect (handed over by a third node) once connected. Dropping
    /// such a request unpolled drops its message, and a request made after
    /// it may go first. Made by
    /// [`RemoteAddr::send`] (whose calls to a local actor allocate nothing
    /// of ours) and [`RemoteRecipient::send`] (boxed, as the actor's type
    /// is erased there). The one `RemoteAddr::send` makes is not `Unpin`
    /// (it holds actix's request in place): to poll it by reference, in
    /// `tokio::select!` say, pin it first (`tokio::pin!` or `Box::pin`).
    #[must_use = "a request's reply is lost unless awaited"]
    pub struct Request<R, F = BoxFuture<R>> {
        #[pin]
        fut: F,
        timeout: Option<Duration>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        _reply: PhantomData<fn() -> R>,
    }
}

impl<R, F> Request<R, F> {
    #[inline]
    fn new(fut: F) -> Self {
        Self {
            fut,
            timeout: None,
            sleep: None,
            _reply: PhantomData,
        }
    }

    /// Fails with [`RemoteError::Timeout`] if no reply came within `after`.
    /// The call may still run on the remote node.
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }
}

impl<R, F: Future<Output = Result<R, RemoteError>>> Future for Request<R, F> {
    type Output = Result<R, RemoteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(after) = *this.timeout {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(RemoteError::Timeout { after }));
            }
        }
        Poll::Pending
    }
}

pin_project! {
    /// The future of one [`RemoteAddr::send`]; await it through its
    /// [`Request`].
    pub struct Call<A, M>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        #[pin]
        inner: CallInner<A, M>,
    }
}

pin_project! {
    #[project = CallProj]
    enum CallInner<A, M>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        Local {
            #[pin]
            req: actix::dev::Request<A, M>,
        },
        /// Sent; waiting for the reply.
        Waiting {
            rx: oneshot::Receiver<Result<ReplyIn, RemoteError>>,
            conn: ConnHandle,
            imp: Arc<Imported>,
        },
        /// Failed before anything was sent.
        Failed {
            error: Option<RemoteError>,
        },
        Remote {
            fut: BoxFuture<M::Result>,
        },
    }
}

impl<A, M> Future for Call<A, M>
where
    A: Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    type Output = Result<M::Result, RemoteError>;

    // Inlined into `Request::poll` (a call connecting first also awaits
    // one, which would otherwise keep it out of line: 30 instructions more
    // per local call, callgrind).
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            CallProj::Local { req } => req.poll(cx).map_err(|e| match e {
                // As through a connection: a panic this thread saw is a
                // "panic" failure, any other stop a "stopped" one.
                MailboxError::Closed => {
                    let (type_name, what) = match crate::export::take_last_panic() {
                        Some(_) => ("panic", format!("the handler of {} panicked", M::TYPE)),
                        None => (
                            "stopped",
                            format!("the actor stopped before answering {}", M::TYPE),
                        ),
                    };
                    RemoteError::Remote(RemoteFailure {
                        type_name: type_name.into(),
                        message: format!("{what} (it is restarted if supervised)"),
                        backtrace: None,
                    })
                }
                MailboxError::Timeout => RemoteError::Timeout {
                    after: Duration::ZERO,
                },
            }),
            CallProj::Waiting { rx, conn, imp } => Pin::new(rx)
                .poll(cx)
                .map(|got| wait_reply::<M>(got, conn, imp)),
            CallProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .expect("a call's future polled after it ended"))),
            CallProj::Remote { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<A: Actor> Serialize for RemoteAddr<A> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = match &self.target {
            Target::Local(entry, node) => {
                let node = node
                    .upgrade()
                    .ok_or_else(|| serde::ser::Error::custom("the node has shut down"))?;
                let id = node.ensure_exported(entry);
                OutRef::Local(id)
            }
            Target::Remote(imp) => match imp.dead_reason() {
                Some(_) => OutRef::Dead(imp.id),
                None => OutRef::Imported(imp.clone()),
            },
        };
        let index = refctx::push_ref::<S>(r)?;
        s.serialize_newtype_struct("courier.ref", &index)
    }
}

impl<'de, A: Actor> Deserialize<'de> for RemoteAddr<A> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let index = u32::deserialize(d)?;
        let resolved = refctx::take_ref::<D>(index)?;
        Self::from_resolved(resolved).map_err(D::Error::custom)
    }
}

trait RecipientInner<M: RemoteMessage>: Send + Sync
where
    M::Result: RemoteReply,
{
    fn send(&self, msg: M) -> Request<M::Result>;
    fn do_send(&self, msg: M) -> Result<(), RemoteError>;
    fn id(&self) -> Option<ActorId>;
}

impl<A, M> RecipientInner<M> for RemoteAddr<A>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: RemoteMessage,
    M::Result: RemoteReply,
{
    fn send(&self, msg: M) -> Request<M::Result> {
        Request::new(Box::pin(self.call(msg)))
    }
    fn do_send(&self, msg: M) -> Result<(), RemoteError> {
        RemoteAddr::do_send(self, msg)
    }
    fn id(&self) -> Option<ActorId> {
        RemoteAddr::id(self)
    }
}

/// A reference typed by one message it accepts, whatever the actor (like
/// actix's `Recipient<M>`). Made with [`RemoteAddr::recipient`].
pub struct RemoteRecipient<M: RemoteMessage>
where
    M::Result: RemoteReply,
{
    inner: Arc<dyn RecipientInner<M>>,
}

impl<M: RemoteMessage> Clone for RemoteRecipient<M>
where
    M::Result: RemoteReply,
{
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<M: RemoteMessage> fmt::Debug for RemoteRecipient<M>
where
    M::Result: RemoteReply,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteRecipient<{}>({:?})", M::TYPE, self.inner.id())
    }
}

impl<M: RemoteMessage> RemoteRecipient<M>
where
    M::Result: RemoteReply,
{
    /// Sends `msg` and waits for the reply (see [`RemoteAddr::send`]).
    pub fn send(&self, msg: M) -> Request<M::Result> {
        self.inner.send(msg)
    }

    /// Sends `msg` one way (see [`RemoteAddr::do_send`]).
    pub fn do_send(&self, msg: M) -> Result<(), RemoteError> {
        self.inner.do_send(msg)
    }

    /// The actor's id (see [`RemoteAddr::id`]).
    pub fn id(&self) -> Option<ActorId> {
        self.inner.id()
    }
}

impl<A: Actor> RemoteAddr<A> {
    /// A reference to the same actor, typed only by the message `M`.
    pub fn recipient<M>(&self) -> RemoteRecipient<M>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: RemoteMessage,
        M::Result: RemoteReply,
    {
        RemoteRecipient {
            inner: Arc::new(self.clone()),
        }
    }
}
