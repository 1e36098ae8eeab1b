//! The framed-stream link shared by TCP, Unix and fd links.
//!
//! The stream link turns a byte stream into a [`Link`]: reads go through
//! runtime's [`FrameDecoder`], writes are queued and sent in batches.
//!
//! # Wire format
//!
//! On a stream that cannot carry descriptors (TCP) a frame is runtime's
//! length-prefixed frame: a 4-byte big-endian body length, then the body.
//!
//! On a stream that can (Unix-domain stream sockets, whether reached by
//! `unix://` or `fd://`), the length-prefixed body starts with one byte
//! holding the number of descriptors travelling with the frame (0 to
//! [`MAX_FDS_PER_FRAME`]), followed by the payload:
//!
//! ```text
//! +----------------+---------+----------------------+
//! | len: u32 BE    | nfds: u8| payload (len-1 bytes)|
//! +----------------+---------+----------------------+
//!   ^ the sendmsg that carries this byte carries the frame's descriptors
//! ```
//!
//! The descriptors of one frame travel in one `SCM_RIGHTS` message attached
//! to the `sendmsg` call whose data begins with that frame's first byte, and a
//! `sendmsg` carries the descriptors of at most one frame. Linux hands the
//! descriptors of one `sendmsg` to the `recvmsg` that reads its first byte and
//! ends that `recvmsg` there, so the receiver knows the stream range each
//! batch of descriptors arrived with. A frame announcing `n > 0` descriptors
//! claims the oldest unclaimed batch; the batch must hold exactly `n`
//! descriptors and must have arrived with the frame's first byte. Any
//! mismatch (descriptors no frame claims, a count that does not match) is a
//! framing error that ends the link, and every descriptor held is closed.
//!
//! # Batching and backpressure
//!
//! `start_send` only appends to a queue: payloads up to [`COALESCE_MAX`]
//! bytes are copied into a shared buffer, larger ones are queued as they are
//! (no copy) and written with vectored I/O; `begin_frame` lets the caller
//! build a small frame in that shared buffer itself (no copy at all).
//! `poll_flush` then writes many frames per system call. `poll_ready` is
//! `Pending` while the queue holds more than [`StreamConfig::send_budget`]
//! bytes and the socket will not take more (`begin_frame` is false as soon
//! as the queue holds the budget, without trying the socket), so a peer
//! that does not read costs at most the budget plus one frame.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_runtime::frame::{self, FrameDecoder, FrameError, DEFAULT_MAX_FRAME, PREFIX_LEN};
use courier_runtime::transport::{Frame, Link, LinkCaps, TransportError};
use tokio::io::{AsyncRead, AsyncWrite};

/// Most descriptors one frame may carry on a descriptor-carrying link.
pub const MAX_FDS_PER_FRAME: usize = 64;

/// Payloads up to this many bytes are copied into the coalescing buffer;
/// larger ones are written from their own buffer with vectored I/O.
pub const COALESCE_MAX: usize = 8 * 1024;

/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Bytes of unclaimed descriptors' batches a receiver tolerates: an honest
/// sender never has more than two frames' worth in flight at a reader.
const MAX_PENDING_FDS: usize = 2 * MAX_FDS_PER_FRAME;

/// Settings shared by the stream transports (TCP, Unix, fd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// The largest frame body a link accepts or sends; `set_max_frame_len`
    /// may lower it and raise it back, never above this. Links start at this
    /// limit: lower it to runtime's `HANDSHAKE_MAX_FRAME` before the first
    /// `poll_recv` on an unauthenticated link.
    pub max_frame_len: usize,
    /// Queued bytes above which `poll_ready` waits for the socket to drain.
    pub send_budget: usize,
    /// Bytes asked of the socket per read when no large frame is pending.
    pub read_chunk: usize,
    /// How long `connect` may take before it fails with `TimedOut`.
    pub connect_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME,
            send_budget: 256 * 1024,
            read_chunk: 32 * 1024,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A byte stream a [`StreamLink`] can run over.
pub(crate) trait RawStream: Send + Unpin + fmt::Debug + 'static {
    /// Whether descriptors can travel (and so whether frames carry the
    /// descriptor-count byte).
    fn carries_fds(&self) -> bool;

    /// The scheme reported in errors, such as `"tcp"`.
    fn scheme(&self) -> &'static str;

    /// Reads at most `want` bytes, appending them to `buf` and any
    /// descriptors received with them to `fds`. `Ok(0)` is the end of stream.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<Result<usize, TransportError>>;

    /// Reads at most `want` bytes known to carry no descriptors: the rest
    /// of a frame whose first byte (which brings the frame's descriptors)
    /// has arrived. A descriptor-carrying stream reads these straight into
    /// `buf`'s spare room, without ancillary data.
    fn poll_read_body(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<Result<usize, TransportError>> {
        let mut none = Vec::new();
        self.poll_read_some(cx, buf, want, &mut none)
    }

    /// Writes some of `bufs`, sending `fds` with the first byte.
    fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>>;

    /// Shuts the sending direction down so the peer reads end of stream.
    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A [`RawStream`] over any tokio stream, carrying no descriptors (TCP).
#[derive(Debug)]
pub(crate) struct PlainStream<S> {
    io: S,
    scheme: &'static str,
    /// See [`crate::fdlink::FdStream`]: released after `io` is closed.
    _adopted: Option<crate::sys::AdoptGuard>,
}

impl<S> PlainStream<S> {
    pub(crate) fn new(
        io: S,
        scheme: &'static str,
        adopted: Option<crate::sys::AdoptGuard>,
    ) -> Self {
        Self {
            io,
            scheme,
            _adopted: adopted,
        }
    }
}

impl<S> RawStream for PlainStream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug + 'static,
{
    fn carries_fds(&self) -> bool {
        false
    }

    fn scheme(&self) -> &'static str {
        self.scheme
    }

    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
        _fds: &mut Vec<OwnedFd>,
    ) -> Poll<Result<usize, TransportError>> {
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf)
            .map_err(|e| TransportError::io(format!("receive on {}", self.scheme), e))
    }

    fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        debug_assert!(fds.is_empty(), "descriptors are refused in start_send");
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The smallest read between frames (see `StreamLink::read_size`).
const READ_SMALL: usize = 4096;

/// A link carrying frames over a byte stream.
pub(crate) struct StreamLink<S> {
    io: S,
    peer: String,
    kernel_local: bool,
    max_configured: usize,
    max_now: usize,
    send_budget: usize,
    read_chunk: usize,
    /// What the next read between frames asks for: starts small, doubles
    /// (up to `read_chunk`) while reads come back full, and falls back
    /// once one comes back short.
    read_size: usize,
    decoder: FrameDecoder,
    rbuf: BytesMut,
    /// Stream offset of `rbuf[0]`.
    consumed: u64,
    /// Stream offset just past the last byte read.
    received: u64,
    inbox: FdInbox,
    read_state: ReadState,
    outbox: Outbox,
    write_state: WriteState,
    /// Where the frame begun with `begin_frame` starts in the outbox's
    /// tail (its length prefix).
    frame_start: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    Open,
    Eof,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteState {
    Open,
    ShuttingDown,
    Closed,
    Failed,
}

impl<S: RawStream> StreamLink<S> {
    /// Wraps a connected stream.
    pub(crate) fn new(io: S, peer: String, kernel_local: bool, cfg: &StreamConfig) -> Self {
        let max = cfg.max_frame_len.min(frame::ABSOLUTE_MAX_FRAME - 1);
        let header = usize::from(io.carries_fds());
        Self {
            io,
            peer,
            kernel_local,
            max_configured: max,
            max_now: max,
            send_budget: cfg.send_budget.max(1),
            read_chunk: cfg.read_chunk.max(1024),
            read_size: READ_SMALL.min(cfg.read_chunk.max(1024)),
            decoder: FrameDecoder::new(max + header),
            rbuf: BytesMut::new(),
            consumed: 0,
            received: 0,
            inbox: FdInbox::default(),
            read_state: ReadState::Open,
            outbox: Outbox::default(),
            write_state: WriteState::Open,
            frame_start: None,
        }
    }

    fn header_len(&self) -> usize {
        usize::from(self.io.carries_fds())
    }

    /// The length prefix of a frame whose payload is `len` bytes, or
    /// `TooLarge`.
    fn prefix(&self, len: usize) -> Result<[u8; PREFIX_LEN], TransportError> {
        let (header, max) = (self.header_len(), self.max_now);
        frame::encode_prefix(len + header, max + header)
            .map_err(|_| TransportError::TooLarge { len, max })
    }

    fn op(&self, what: &str) -> String {
        format!("{what} {}", self.peer)
    }

    /// Writes queued bytes until the queue is empty or the socket is full.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.write_state {
            WriteState::Open | WriteState::ShuttingDown => {}
            WriteState::Closed => {
                return if self.outbox.queued == 0 {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(TransportError::Closed))
                }
            }
            WriteState::Failed => return Poll::Ready(Err(TransportError::Closed)),
        }
        // The usual case: small frames coalesced in `tail`, nothing queued
        // before them. They are written from `tail` itself, which, once
        // all is taken, is emptied and reused from where it starts: no
        // chunk is cut from it and dropped again (about 230 instructions
        // less per small frame sent).
        if self.outbox.chunks.is_empty() && !self.outbox.tail.is_empty() {
            let res = ready!(self
                .io
                .poll_write_some(cx, &[IoSlice::new(&self.outbox.tail)], &[]));
            match res {
                Ok(n) if n == self.outbox.tail.len() => {
                    self.outbox.queued -= n;
                    self.outbox.tail.clear();
                    return Poll::Ready(Ok(()));
                }
                // Part taken: the rest is queued as a chunk, below.
                Ok(n) if n > 0 => {
                    self.outbox.seal();
                    self.outbox.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return Poll::Ready(Err(self.write_failed(other))),
            }
        }
        self.outbox.seal();
        while !self.outbox.chunks.is_empty() {
            // One chunk is the common case (small frames coalesce into
            // one): no array of empty slices to fill first.
            let single;
            let mut many;
            let slices: &[IoSlice<'_>] = if self.outbox.chunks.len() == 1 {
                single = [IoSlice::new(&self.outbox.chunks[0].data)];
                &single
            } else {
                many = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (i, chunk) in self.outbox.chunks.iter().enumerate() {
                    if count == MAX_IOVECS || (i > 0 && !chunk.fds.is_empty()) {
                        break;
                    }
                    many[count] = IoSlice::new(&chunk.data);
                    count += 1;
                }
                &many[..count]
            };
            let first_fds: Vec<BorrowedFd<'_>> = self.outbox.chunks[0]
                .fds
                .iter()
                .map(|f| f.as_fd())
                .collect();
            let res = ready!(self.io.poll_write_some(cx, slices, &first_fds));
            drop(first_fds);
            match res {
                Ok(n) if n > 0 => self.outbox.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return Poll::Ready(Err(self.write_failed(other))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write that took no bytes (`Ok(0)`) or failed: the link can send
    /// no more, and what was queued is dropped.
    fn write_failed(&mut self, res: io::Result<usize>) -> TransportError {
        self.write_state = WriteState::Failed;
        self.outbox.clear();
        let e = match res {
            Err(e) => e,
            Ok(_) => io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes"),
        };
        TransportError::io(self.op("send to"), e)
    }

    /// How much to ask the next read for. Enough for the rest of a frame
    /// already begun (so large frames take few reads), else `read_size`:
    /// small while traffic is light, so an idle connection's buffer stays
    /// small, and growing while messages stream in.
    /// `rest` is [`Self::frame_rest`].
    fn read_want(&self, rest: Option<usize>) -> usize {
        match rest {
            // A small rest comes with the start of what follows; a large
            // one is read on its own, so the buffer sized for this frame
            // need not grow (and copy) at its very end.
            Some(rest) if rest < READ_SMALL => rest + self.read_size,
            Some(rest) => rest.min(self.read_chunk.max(READ_SMALL) * 8),
            None => self.read_size,
        }
    }

    /// How many bytes of the frame being read are still to come, once its
    /// length prefix is in.
    fn frame_rest(&self) -> Option<usize> {
        let have = self.rbuf.len();
        if have < PREFIX_LEN {
            return None;
        }
        let len =
            u32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]) as usize;
        (PREFIX_LEN + len).checked_sub(have).filter(|&n| n > 0)
    }

    /// Makes room for the rest of the frame being read (`rest` bytes) in
    /// one allocation, rather than growing (and copying) the buffer read by
    /// read. The length was checked against the maximum when its prefix
    /// arrived; the room taken ahead of the data is capped so an announced
    /// frame that never comes cannot pin much memory.
    fn reserve_for_frame(&mut self, rest: usize) {
        const AHEAD_MAX: usize = 8 << 20;
        let need = rest.min(AHEAD_MAX);
        if self.rbuf.capacity() - self.rbuf.len() < need {
            self.rbuf.reserve(need);
        }
    }

    /// Takes the next frame out of the read buffer, if a whole one is there.
    fn try_decode(&mut self) -> Result<Option<Frame>, TransportError> {
        let before = self.rbuf.len();
        let start = self.consumed;
        let body = match self.decoder.decode(&mut self.rbuf) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(FrameError::TooLarge { len, max }) => {
                let h = self.header_len();
                return Err(TransportError::TooLarge {
                    len: len.saturating_sub(h),
                    max: max.saturating_sub(h),
                });
            }
        };
        self.consumed += (before - self.rbuf.len()) as u64;
        if !self.io.carries_fds() {
            self.inbox.check_unclaimed(start)?;
            return Ok(Some(Frame::new(body)));
        }
        let Some(&count) = body.first() else {
            return Err(TransportError::Framing(
                "a frame on a descriptor-carrying link lacks its descriptor count".into(),
            ));
        };
        let count = usize::from(count);
        if count > MAX_FDS_PER_FRAME {
            return Err(TransportError::Framing(format!(
                "a frame announces {count} descriptors, over the limit of {MAX_FDS_PER_FRAME}"
            )));
        }
        let fds = self.inbox.claim(start, count)?;
        Ok(Some(Frame {
            payload: body.slice(1..),
            fds,
        }))
    }

    fn finish_reading(&mut self) {
        self.read_state = ReadState::Done;
        self.inbox.batches.clear();
        self.rbuf = BytesMut::new();
    }
}

impl<S: RawStream> fmt::Debug for StreamLink<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamLink")
            .field("peer", &self.peer)
            .field("max_frame_len", &self.max_now)
            .field("queued", &self.outbox.queued)
            .field("read_state", &self.read_state)
            .field("write_state", &self.write_state)
            .finish_non_exhaustive()
    }
}

impl<S: RawStream> Link for StreamLink<S> {
    fn caps(&self) -> LinkCaps {
        let fds = self.io.carries_fds();
        LinkCaps {
            max_frame_len: self.max_now,
            carries_fds: fds,
            max_fds_per_frame: if fds { MAX_FDS_PER_FRAME } else { 0 },
            multiplexed: false,
            encrypted: false,
            kernel_local: self.kernel_local,
        }
    }

    fn set_max_frame_len(&mut self, max: usize) {
        self.max_now = max.min(self.max_configured);
        self.decoder.set_max_frame(self.max_now + self.header_len());
    }

    fn peer_addr(&self) -> String {
        self.peer.clone()
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.write_state != WriteState::Open {
            return Poll::Ready(Err(TransportError::Closed));
        }
        if self.outbox.queued >= self.send_budget {
            match self.poll_write_queue(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if self.outbox.queued >= self.send_budget => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(&mut self, frame: Frame) -> Result<(), TransportError> {
        if self.write_state != WriteState::Open {
            return Err(TransportError::Closed);
        }
        let len = frame.payload.len();
        if len > self.max_now {
            return Err(TransportError::TooLarge {
                len,
                max: self.max_now,
            });
        }
        let carries = self.io.carries_fds();
        if !frame.fds.is_empty() {
            if !carries {
                return Err(TransportError::Cannot {
                    transport: self.io.scheme(),
                    what: "carry file descriptors",
                });
            }
            if frame.fds.len() > MAX_FDS_PER_FRAME {
                return Err(TransportError::Cannot {
                    transport: self.io.scheme(),
                    what: "carry more than 64 descriptors in one frame (split them over several frames)",
                });
            }
        }
        let header = usize::from(carries);
        let prefix = self.prefix(len)?;
        let mut head = [0u8; PREFIX_LEN + 1];
        head[..PREFIX_LEN].copy_from_slice(&prefix);
        head[PREFIX_LEN] = frame.fds.len() as u8;
        self.outbox
            .push(&head[..PREFIX_LEN + header], frame.payload, frame.fds);
        Ok(())
    }

    fn begin_frame(&mut self) -> bool {
        debug_assert!(self.frame_start.is_none(), "begin_frame twice");
        if self.write_state != WriteState::Open || self.outbox.queued >= self.send_budget {
            return false;
        }
        let header = self.header_len();
        // Room for a small message; a larger one grows the block.
        self.outbox.make_room(IN_PLACE_ROOM);
        let tail = &mut self.outbox.tail;
        self.frame_start = Some(tail.len());
        // The prefix is filled in by `end_frame`; a descriptor-carrying
        // stream's count byte is 0 (no descriptors travel this way).
        tail.extend_from_slice(&[0; PREFIX_LEN + 1][..PREFIX_LEN + header]);
        true
    }

    fn frame_buf(&mut self) -> Option<&mut BytesMut> {
        self.frame_start.map(|_| &mut self.outbox.tail)
    }

    fn end_frame(&mut self, keep: bool) -> Result<(), TransportError> {
        let Some(start) = self.frame_start.take() else {
            return Err(TransportError::Closed);
        };
        let header = self.header_len();
        let len = self.outbox.tail.len() - start - PREFIX_LEN - header;
        if !keep {
            self.outbox.tail.truncate(start);
            return Ok(());
        }
        let prefix = match self.prefix(len) {
            Ok(p) => p,
            Err(e) => {
                self.outbox.tail.truncate(start);
                return Err(e);
            }
        };
        self.outbox.tail[start..start + PREFIX_LEN].copy_from_slice(&prefix);
        self.outbox.queued += PREFIX_LEN + header + len;
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        self.poll_write_queue(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.write_state {
            WriteState::Closed => return Poll::Ready(Ok(())),
            WriteState::Failed => return Poll::Ready(Err(TransportError::Closed)),
            WriteState::Open => self.write_state = WriteState::ShuttingDown,
            WriteState::ShuttingDown => {}
        }
        ready!(self.poll_write_queue(cx))?;
        match ready!(self.io.poll_shutdown_write(cx)) {
            Ok(()) => {
                self.write_state = WriteState::Closed;
                Poll::Ready(Ok(()))
            }
            // The peer is already gone: nothing more to say to it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.write_state = WriteState::Closed;
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                self.write_state = WriteState::Failed;
                Poll::Ready(Err(TransportError::io(self.op("close the link to"), e)))
            }
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        let mut fds = Vec::new();
        loop {
            match self.read_state {
                ReadState::Done => return Poll::Ready(None),
                ReadState::Open | ReadState::Eof => {}
            }
            match self.try_decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    self.finish_reading();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if self.read_state == ReadState::Eof {
                let partial = !self.rbuf.is_empty();
                let unclaimed = self.inbox.check_unclaimed(self.received);
                self.finish_reading();
                if partial {
                    return Poll::Ready(Some(Err(TransportError::Framing(
                        "the connection ended inside a frame".into(),
                    ))));
                }
                return match unclaimed {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                };
            }
            let rest = self.frame_rest();
            let want = self.read_want(rest);
            if let Some(rest) = rest {
                self.reserve_for_frame(rest);
            }
            let res = match rest {
                Some(rest) if rest >= READ_SMALL && self.io.carries_fds() => {
                    ready!(self.io.poll_read_body(cx, &mut self.rbuf, want))
                }
                _ => {
                    // Read into the room the buffer has when that is not
                    // tiny: after a frame is split off, what is left of the
                    // buffer serves the next reads without a new allocation.
                    let spare = self.rbuf.capacity() - self.rbuf.len();
                    if spare < want.min(1024) {
                        self.rbuf.reserve(want);
                    }
                    let want = want.min(self.rbuf.capacity() - self.rbuf.len());
                    let res = ready!(self.io.poll_read_some(cx, &mut self.rbuf, want, &mut fds));
                    if let Ok(n) = res {
                        self.read_size = if n == want {
                            (self.read_size * 2).min(self.read_chunk)
                        } else {
                            READ_SMALL.min(self.read_chunk)
                        };
                    }
                    res
                }
            };
            match res {
                Ok(0) => {
                    // Descriptors cannot arrive without bytes; drop any anyway.
                    fds.clear();
                    self.read_state = ReadState::Eof;
                }
                Ok(n) => {
                    let start = self.received;
                    self.received += n as u64;
                    if !fds.is_empty() {
                        if let Err(e) =
                            self.inbox
                                .add(start, self.received, std::mem::take(&mut fds))
                        {
                            self.finish_reading();
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                Err(e) => {
                    self.finish_reading();
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

/// Frames waiting to be written.
#[derive(Default)]
struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Small frames being coalesced; sealed into a chunk when flushing, or
    /// when it needs a new block (see [`Outbox::make_room`]).
    tail: BytesMut,
    /// Size of the last block `tail` was given (see [`Outbox::make_room`]).
    block: usize,
    /// Bytes queued and not yet written.
    queued: usize,
}

/// Room made for a frame built in place (see `begin_frame`; QUIC's batch
/// keeps as much room for one).
pub(crate) const IN_PLACE_ROOM: usize = 512;

/// Smallest and largest block small frames are coalesced in.
const TAIL_BLOCK_MIN: usize = 1024;
const TAIL_BLOCK_MAX: usize = 32 * 1024;

struct Chunk {
    data: Bytes,
    /// Descriptors to send with this chunk's first byte.
    fds: Vec<OwnedFd>,
}

impl Outbox {
    fn push(&mut self, head: &[u8], payload: Bytes, fds: Vec<OwnedFd>) {
        self.queued += head.len() + payload.len();
        if !fds.is_empty() {
            self.seal();
            if payload.len() <= COALESCE_MAX {
                let mut b = BytesMut::with_capacity(head.len() + payload.len());
                b.extend_from_slice(head);
                b.extend_from_slice(&payload);
                self.chunks.push_back(Chunk {
                    data: b.freeze(),
                    fds,
                });
            } else {
                self.chunks.push_back(Chunk {
                    data: Bytes::copy_from_slice(head),
                    fds,
                });
                self.chunks.push_back(Chunk {
                    data: payload,
                    fds: Vec::new(),
                });
            }
        } else if payload.len() <= COALESCE_MAX {
            self.make_room(head.len() + payload.len());
            self.tail.extend_from_slice(head);
            self.tail.extend_from_slice(&payload);
        } else {
            self.make_room(head.len());
            self.tail.extend_from_slice(head);
            self.seal();
            self.chunks.push_back(Chunk {
                data: payload,
                fds: Vec::new(),
            });
        }
    }

    /// Makes room for `need` more bytes in `tail`. Its block is used from
    /// the start again once every chunk cut from it was written (the
    /// usual case when the socket keeps up). Otherwise a new block is
    /// taken, twice as large as the last up to [`TAIL_BLOCK_MAX`]: a quiet
    /// connection keeps a small one, a flood soon gets large ones, and a
    /// block is not grown by copying for each frame (`BytesMut` would grow
    /// it from the size of one frame, doubling and copying all the way).
    /// Only a frame built in place that outgrows the room made for it
    /// (`IN_PLACE_ROOM`) grows the block, copying what it holds.
    fn make_room(&mut self, need: usize) {
        if self.tail.capacity() - self.tail.len() >= need {
            return;
        }
        self.seal();
        if self.tail.try_reclaim(need) {
            return;
        }
        self.block = (self.block * 2).clamp(TAIL_BLOCK_MIN, TAIL_BLOCK_MAX);
        self.tail = BytesMut::with_capacity(need.max(self.block));
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            let data = self.tail.split().freeze();
            self.chunks.push_back(Chunk {
                data,
                fds: Vec::new(),
            });
        }
    }

    /// Drops `n` written bytes off the front. The first chunk's descriptors
    /// went with its first byte, so our copies are closed now.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        if let Some(first) = self.chunks.front_mut() {
            first.fds.clear();
        }
        while n > 0 {
            let Some(first) = self.chunks.front_mut() else {
                break;
            };
            if n >= first.data.len() {
                n -= first.data.len();
                self.chunks.pop_front();
            } else {
                let _ = first.data.split_to(n);
                n = 0;
            }
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.tail.clear();
        self.queued = 0;
    }
}

/// Descriptors received and not yet claimed by a frame.
#[derive(Default)]
struct FdInbox {
    batches: VecDeque<FdBatch>,
}

struct FdBatch {
    /// Stream range of the read that brought the descriptors.
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

impl FdInbox {
    fn add(&mut self, start: u64, end: u64, fds: Vec<OwnedFd>) -> Result<(), TransportError> {
        let pending: usize = self.batches.iter().map(|b| b.fds.len()).sum();
        if pending + fds.len() > MAX_PENDING_FDS {
            return Err(TransportError::Framing(
                "the peer sent descriptors that no frame claims".into(),
            ));
        }
        self.batches.push_back(FdBatch { start, end, fds });
        Ok(())
    }

    /// Fails if a batch arrived wholly before `frame_start` and was never
    /// claimed: its frame announced no descriptors.
    fn check_unclaimed(&self, frame_start: u64) -> Result<(), TransportError> {
        match self.batches.front() {
            Some(b) if b.end <= frame_start => Err(TransportError::Framing(
                "the peer sent descriptors with a frame that announced none".into(),
            )),
            _ => Ok(()),
        }
    }

    fn claim(&mut self, frame_start: u64, count: usize) -> Result<Vec<OwnedFd>, TransportError> {
        self.check_unclaimed(frame_start)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let ok = matches!(self.batches.front(),
            Some(b) if b.start <= frame_start && frame_start < b.end && b.fds.len() == count);
        if !ok {
            let got = self.batches.front().map_or(0, |b| b.fds.len());
            return Err(TransportError::Framing(format!(
                "a frame announces {count} descriptors but {got} arrived with it"
            )));
        }
        Ok(self.batches.pop_front().map(|b| b.fds).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkExt;

    fn link(io: tokio::io::DuplexStream) -> StreamLink<PlainStream<tokio::io::DuplexStream>> {
        StreamLink::new(
            PlainStream::new(io, "test", None),
            "test peer".into(),
            true,
            &StreamConfig::default(),
        )
    }

    type PipeLink = StreamLink<PlainStream<tokio::io::DuplexStream>>;

    /// Sends 2,000 frames `frame(i)` over a pipe that takes at most 100
    /// bytes at a time, flushing after every `flush_every`-th, while the
    /// peer reads; checks that each arrives whole and in order, and gives
    /// back the sending link.
    async fn deliver(frame: impl Fn(usize) -> Bytes, flush_every: usize) -> PipeLink {
        let (a, b) = tokio::io::duplex(100);
        let (mut tx, mut rx) = (link(a), link(b));
        const N: usize = 2000;
        let send = async {
            for i in 0..N {
                tx.feed(Frame::new(frame(i))).await.expect("feed");
                if i % flush_every == 0 {
                    tx.flush().await.expect("flush");
                }
            }
            tx.flush().await.expect("flush");
        };
        let recv = async {
            for i in 0..N {
                let f = rx.recv().await.expect("a frame").expect("no error");
                assert_eq!(f.payload, frame(i), "frame {i}");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .expect("all frames within a minute");
        tx
    }

    /// Frames mostly larger than the pipe takes at once, flushed in
    /// sevens: nearly every write is partial, ending anywhere inside a
    /// frame, and coalesced small frames still arrive whole and in order.
    #[tokio::test]
    async fn partial_writes_of_coalesced_frames_lose_nothing() {
        let body = |i: usize| -> Bytes { (0..(i * 37) % 301).map(|k| (i + k) as u8).collect() };
        deliver(body, 7).await;
    }

    /// Frames small enough for the pipe, each flushed alone while the
    /// peer reads: nearly every write takes the whole buffer, which is
    /// then emptied and reused in place, frame after frame.
    #[tokio::test]
    async fn a_coalescing_buffer_reused_after_whole_writes_loses_nothing() {
        let small = |i: usize| -> Bytes { (0..i % 90).map(|k| (i * 7 + k) as u8).collect() };
        let tx = deliver(small, 1).await;
        assert_eq!(tx.outbox.queued, 0, "nothing left queued");
        assert!(tx.outbox.chunks.is_empty(), "nothing cut into chunks");
    }
}
