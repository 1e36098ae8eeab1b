//! Links and listeners that arrive as open descriptors: `fd://N`,
//! `fd://listen`, and connections handed over with `SCM_RIGHTS`.
//!
//! - `fd://N` names descriptor `N`, which must be a stream socket. To
//!   [`Transport::listen`], a listening socket (`SO_ACCEPTCONN`) becomes a
//!   listener; a connected socket becomes a listener that yields that one
//!   link (a child node "listening" on the socketpair its parent gave it).
//!   To [`Transport::connect`], it must be a connected socket.
//! - `fd://listen` takes the first socket passed by socket activation
//!   (`LISTEN_PID` must be this process, `LISTEN_FDS` at least 1; the socket
//!   is descriptor 3). The variables are left in the environment.
//! - [`receive_link`] takes a connection another process hands over with
//!   [`send_fd`] (`SCM_RIGHTS`) and wraps it.
//! - [`socketpair_for_child`] gives a child process one end of a socketpair
//!   and returns the other as a link; the child connects with the `fd://N`
//!   address it is given.
//!
//! An `fd://N` address grants descriptor `N` to the transport, which then owns
//! and closes it; a number already owned by a link or listener of this
//! process is refused. Adopted descriptors are made close-on-exec and
//! non-blocking. Unix-domain sockets carry descriptors (framing in
//! [`crate::stream`]); TCP sockets are handled as by the TCP transport.
//! Every function here must be called within a tokio runtime.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::task::{Context, Poll};

use courier_runtime::transport::{
    Address, AddressError, BoxFut, Link, Listener, Transport, TransportError,
};
use rustix::io::FdFlags;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::fdlink::{describe_peer, unix_link};
use crate::stream::StreamConfig;
use crate::sys::{self, AdoptGuard};
use crate::tcp::{tcp_link, tcp_listener};
use crate::unix::UnixLinkListener;

/// The first descriptor socket activation passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The fd-passing transport: `fd://N` and `fd://listen`.
#[derive(Clone, Debug, Default)]
pub struct FdTransport {
    cfg: StreamConfig,
}

impl FdTransport {
    /// An fd transport with the given stream settings.
    pub fn new(cfg: StreamConfig) -> Self {
        Self { cfg }
    }
}

impl Transport for FdTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        let res = (|| {
            let n = match to {
                Address::Fd { fd: Some(n) } => *n,
                Address::Fd { fd: None } => {
                    return Err(wrong(
                        to,
                        "fd://listen is for listening; connect takes fd://N",
                    ))
                }
                other => return Err(wrong(other, "the fd transport takes fd:// addresses")),
            };
            let (fd, guard) = adopt(n)?;
            match inspect(&fd, &to.to_string())? {
                Kind::Listening(_) => Err(TransportError::io(
                    format!("connect to {to}"),
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the descriptor is a listening socket; listen on it instead",
                    ),
                )),
                Kind::Connected(family) => {
                    make_link(fd, family, to.to_string(), Some(guard), &self.cfg)
                }
            }
        })();
        Box::pin(std::future::ready(res))
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        let res = (|| {
            let n = match at {
                Address::Fd { fd: Some(n) } => *n,
                Address::Fd { fd: None } => activation_fd().map_err(|e| {
                    TransportError::io(
                        "take the socket-activation descriptor for fd://listen",
                        io::Error::new(io::ErrorKind::NotFound, e),
                    )
                })?,
                other => return Err(wrong(other, "the fd transport takes fd:// addresses")),
            };
            let (fd, guard) = adopt(n)?;
            listener_from(fd, Some(guard), at.clone(), &self.cfg)
        })();
        Box::pin(std::future::ready(res))
    }
}

/// Wraps a connected stream socket (Unix or TCP) as a link. Sets
/// close-on-exec and non-blocking mode on it.
pub fn link_from_fd(fd: OwnedFd, cfg: &StreamConfig) -> Result<Box<dyn Link>, TransportError> {
    let what = format!("fd://{}", fd.as_raw_fd());
    match inspect(&fd, &what)? {
        Kind::Connected(family) => make_link(fd, family, what, None, cfg),
        Kind::Listening(_) => Err(TransportError::io(
            format!("use {what} as a link"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the descriptor is a listening socket",
            ),
        )),
    }
}

/// Wraps a listening stream socket (Unix or TCP) as a listener; a connected
/// socket becomes a listener yielding that one link. Sets close-on-exec and
/// non-blocking mode on it. A Unix socket's file is left in place on drop.
pub fn listener_from_fd(
    fd: OwnedFd,
    cfg: &StreamConfig,
) -> Result<Box<dyn Listener>, TransportError> {
    let at = Address::Fd {
        fd: Some(fd.as_raw_fd()),
    };
    listener_from(fd, None, at, cfg)
}

/// Two links joined to each other.
pub type LinkPair = (Box<dyn Link>, Box<dyn Link>);

/// A connected pair of descriptor-carrying links, joined by the kernel.
pub fn socketpair(cfg: &StreamConfig) -> Result<LinkPair, TransportError> {
    let (a, b) = raw_socketpair()?;
    Ok((
        make_link(a, AddressFamily::UNIX, "socketpair".into(), None, cfg)?,
        make_link(b, AddressFamily::UNIX, "socketpair".into(), None, cfg)?,
    ))
}

/// Makes `fd` inherited by the child `cmd` spawns, under the same number,
/// and returns the `fd://N` address the child should use.
///
/// The descriptor stays close-on-exec in this process, so no other child
/// inherits it; the flag is cleared in this child only, after `fork`. `cmd`
/// owns the descriptor until `cmd` is dropped: drop it once the child is
/// spawned, or this process keeps the child's end open.
pub fn inherit(cmd: &mut Command, fd: OwnedFd) -> Address {
    Address::Fd {
        fd: Some(sys::inherit(cmd, fd)),
    }
}

/// Creates a socketpair, gives one end to the child `cmd` will spawn (see
/// [`inherit`]) and returns this process's end as a link, with the `fd://N`
/// address to hand the child (as an argument or environment variable).
pub fn socketpair_for_child(
    cmd: &mut Command,
    cfg: &StreamConfig,
) -> Result<(Box<dyn Link>, Address), TransportError> {
    let (ours, theirs) = raw_socketpair()?;
    let link = make_link(ours, AddressFamily::UNIX, "child".into(), None, cfg)?;
    Ok((link, inherit(cmd, theirs)))
}

/// Hands a descriptor (for example an accepted connection) to the process at
/// the other end of `over`, with `SCM_RIGHTS`: one byte carrying one
/// descriptor. Our copy stays open; close it once sent.
pub async fn send_fd(over: &UnixStream, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
    let fds = [fd];
    loop {
        over.writable()
            .await
            .map_err(|e| TransportError::io("hand over a descriptor", e))?;
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let res = over.try_io(Interest::WRITABLE, || {
            rustix::net::sendmsg(
                over,
                &[IoSlice::new(b"H")],
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        match res {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(TransportError::io("hand over a descriptor", e)),
        }
    }
}

/// Receives one descriptor sent with [`send_fd`]: owned and close-on-exec.
/// Fails with [`TransportError::FdsTruncated`] if more arrived than one (all
/// are closed), and with `Closed` at end of stream.
pub async fn receive_fd(over: &UnixStream) -> Result<OwnedFd, TransportError> {
    loop {
        over.readable()
            .await
            .map_err(|e| TransportError::io("receive a handed-over descriptor", e))?;
        let mut byte = [0u8; 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let res = over.try_io(Interest::READABLE, || {
            rustix::net::recvmsg(
                over,
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        let msg = match res {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(TransportError::io("receive a handed-over descriptor", e)),
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(TransportError::FdsTruncated);
        }
        if msg.bytes == 0 {
            return Err(TransportError::Closed);
        }
        let mut fds = fds.into_iter();
        return match (fds.next(), fds.next()) {
            (Some(fd), None) => Ok(fd),
            _ => Err(TransportError::Framing(
                "a handover message must carry exactly one descriptor".into(),
            )),
        };
    }
}

/// Receives a connection handed over with [`send_fd`] and wraps it as a
/// link (see [`link_from_fd`]).
pub async fn receive_link(
    over: &UnixStream,
    cfg: &StreamConfig,
) -> Result<Box<dyn Link>, TransportError> {
    let fd = receive_fd(over).await?;
    link_from_fd(fd, cfg)
}

/// What a descriptor turned out to be.
enum Kind {
    Listening(AddressFamily),
    Connected(AddressFamily),
}

fn wrong(a: &Address, problem: &str) -> TransportError {
    AddressError {
        address: a.to_string(),
        problem: problem.into(),
    }
    .into()
}

fn adopt(n: RawFd) -> Result<(OwnedFd, AdoptGuard), TransportError> {
    sys::adopt(n).map_err(|e| {
        TransportError::io(
            format!("take fd://{n}"),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })
}

/// Checks `fd` is a usable stream socket; makes it close-on-exec and
/// non-blocking.
fn inspect(fd: &OwnedFd, what: &str) -> Result<Kind, TransportError> {
    let op = format!("use {what}");
    let bad = |msg: String| {
        TransportError::io(op.clone(), io::Error::new(io::ErrorKind::InvalidInput, msg))
    };
    let ty = match rustix::net::sockopt::socket_type(fd) {
        Ok(t) => t,
        Err(rustix::io::Errno::NOTSOCK) => {
            return Err(bad("the descriptor is not a socket".into()))
        }
        Err(e) => return Err(TransportError::io(op, e.into())),
    };
    if ty != SocketType::STREAM {
        return Err(bad(format!(
            "the descriptor is a {ty:?} socket; only stream sockets are supported"
        )));
    }
    let family = rustix::net::sockopt::socket_domain(fd)
        .map_err(|e| TransportError::io(op.clone(), e.into()))?;
    if ![
        AddressFamily::UNIX,
        AddressFamily::INET,
        AddressFamily::INET6,
    ]
    .contains(&family)
    {
        return Err(bad(format!(
            "the descriptor is a {family:?} socket; only unix and tcp sockets are supported"
        )));
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd)
        .map_err(|e| TransportError::io(op.clone(), e.into()))?;
    let flags =
        rustix::io::fcntl_getfd(fd).map_err(|e| TransportError::io(op.clone(), e.into()))?;
    rustix::io::fcntl_setfd(fd, flags | FdFlags::CLOEXEC)
        .map_err(|e| TransportError::io(op.clone(), e.into()))?;
    rustix::io::ioctl_fionbio(fd, true).map_err(|e| TransportError::io(op, e.into()))?;
    Ok(if listening {
        Kind::Listening(family)
    } else {
        Kind::Connected(family)
    })
}

fn make_link(
    fd: OwnedFd,
    family: AddressFamily,
    what: String,
    guard: Option<AdoptGuard>,
    cfg: &StreamConfig,
) -> Result<Box<dyn Link>, TransportError> {
    let op = format!("use {what}");
    if family == AddressFamily::UNIX {
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
            .map_err(|e| TransportError::io(op, e))?;
        let peer = describe_peer(&stream, &what);
        Ok(Box::new(unix_link(stream, "fd", peer, guard, cfg)))
    } else {
        let stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))
            .map_err(|e| TransportError::io(op, e))?;
        Ok(Box::new(tcp_link(stream, guard, cfg)?))
    }
}

fn listener_from(
    fd: OwnedFd,
    guard: Option<AdoptGuard>,
    at: Address,
    cfg: &StreamConfig,
) -> Result<Box<dyn Listener>, TransportError> {
    let what = at.to_string();
    let op = format!("listen on {what}");
    match inspect(&fd, &what)? {
        Kind::Connected(family) => {
            let link = make_link(fd, family, what, guard, cfg)?;
            Ok(Box::new(OneLinkListener {
                link: Some(link),
                local: at,
            }))
        }
        Kind::Listening(AddressFamily::UNIX) => {
            let local = match rustix::net::getsockname(&fd) {
                Ok(a) => match rustix::net::SocketAddrUnix::try_from(a) {
                    Ok(u) => match u.path() {
                        Some(p) => Address::Unix {
                            path: std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
                                p.to_bytes(),
                            )),
                        },
                        None => at.clone(),
                    },
                    Err(_) => at.clone(),
                },
                Err(_) => at.clone(),
            };
            let listener =
                tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
                    .map_err(|e| TransportError::io(op, e))?;
            Ok(Box::new(UnixLinkListener {
                listener,
                local,
                cfg: cfg.clone(),
                owned_file: None,
                _adopted: guard,
            }))
        }
        Kind::Listening(_) => {
            let listener = tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
                .map_err(|e| TransportError::io(op, e))?;
            let mut l = tcp_listener(listener, cfg.clone())?;
            l._adopted = guard;
            Ok(Box::new(l))
        }
    }
}

fn raw_socketpair() -> Result<(OwnedFd, OwnedFd), TransportError> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| TransportError::io("create a socketpair", e.into()))
}

/// The socket-activation descriptor, after checking the environment.
fn activation_fd() -> Result<RawFd, String> {
    let pid = std::env::var("LISTEN_PID").map_err(|_| {
        "LISTEN_PID is not set: fd://listen takes a socket passed by socket activation \
         (systemd, or systemd-socket-activate)"
            .to_owned()
    })?;
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID={pid:?} is not a process id"))?;
    let me = std::process::id();
    if pid != me {
        return Err(format!(
            "LISTEN_PID={pid} names another process (this one is {me}): the sockets were meant for it"
        ));
    }
    let count = std::env::var("LISTEN_FDS")
        .map_err(|_| "LISTEN_FDS is not set: no socket was passed".to_owned())?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={count:?} is not a number"))?;
    if count == 0 {
        return Err("LISTEN_FDS=0: no socket was passed".into());
    }
    Ok(LISTEN_FDS_START)
}

/// A listener over one already-connected socket: it yields that link once,
/// then stays pending (no other link will ever come).
struct OneLinkListener {
    link: Option<Box<dyn Link>>,
    local: Address,
}

impl fmt::Debug for OneLinkListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneLinkListener")
            .field("local", &self.local.to_string())
            .field("taken", &self.link.is_none())
            .finish()
    }
}

impl Listener for OneLinkListener {
    fn local_addr(&self) -> Address {
        self.local.clone()
    }

    fn poll_accept(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Box<dyn Link>, TransportError>> {
        match self.link.take() {
            Some(link) => Poll::Ready(Ok(link)),
            None => Poll::Pending,
        }
    }
}
