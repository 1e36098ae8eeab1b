//! A QUIC connection as a [`Link`]: a unidirectional stream per large frame
//! or per batch of small ones,
//! END / END-ACK for a clean close, and lingering after a drop (see the
//! [`super`] module docs for the protocol).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_runtime::frame::PREFIX_LEN;
use courier_runtime::transport::{BoxFut, Frame, Link, LinkCaps, TransportError};
use quinn::{Connection, ConnectionError, Endpoint, ReadError, RecvStream, VarInt, WriteError};
use tokio::sync::oneshot;

use super::{quic_address, Shared, CHANNEL_BINDING_LABEL};

const KIND_FRAME: u8 = 0;
const KIND_END: u8 = 1;
const KIND_END_ACK: u8 = 2;
/// A small frame with its sequence number among small frames: delivered in
/// that order.
const KIND_SMALL: u8 = 3;
/// Small frames sent together on one stream: the first one's sequence
/// number, then each frame as a 4-byte length and its bytes. Frames handed
/// over between two flushes share a stream, so a burst of small messages
/// does not open a stream each.
const KIND_BATCH: u8 = 4;
/// A batch's frames and their length prefixes, at most.
const BATCH_MAX_BYTES: usize = crate::stream::COALESCE_MAX;
/// Frames in one batch, at most.
const BATCH_MAX_FRAMES: usize = 64;

/// Bytes a batch may hold: never more than one frame's limit (`max`), so
/// the peer reads it whole under the limit it applies to a stream.
fn batch_room(max: usize) -> usize {
    BATCH_MAX_BYTES.min(max)
}
/// Small frames held back while an earlier one is still arriving: at this
/// many, no new stream is accepted. The streams already being read may
/// add up to `recv_concurrency` batches more; a peer that goes past that
/// broke the framing.
const MAX_HELD: usize = 1024;
static FRAME_HEAD: [u8; 1] = [KIND_FRAME];
static END_ACK: [u8; 1] = [KIND_END_ACK];

/// Connection close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_DROPPED: u32 = 1;
const CLOSE_LINGER_TIMEOUT: u32 = 2;
/// Stream stop code: the frame was over our limit.
const STOP_TOO_LARGE: u32 = 1;

/// What one incoming stream held.
enum Incoming {
    Frame(Bytes),
    Small(u64, Bytes),
    Batch(u64, Vec<Bytes>),
    End(u64),
    EndAck,
    /// The connection ended cleanly before the stream was read.
    Nothing,
}

struct SendOp {
    bytes: usize,
    fut: BoxFut<'static, Result<(), TransportError>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendState {
    Open,
    Closing,
    Closed,
    Failed,
}

enum AckState {
    NotSent,
    Sending(BoxFut<'static, Result<(), TransportError>>),
    Sent,
}

/// A QUIC connection carrying frames.
pub(crate) struct QuicLink {
    conn: Connection,
    /// A client's own endpoint, kept as long as the link.
    endpoint: Option<Endpoint>,
    shared: Arc<Shared>,
    peer: String,
    /// The frame limit in force, shared with reads in progress so a
    /// change applies to frames already arriving.
    max_now: Arc<AtomicUsize>,
    ops: Vec<SendOp>,
    /// Fires once the last op queued has opened its stream: the next op
    /// opens its own only then, so streams are numbered in the order
    /// their frames were sent (see [`send_stream`]).
    last_opened: Option<oneshot::Receiver<()>>,
    in_flight: usize,
    frames_sent: u64,
    small_sent: u64,
    /// Small frames not yet on a stream (see [`KIND_BATCH`]).
    batch: BytesMut,
    batch_first: u64,
    batch_count: usize,
    /// Where the frame begun with `begin_frame` starts in `batch` (its
    /// length prefix).
    frame_start: Option<usize>,
    send: SendState,
    accept: Option<BoxFut<'static, Result<RecvStream, ConnectionError>>>,
    reads: Vec<BoxFut<'static, Result<Incoming, TransportError>>>,
    done: VecDeque<Frame>,
    frames_received: u64,
    next_small: u64,
    held: std::collections::BTreeMap<u64, Bytes>,
    peer_end: Option<u64>,
    ack: AckState,
    got_end_ack: bool,
    conn_error: Option<ConnectionError>,
    recv_done: bool,
}

impl fmt::Debug for QuicLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicLink")
            .field("peer", &self.peer)
            .field("max_frame_len", &self.max_now.load(Ordering::Relaxed))
            .field("in_flight", &self.in_flight)
            .field("send", &self.send)
            .field("recv_done", &self.recv_done)
            .finish_non_exhaustive()
    }
}

impl QuicLink {
    pub(crate) fn new(conn: Connection, endpoint: Option<Endpoint>, shared: Arc<Shared>) -> Self {
        let peer = quic_address(conn.remote_address()).to_string();
        let max_now = Arc::new(AtomicUsize::new(shared.cfg.max_frame_len));
        Self {
            conn,
            endpoint,
            shared,
            peer,
            max_now,
            ops: Vec::new(),
            last_opened: None,
            in_flight: 0,
            frames_sent: 0,
            small_sent: 0,
            batch: BytesMut::new(),
            batch_first: 0,
            batch_count: 0,
            frame_start: None,
            send: SendState::Open,
            accept: None,
            reads: Vec::new(),
            done: VecDeque::new(),
            frames_received: 0,
            next_small: 0,
            held: std::collections::BTreeMap::new(),
            peer_end: None,
            ack: AckState::NotSent,
            got_end_ack: false,
            conn_error: None,
            recv_done: false,
        }
    }

    /// Drives queued sends; `Ready(Ok)` once all are handed to quinn.
    fn poll_ops(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let mut i = 0;
        while i < self.ops.len() {
            match self.ops[i].fut.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => {
                    self.in_flight -= self.ops[i].bytes;
                    drop(self.ops.remove(i));
                }
                Poll::Ready(Err(e)) => {
                    self.send = SendState::Failed;
                    self.ops.clear();
                    self.in_flight = 0;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => i += 1,
            }
        }
        if self.ops.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Puts the small frames gathered so far on one stream: a lone frame
    /// as [`KIND_SMALL`], several as [`KIND_BATCH`].
    fn seal_batch(&mut self) {
        if self.batch_count == 0 {
            return;
        }
        let body = self.batch.split().freeze();
        let mut head = BytesMut::with_capacity(9);
        let payload = if self.batch_count == 1 {
            head.extend_from_slice(&[KIND_SMALL]);
            body.slice(4..)
        } else {
            head.extend_from_slice(&[KIND_BATCH]);
            body
        };
        head.extend_from_slice(&self.batch_first.to_be_bytes());
        let bytes = head.len() + payload.len();
        self.push_op(head.freeze(), payload, 1, bytes);
        self.batch_count = 0;
    }

    /// Queues a stream carrying `head` and `body`, opened after the
    /// streams queued before it.
    fn push_op(&mut self, head: Bytes, body: Bytes, priority: i32, bytes: usize) {
        let (opened, next) = oneshot::channel();
        let order = Order {
            after: self.last_opened.replace(next),
            opened: Some(opened),
        };
        let fut = send_stream(
            self.conn.clone(),
            head,
            body,
            priority,
            self.peer.clone(),
            order,
        );
        self.ops.push(SendOp { bytes, fut });
        self.in_flight += bytes;
    }

    /// Seals the batch unless it has room for `need` more bytes and one
    /// more frame. A batch never holds more than one frame's limit (`max`),
    /// so the peer reads it whole under the limit it applies to a stream.
    fn seal_batch_unless_room(&mut self, need: usize, max: usize) {
        if self.batch_count > 0
            && (self.batch.len() + need > batch_room(max) || self.batch_count >= BATCH_MAX_FRAMES)
        {
            self.seal_batch();
        }
    }

    /// Counts a small frame just added to the batch.
    fn note_small(&mut self) {
        if self.batch_count == 0 {
            self.batch_first = self.small_sent;
        }
        self.batch_count += 1;
        self.small_sent += 1;
        self.frames_sent += 1;
    }

    /// Sends a large frame on a stream of its own, after the small frames
    /// before it.
    fn send_large(&mut self, body: Bytes) {
        let len = body.len();
        self.seal_batch();
        self.push_op(Bytes::from_static(&FRAME_HEAD), body, 0, len + 1);
        self.frames_sent += 1;
    }

    fn over_budget(&self) -> bool {
        self.in_flight >= self.shared.cfg.send_budget
            || self.ops.len() >= self.shared.cfg.max_frames_in_flight
    }
}

impl Link for QuicLink {
    fn caps(&self) -> LinkCaps {
        LinkCaps {
            max_frame_len: self.max_now.load(Ordering::Relaxed),
            carries_fds: false,
            max_fds_per_frame: 0,
            multiplexed: true,
            encrypted: true,
            kernel_local: false,
        }
    }

    fn set_max_frame_len(&mut self, max: usize) {
        self.max_now
            .store(max.min(self.shared.cfg.max_frame_len), Ordering::Relaxed);
    }

    fn peer_addr(&self) -> String {
        self.peer.clone()
    }

    fn channel_binding(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        self.conn
            .export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"")
            .ok()?;
        Some(out)
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.send != SendState::Open {
            return Poll::Ready(Err(TransportError::Closed));
        }
        if self.over_budget() {
            if let Poll::Ready(Err(e)) = self.poll_ops(cx) {
                return Poll::Ready(Err(e));
            }
            if self.over_budget() {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(&mut self, frame: Frame) -> Result<(), TransportError> {
        if self.send != SendState::Open {
            return Err(TransportError::Closed);
        }
        if !frame.fds.is_empty() {
            return Err(TransportError::Cannot {
                transport: "quic",
                what: "carry file descriptors",
            });
        }
        let len = frame.payload.len();
        let max = self.max_now.load(Ordering::Relaxed);
        if len > max {
            return Err(TransportError::TooLarge { len, max });
        }
        if len <= crate::stream::COALESCE_MAX {
            let need = PREFIX_LEN + len;
            self.seal_batch_unless_room(need, max);
            self.batch.reserve(need);
            self.batch.extend_from_slice(&(len as u32).to_be_bytes());
            self.batch.extend_from_slice(&frame.payload);
            self.note_small();
            return Ok(());
        }
        self.send_large(frame.payload);
        Ok(())
    }

    fn begin_frame(&mut self) -> bool {
        debug_assert!(self.frame_start.is_none(), "begin_frame twice");
        if self.send != SendState::Open || self.over_budget() {
            return false;
        }
        // A batch with little room left goes out first.
        self.seal_batch_unless_room(
            PREFIX_LEN + crate::stream::IN_PLACE_ROOM,
            self.max_now.load(Ordering::Relaxed),
        );
        self.frame_start = Some(self.batch.len());
        self.batch.extend_from_slice(&[0; PREFIX_LEN]);
        true
    }

    fn frame_buf(&mut self) -> Option<&mut BytesMut> {
        self.frame_start.map(|_| &mut self.batch)
    }

    fn end_frame(&mut self, keep: bool) -> Result<(), TransportError> {
        let Some(start) = self.frame_start.take() else {
            return Err(TransportError::Closed);
        };
        let len = self.batch.len() - start - PREFIX_LEN;
        let max = self.max_now.load(Ordering::Relaxed);
        if !keep || len > max {
            self.batch.truncate(start);
            return if keep {
                Err(TransportError::TooLarge { len, max })
            } else {
                Ok(())
            };
        }
        if len > crate::stream::COALESCE_MAX {
            // Too large for a batch after all: on a stream of its own, as
            // `start_send` sends it, after the small frames before it.
            let body = self.batch.split_off(start + PREFIX_LEN).freeze();
            self.batch.truncate(start);
            self.send_large(body);
            return Ok(());
        }
        if self.batch_count > 0 && start + PREFIX_LEN + len > batch_room(max) {
            // Over the batch's limit: the frames before it go first, and
            // it starts the next batch.
            let this = self.batch.split_off(start);
            self.seal_batch();
            self.batch = this;
        }
        let at = self.batch.len() - len - PREFIX_LEN;
        self.batch[at..at + PREFIX_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        self.note_small();
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.send == SendState::Failed {
            return Poll::Ready(Err(TransportError::Closed));
        }
        self.seal_batch();
        self.poll_ops(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.send {
            SendState::Closed => return Poll::Ready(Ok(())),
            SendState::Failed => return Poll::Ready(Err(TransportError::Closed)),
            SendState::Open => {
                self.seal_batch();
                let mut end = BytesMut::with_capacity(9);
                end.extend_from_slice(&[KIND_END]);
                end.extend_from_slice(&self.frames_sent.to_be_bytes());
                self.push_op(end.freeze(), Bytes::new(), 1, 0);
                self.send = SendState::Closing;
            }
            SendState::Closing => {}
        }
        match self.poll_ops(cx) {
            Poll::Ready(Ok(())) => {
                self.send = SendState::Closed;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        loop {
            if self.recv_done {
                return Poll::Ready(None);
            }
            if let Some(f) = self.done.pop_front() {
                self.frames_received += 1;
                return Poll::Ready(Some(Ok(f)));
            }
            if self.peer_end == Some(self.frames_received) {
                // Everything the peer sent is handed over: tell it, so it
                // may close, then report the end.
                loop {
                    match &mut self.ack {
                        AckState::NotSent => {
                            self.ack = AckState::Sending(send_stream(
                                self.conn.clone(),
                                Bytes::from_static(&END_ACK),
                                Bytes::new(),
                                1,
                                self.peer.clone(),
                                Order::default(),
                            ));
                        }
                        AckState::Sending(fut) => match fut.as_mut().poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(_) => self.ack = AckState::Sent,
                        },
                        AckState::Sent => break,
                    }
                }
                self.recv_done = true;
                return Poll::Ready(None);
            }

            let mut progress = false;
            // While many frames wait for an earlier one, no new stream is
            // taken: the earlier one is among those being read (streams
            // are opened in order), and reading only those bounds what is
            // held. The peer sends the earlier stream's bytes before the
            // later ones' (`send_fairness` is off), so flow control never
            // stops it behind data we are not reading.
            while self.conn_error.is_none()
                && self.reads.len() < self.shared.cfg.recv_concurrency
                && self.held.len() < MAX_HELD
            {
                let conn = &self.conn;
                let fut = self.accept.get_or_insert_with(|| {
                    let c = conn.clone();
                    Box::pin(async move { c.accept_uni().await })
                });
                match fut.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(stream)) => {
                        self.accept = None;
                        let limit = self.max_now.clone();
                        let peer = self.peer.clone();
                        self.reads.push(Box::pin(read_stream(stream, limit, peer)));
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        self.accept = None;
                        self.conn_error = Some(e);
                        progress = true;
                    }
                }
            }

            let mut i = 0;
            while i < self.reads.len() {
                match self.reads[i].as_mut().poll(cx) {
                    Poll::Pending => i += 1,
                    Poll::Ready(res) => {
                        drop(self.reads.remove(i));
                        progress = true;
                        match res {
                            Ok(Incoming::Frame(b)) => self.done.push_back(Frame::new(b)),
                            Ok(Incoming::Small(seq, b)) => {
                                if let Err(e) = self.take_small(seq, b) {
                                    self.fail_recv();
                                    return Poll::Ready(Some(Err(e)));
                                }
                            }
                            Ok(Incoming::Batch(first, frames)) => {
                                for (i, b) in frames.into_iter().enumerate() {
                                    let taken = first
                                        .checked_add(i as u64)
                                        .ok_or_else(|| {
                                            TransportError::Framing(
                                                "a batch's sequence numbers overflow".into(),
                                            )
                                        })
                                        .and_then(|seq| self.take_small(seq, b));
                                    if let Err(e) = taken {
                                        self.fail_recv();
                                        return Poll::Ready(Some(Err(e)));
                                    }
                                }
                            }
                            Ok(Incoming::End(n)) => {
                                if self.peer_end.is_some() || n < self.frames_received {
                                    self.fail_recv();
                                    return Poll::Ready(Some(Err(TransportError::Framing(
                                        "the peer announced its end twice or miscounted".into(),
                                    ))));
                                }
                                self.peer_end = Some(n);
                            }
                            Ok(Incoming::EndAck) => self.got_end_ack = true,
                            Ok(Incoming::Nothing) => {}
                            Err(e) => {
                                self.fail_recv();
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                }
            }
            if progress {
                continue;
            }
            if let Some(e) = &self.conn_error {
                if self.reads.is_empty() {
                    let res = conn_error(e, &self.peer);
                    self.fail_recv();
                    return Poll::Ready(res.map(Err));
                }
            }
            return Poll::Pending;
        }
    }
}

impl QuicLink {
    /// Delivers small frames in the order they were sent, holding back
    /// those that overtook an earlier one.
    fn take_small(&mut self, seq: u64, body: Bytes) -> Result<(), TransportError> {
        let cap = MAX_HELD + self.shared.cfg.recv_concurrency * BATCH_MAX_FRAMES;
        take_in_order(
            &mut self.next_small,
            &mut self.held,
            cap,
            seq,
            body,
            &mut self.done,
        )
    }

    fn fail_recv(&mut self) {
        self.recv_done = true;
        self.reads.clear();
        self.done.clear();
        self.held.clear();
        self.accept = None;
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        if self.conn.close_reason().is_some() {
            return;
        }
        let end_sent = matches!(self.send, SendState::Closing | SendState::Closed);
        if !end_sent {
            self.conn
                .close(VarInt::from_u32(CLOSE_DROPPED), b"link dropped");
            return;
        }
        if self.got_end_ack {
            self.conn.close(VarInt::from_u32(CLOSE_DONE), b"");
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.conn.close(VarInt::from_u32(CLOSE_DONE), b"");
            return;
        };
        let answer_end = self.peer_end.is_some() && !matches!(self.ack, AckState::Sent);
        let job = Linger {
            conn: self.conn.clone(),
            endpoint: self.endpoint.take(),
            ops: std::mem::take(&mut self.ops),
            reads: std::mem::take(&mut self.reads),
            answer_end,
            peer: self.peer.clone(),
            limit: self.shared.cfg.linger,
        };
        rt.spawn(job.run());
    }
}

/// What a closed link does after it is dropped: finish sending, then wait
/// until the peer has taken every frame (END-ACK) or closes, within a limit.
struct Linger {
    conn: Connection,
    endpoint: Option<Endpoint>,
    ops: Vec<SendOp>,
    reads: Vec<BoxFut<'static, Result<Incoming, TransportError>>>,
    answer_end: bool,
    peer: String,
    limit: Duration,
}

impl Linger {
    async fn run(self) {
        let Linger {
            conn,
            endpoint,
            ops,
            reads,
            answer_end,
            peer,
            limit,
        } = self;
        for op in ops {
            tokio::spawn(async move {
                let _ = op.fut.await;
            });
        }
        let ack = |conn: &Connection| {
            let f = send_stream(
                conn.clone(),
                Bytes::from_static(&END_ACK),
                Bytes::new(),
                1,
                peer.clone(),
                Order::default(),
            );
            tokio::spawn(async move {
                let _ = f.await;
            });
        };
        if answer_end {
            ack(&conn);
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Incoming>(8);
        let watch = |fut: BoxFut<'static, Result<Incoming, TransportError>>| {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(i) = fut.await {
                    let _ = tx.send(i).await;
                }
            });
        };
        for r in reads {
            watch(r);
        }
        let waited = tokio::time::timeout(limit, async {
            loop {
                tokio::select! {
                    _ = conn.closed() => return,
                    s = conn.accept_uni() => match s {
                        // Frames are no longer wanted: read only what marks the end.
                        Ok(s) => watch(Box::pin(read_stream(
                            s,
                            Arc::new(AtomicUsize::new(16)),
                            peer.clone(),
                        ))),
                        Err(_) => return,
                    },
                    Some(i) = rx.recv() => match i {
                        Incoming::End(_) => ack(&conn),
                        Incoming::EndAck => return,
                        Incoming::Frame(_) | Incoming::Small(..) | Incoming::Batch(..) | Incoming::Nothing => {}
                    },
                }
            }
        })
        .await;
        let code = if waited.is_ok() {
            CLOSE_DONE
        } else {
            CLOSE_LINGER_TIMEOUT
        };
        conn.close(VarInt::from_u32(code), b"");
        drop(endpoint);
    }
}

/// Puts small frame `seq` in `out` if it is the next one (then any held
/// ones that follow it), else holds it back; duplicates and more than
/// `cap` held frames are the peer's framing errors.
fn take_in_order(
    next: &mut u64,
    held: &mut std::collections::BTreeMap<u64, Bytes>,
    cap: usize,
    seq: u64,
    body: Bytes,
    out: &mut VecDeque<Frame>,
) -> Result<(), TransportError> {
    if seq < *next || held.contains_key(&seq) {
        return Err(TransportError::Framing(format!(
            "the peer sent small frame {seq} twice"
        )));
    }
    if seq > *next {
        if held.len() >= cap {
            return Err(TransportError::Framing(format!(
                "more than {cap} frames arrived ahead of frame {next}"
            )));
        }
        held.insert(seq, body);
        return Ok(());
    }
    out.push_back(Frame::new(body));
    *next += 1;
    while let Some(b) = held.remove(next) {
        out.push_back(Frame::new(b));
        *next += 1;
    }
    Ok(())
}

/// Where a stream's opening falls among a link's streams.
#[derive(Default)]
struct Order {
    /// Fires when the stream queued before this one is open.
    after: Option<oneshot::Receiver<()>>,
    /// Fired once this one is open.
    opened: Option<oneshot::Sender<()>>,
}

/// Opens a stream, writes `head` and `body` on it and finishes it. A
/// control stream (END, END-ACK) to a peer that has already closed the
/// connection cleanly has nothing left to say: that counts as sent.
///
/// Streams are opened in `order`: the peer accepts streams in the order
/// of their ids and reads a few at a time, so a batch opened after later
/// ones would leave it holding every frame that overtook it.
fn send_stream(
    conn: Connection,
    head: Bytes,
    body: Bytes,
    priority: i32,
    peer: String,
    order: Order,
) -> BoxFut<'static, Result<(), TransportError>> {
    let control = head.first() != Some(&KIND_FRAME);
    Box::pin(async move {
        let res = async {
            if let Some(after) = order.after {
                // An error means the stream before failed, which fails
                // the link: nothing to wait for.
                let _ = after.await;
            }
            let opened = conn.open_uni().await;
            if let Some(tx) = order.opened {
                let _ = tx.send(());
            }
            let mut s = opened.map_err(WriteError::ConnectionLost)?;
            if priority != 0 {
                let _ = s.set_priority(priority);
            }
            let mut chunks = [head, body];
            s.write_all_chunks(&mut chunks).await?;
            s.finish().map_err(|_| WriteError::ClosedStream)?;
            Ok::<(), WriteError>(())
        }
        .await;
        match res {
            Ok(()) => Ok(()),
            Err(WriteError::ConnectionLost(e)) if control && conn_error(&e, &peer).is_none() => {
                Ok(())
            }
            Err(e) => Err(write_error(e, &peer)),
        }
    })
}

/// Reads one stream to its end, refusing more payload bytes than the limit
/// in force as they arrive.
async fn read_stream(
    mut s: RecvStream,
    max: Arc<AtomicUsize>,
    peer: String,
) -> Result<Incoming, TransportError> {
    let mut parts: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        match s.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                total += chunk.bytes.len();
                let max = max.load(Ordering::Relaxed);
                // The kind byte and a sequence number, and room for END's
                // count whatever the limit.
                if total > max.saturating_add(9) {
                    let _ = s.stop(VarInt::from_u32(STOP_TOO_LARGE));
                    return Err(TransportError::TooLarge {
                        len: total - 1,
                        max,
                    });
                }
                if !chunk.bytes.is_empty() {
                    parts.push(chunk.bytes);
                }
            }
            Ok(None) => break,
            Err(ReadError::ConnectionLost(e)) => {
                return match conn_error(&e, &peer) {
                    None => Ok(Incoming::Nothing),
                    Some(err) => Err(err),
                }
            }
            Err(ReadError::Reset(code)) => {
                return Err(TransportError::Framing(format!(
                    "the peer abandoned a frame midway (stream reset with code {code})"
                )))
            }
            Err(e) => return Err(TransportError::Framing(e.to_string())),
        }
    }
    let body = if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        let mut b = BytesMut::with_capacity(total);
        for p in &parts {
            b.extend_from_slice(p);
        }
        b.freeze()
    };
    match body.first().copied() {
        None => Err(TransportError::Framing(
            "the peer sent an empty stream".into(),
        )),
        Some(KIND_FRAME) => Ok(Incoming::Frame(body.slice(1..))),
        Some(KIND_SMALL) if body.len() >= 9 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&body[1..9]);
            Ok(Incoming::Small(u64::from_be_bytes(n), body.slice(9..)))
        }
        Some(KIND_BATCH) if body.len() >= 9 => parse_batch(&body),
        Some(KIND_END) if body.len() == 9 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&body[1..9]);
            Ok(Incoming::End(u64::from_be_bytes(n)))
        }
        Some(KIND_END_ACK) if body.len() == 1 => Ok(Incoming::EndAck),
        Some(k) => Err(TransportError::Framing(format!(
            "the peer sent a stream of unknown kind {k} or length {}",
            body.len()
        ))),
    }
}

/// Splits a [`KIND_BATCH`] stream into its frames. At least two, each
/// whole: anything else is the peer's framing error.
fn parse_batch(body: &Bytes) -> Result<Incoming, TransportError> {
    let bad = |what: &str| TransportError::Framing(format!("a batch of small frames {what}"));
    let mut n = [0u8; 8];
    n.copy_from_slice(&body[1..9]);
    let first = u64::from_be_bytes(n);
    let mut frames = Vec::new();
    let mut at = 9;
    while at < body.len() {
        if frames.len() == BATCH_MAX_FRAMES {
            return Err(bad("holds too many frames"));
        }
        let Some(prefix) = body.get(at..at + PREFIX_LEN) else {
            return Err(bad("ends inside a length"));
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        at += PREFIX_LEN;
        if len > body.len() - at {
            return Err(bad("ends inside a frame"));
        }
        frames.push(body.slice(at..at + len));
        at += len;
    }
    if frames.len() < 2 {
        return Err(bad("holds fewer than two frames"));
    }
    Ok(Incoming::Batch(first, frames))
}

/// What a lost connection means to the caller: `None` for a clean end.
pub(crate) fn conn_error(e: &ConnectionError, peer: &str) -> Option<TransportError> {
    let io = |kind: io::ErrorKind, msg: String| {
        Some(TransportError::io(
            format!("talk to {peer}"),
            io::Error::new(kind, msg),
        ))
    };
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_DONE) => {
            None
        }
        ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let why = match u32::try_from(code) {
                Ok(CLOSE_DROPPED) => "the peer dropped the link without closing it".to_owned(),
                Ok(CLOSE_LINGER_TIMEOUT) => {
                    "the peer gave up waiting for us to read its last frames".to_owned()
                }
                _ => format!("the peer closed the connection with code {code}"),
            };
            io(io::ErrorKind::ConnectionReset, why)
        }
        ConnectionError::LocallyClosed => Some(TransportError::Closed),
        ConnectionError::TimedOut => io(
            io::ErrorKind::TimedOut,
            "the peer stopped answering (QUIC idle timeout)".into(),
        ),
        ConnectionError::Reset => io(
            io::ErrorKind::ConnectionReset,
            "the peer reset the connection".into(),
        ),
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => Some(
            TransportError::Tls(format!("the peer refused the TLS session: {c}")),
        ),
        ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
            Some(TransportError::Tls(t.to_string()))
        }
        other => io(io::ErrorKind::ConnectionAborted, other.to_string()),
    }
}

fn is_crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

fn write_error(e: WriteError, peer: &str) -> TransportError {
    match e {
        WriteError::ConnectionLost(c) => conn_error(&c, peer).unwrap_or(TransportError::Closed),
        WriteError::ClosedStream => TransportError::Closed,
        WriteError::Stopped(code) if code == VarInt::from_u32(STOP_TOO_LARGE) => {
            TransportError::Framing("the peer refused a frame as too large".into())
        }
        WriteError::Stopped(code) => TransportError::io(
            format!("send to {peer}"),
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("the peer stopped a stream (code {code})"),
            ),
        ),
        other => TransportError::io(
            format!("send to {peer}"),
            io::Error::other(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn batch(first: u64, frames: &[&[u8]]) -> Bytes {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[KIND_BATCH]);
        b.extend_from_slice(&first.to_be_bytes());
        for f in frames {
            b.extend_from_slice(&(f.len() as u32).to_be_bytes());
            b.extend_from_slice(f);
        }
        b.freeze()
    }

    #[test]
    fn batches_split_into_their_frames_and_refuse_anything_else() {
        let Ok(Incoming::Batch(7, frames)) = parse_batch(&batch(7, &[b"ab", b"", b"cde"])) else {
            panic!("a good batch is refused");
        };
        assert_eq!(frames, vec![&b"ab"[..], &b""[..], &b"cde"[..]]);

        let refused = |body: Bytes, what: &str| match parse_batch(&body) {
            Err(TransportError::Framing(m)) => assert!(m.contains(what), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted a batch that {what}"),
        };
        refused(batch(0, &[b"only"]), "fewer than two");
        refused(batch(0, &[]), "fewer than two");
        let whole = batch(0, &[b"ab", b"cd"]);
        refused(whole.slice(..whole.len() - 1), "ends inside a frame");
        let mut cut = BytesMut::from(&batch(0, &[b"ab", b"cd"])[..]);
        cut.extend_from_slice(&[0, 0]);
        refused(cut.freeze(), "ends inside a length");
        let many: Vec<&[u8]> = vec![b"x"; BATCH_MAX_FRAMES + 1];
        refused(batch(0, &many), "too many");
    }

    #[test]
    fn small_frames_are_put_back_in_order() {
        // Every rotation and a reversal of 0..50, arriving in that order.
        let mut orders: Vec<Vec<u64>> = (0..50)
            .map(|r| (0..50u64).map(|i| (i + r) % 50).collect())
            .collect();
        orders.push((0..50u64).rev().collect());
        for order in orders {
            let (mut next, mut held, mut out) = (0, BTreeMap::new(), VecDeque::new());
            for seq in &order {
                take_in_order(
                    &mut next,
                    &mut held,
                    MAX_HELD,
                    *seq,
                    Bytes::from(seq.to_be_bytes().to_vec()),
                    &mut out,
                )
                .unwrap();
            }
            let got: Vec<u64> = out
                .iter()
                .map(|f| u64::from_be_bytes(f.payload[..].try_into().unwrap()))
                .collect();
            assert_eq!(got, (0..50).collect::<Vec<_>>(), "arrival order {order:?}");
            assert!(held.is_empty());
        }
    }

    /// A batch whose bytes come after those of many later batches (as a
    /// sender scheduling streams round-robin can make happen): the
    /// receiver stops taking new streams while it holds many frames,
    /// rather than failing, and delivers everything in order once the
    /// late batch is in.
    #[tokio::test]
    async fn frames_behind_a_late_batch_wait_instead_of_failing_the_link() {
        use crate::quic::{Identity, PeerTrust, QuicConfig, QuicTransport};
        use crate::util::LinkExt;
        const BATCHES: u64 = 40;
        const PER: u64 = BATCH_MAX_FRAMES as u64;
        let id = Identity::generate("courier-test").unwrap();
        let cfg = QuicConfig::new(id.clone(), PeerTrust::pinned([id.fingerprint()]));
        let t = QuicTransport::new(cfg).unwrap();
        let server =
            Endpoint::server(t.shared.server.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(t.shared.client.clone());
        let connecting = client.connect(addr, "courier-test").unwrap();
        let (sc, cc) = tokio::join!(
            async { server.accept().await.unwrap().await.unwrap() },
            async { connecting.await.unwrap() }
        );
        let mut link = QuicLink::new(sc, None, t.shared.clone());
        let frame = |seq: u64| seq.to_be_bytes();
        let body = |b: u64| {
            let frames: Vec<[u8; 8]> = (b * PER..(b + 1) * PER).map(frame).collect();
            let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
            batch(b * PER, &refs)
        };
        let sender = async {
            // Batch 0's stream is opened first, so it has the lowest id,
            // but only its first byte goes out before all the others.
            let mut late = cc.open_uni().await.unwrap();
            let b0 = body(0);
            late.write_all(&b0[..1]).await.unwrap();
            for b in 1..BATCHES {
                let mut s = cc.open_uni().await.unwrap();
                s.write_all(&body(b)).await.unwrap();
                s.finish().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            late.write_all(&b0[1..]).await.unwrap();
            late.finish().unwrap();
            // Kept open until the receiver is done.
            std::future::pending::<()>().await;
        };
        let receiver = async {
            for seq in 0..BATCHES * PER {
                let f = tokio::time::timeout(Duration::from_secs(60), link.recv())
                    .await
                    .expect("frames arrive")
                    .expect("the link stays open")
                    .unwrap_or_else(|e| panic!("frame {seq}: {e}"));
                assert_eq!(f.payload[..], frame(seq), "frame {seq} out of order");
                assert!(link.held.len() <= MAX_HELD + 8 * BATCH_MAX_FRAMES);
            }
        };
        tokio::select! {
            () = receiver => {}
            () = sender => unreachable!(),
        }
    }

    #[test]
    fn duplicates_and_floods_are_framing_errors() {
        let (mut next, mut held, mut out) = (0, BTreeMap::new(), VecDeque::new());
        take_in_order(&mut next, &mut held, MAX_HELD, 0, Bytes::new(), &mut out).unwrap();
        assert!(take_in_order(&mut next, &mut held, MAX_HELD, 0, Bytes::new(), &mut out).is_err());
        take_in_order(&mut next, &mut held, MAX_HELD, 5, Bytes::new(), &mut out).unwrap();
        assert!(take_in_order(&mut next, &mut held, MAX_HELD, 5, Bytes::new(), &mut out).is_err());
        let (mut next, mut held, mut out) = (0, BTreeMap::new(), VecDeque::new());
        for seq in 1..=MAX_HELD as u64 {
            take_in_order(&mut next, &mut held, MAX_HELD, seq, Bytes::new(), &mut out).unwrap();
        }
        assert!(take_in_order(
            &mut next,
            &mut held,
            MAX_HELD,
            10_000,
            Bytes::new(),
            &mut out
        )
        .is_err());
        assert!(out.is_empty());
    }
}
