//! Unix-domain stream sockets as descriptor-carrying [`RawStream`]s.
//!
//! Reads use `recvmsg` with `MSG_CMSG_CLOEXEC`, so every received
//! descriptor is close-on-exec from its first moment and is an [`OwnedFd`]
//! at once; `MSG_CTRUNC` (control data cut short) is reported as
//! [`TransportError::FdsTruncated`] after closing whatever did arrive. Writes
//! use `sendmsg` with `MSG_NOSIGNAL`. The framing (which frame owns which
//! descriptors) is described in [`crate::stream`].

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use courier_runtime::transport::TransportError;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::UnixStream;

use crate::stream::{RawStream, StreamConfig, StreamLink, MAX_FDS_PER_FRAME};
use crate::sys::AdoptGuard;

/// Control-buffer room: exactly one frame's worth of descriptors, so a
/// sender that packs more into one message is caught by `MSG_CTRUNC`.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME));

/// The most bytes one `recvmsg` asks for.
const MAX_READ: usize = 256 * 1024;

thread_local! {
    /// Zeroed space `recvmsg` reads into, on each thread that reads; the
    /// bytes are then appended to the link's buffer. Safe code cannot hand
    /// the kernel uninitialised memory, and zeroing the read buffer's spare
    /// room before every read cost more than this copy (a 4 KiB `memset`
    /// per 100-byte message).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A connected Unix-domain stream socket.
#[derive(Debug)]
pub(crate) struct FdStream {
    io: UnixStream,
    scheme: &'static str,
    /// Keeps a descriptor number taken from an `fd://` address marked as
    /// ours until the socket above is closed (fields drop in order).
    _adopted: Option<AdoptGuard>,
}

impl FdStream {
    pub(crate) fn new(io: UnixStream, scheme: &'static str, adopted: Option<AdoptGuard>) -> Self {
        Self {
            io,
            scheme,
            _adopted: adopted,
        }
    }
}

/// Wraps a connected Unix stream socket as a link.
pub(crate) fn unix_link(
    io: UnixStream,
    scheme: &'static str,
    peer: String,
    adopted: Option<AdoptGuard>,
    cfg: &StreamConfig,
) -> StreamLink<FdStream> {
    StreamLink::new(FdStream::new(io, scheme, adopted), peer, true, cfg)
}

/// Describes the process at the other end of a Unix socket, for logs.
pub(crate) fn describe_peer(io: &UnixStream, base: &str) -> String {
    match io.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("{base} (pid {pid}, uid {})", c.uid()),
            None => format!("{base} (uid {})", c.uid()),
        },
        Err(_) => base.to_owned(),
    }
}

impl RawStream for FdStream {
    fn carries_fds(&self) -> bool {
        true
    }

    fn scheme(&self) -> &'static str {
        self.scheme
    }

    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
        fds: &mut Vec<OwnedFd>,
    ) -> Poll<Result<usize, TransportError>> {
        let want = want.clamp(1, MAX_READ);
        loop {
            if let Err(e) = ready!(self.io.poll_read_ready(cx)) {
                return Poll::Ready(Err(TransportError::io(
                    format!("receive on {}", self.scheme),
                    e,
                )));
            }
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut got: Option<(usize, bool)> = None;
            let before = fds.len();
            // A read that comes back short and carried no descriptors
            // emptied the socket: the kernel stops a stream read early only
            // at the end of the queue or just after data that carried
            // descriptors. Such a read reports `WouldBlock` to tokio so it
            // forgets the readiness, and the next poll waits for the next
            // edge instead of asking the kernel again (one `recvmsg` per
            // message, not two).
            let res = SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < want {
                    scratch.resize(want, 0);
                }
                self.io.try_io(Interest::READABLE, || {
                    let mut iov = [IoSliceMut::new(&mut scratch[..want])];
                    let msg = rustix::net::recvmsg(
                        &self.io,
                        &mut iov,
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
                    )
                    .map_err(io::Error::from)?;
                    // Own every descriptor at once, whatever happens next.
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = m {
                            fds.extend(received);
                        }
                    }
                    let truncated = msg.flags.contains(ReturnFlags::CTRUNC);
                    got = Some((msg.bytes, truncated));
                    buf.extend_from_slice(&scratch[..msg.bytes]);
                    if msg.bytes > 0 && msg.bytes < want && fds.len() == before && !truncated {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(())
                })
            });
            if let Some((n, truncated)) = got {
                if truncated {
                    fds.clear();
                    return Poll::Ready(Err(TransportError::FdsTruncated));
                }
                return Poll::Ready(Ok(n));
            }
            if let Err(e) = res {
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => {
                        return Poll::Ready(Err(TransportError::io(
                            format!("receive on {}", self.scheme),
                            e,
                        )))
                    }
                }
            }
        }
    }

    fn poll_read_body(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<Result<usize, TransportError>> {
        // Plain `read` into uninitialised spare room, no bigger than the
        // rest of the frame: the kernel cannot hand over bytes (or the
        // descriptors of) the next frame. A peer that attached descriptors
        // mid-frame broke the protocol; the kernel closes those.
        if buf.capacity() - buf.len() < want {
            buf.reserve(want);
        }
        let mut limited = bytes::BufMut::limit(&mut *buf, want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited)
            .map_err(|e| TransportError::io(format!("receive on {}", self.scheme), e))
    }

    fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_write_ready(cx))?;
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many descriptors for one message",
                )));
            }
            let res = self.io.try_io(Interest::WRITABLE, || {
                let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
                // The common case takes the lighter `send`: no message
                // header to copy in, no control data to parse.
                if fds.is_empty() && bufs.len() == 1 {
                    rustix::net::send(&self.io, &bufs[0], flags)
                } else {
                    rustix::net::sendmsg(&self.io, bufs, &mut control, flags)
                }
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
