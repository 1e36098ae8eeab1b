//! Unix-domain stream sockets: `unix:///abs/path.sock`.
//!
//! Links carry file descriptors (see [`crate::stream`] for the framing) and
//! report `kernel_local`.
//!
//! # The socket file
//!
//! - It is made owner-only (mode 0600) *before* the socket listens: the
//!   socket is bound, the file's mode set, and only then `listen` is called,
//!   so there is no moment when another user can connect.
//! - A stale file (a socket nobody listens on: connecting is refused) is
//!   removed and replaced.
//! - A live one (someone accepts connections) is never taken over: `listen`
//!   fails and says so (the owner sees the probe as a connection that closes
//!   at once). A file that is not a socket is never removed.
//! - When the listener is dropped, the file is removed if it is still the
//!   one this listener bound.
//!
//! Keep sockets in a directory only you can write to: in a shared directory
//! another user could swap the path between bind and `chmod`.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use courier_runtime::transport::{
    Address, AddressError, BoxFut, Link, Listener, Transport, TransportError,
};
use rustix::fs::Mode;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::net::{UnixListener, UnixStream};

use crate::fdlink::{describe_peer, unix_link};
use crate::stream::StreamConfig;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 1024;

/// The Unix-domain socket transport.
#[derive(Clone, Debug, Default)]
pub struct UnixTransport {
    cfg: StreamConfig,
}

impl UnixTransport {
    /// A Unix transport with the given stream settings.
    pub fn new(cfg: StreamConfig) -> Self {
        Self { cfg }
    }
}

impl Transport for UnixTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        let cfg = self.cfg.clone();
        let to = to.clone();
        Box::pin(async move {
            let path = unix_path(&to)?;
            let op = format!("connect to {to}");
            let stream =
                match tokio::time::timeout(cfg.connect_timeout, UnixStream::connect(&path)).await {
                    Ok(r) => r.map_err(|e| TransportError::io(op, e))?,
                    Err(_) => return Err(TransportError::io(op, io::ErrorKind::TimedOut.into())),
                };
            let peer = describe_peer(&stream, &to.to_string());
            Ok(Box::new(unix_link(stream, "unix", peer, None, &cfg)) as Box<dyn Link>)
        })
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        let cfg = self.cfg.clone();
        let at = at.clone();
        Box::pin(async move {
            let path = unix_path(&at)?;
            let op = format!("listen on {at}");
            let fd = bind_owner_only(&path).map_err(|e| TransportError::io(op.clone(), e))?;
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| TransportError::io(op.clone(), e))?;
            let std_listener = std::os::unix::net::UnixListener::from(fd);
            let listener =
                UnixListener::from_std(std_listener).map_err(|e| TransportError::io(op, e))?;
            Ok(Box::new(UnixLinkListener {
                listener,
                local: at,
                cfg,
                owned_file: Some((path, meta.dev(), meta.ino())),
                _adopted: None,
            }) as Box<dyn Listener>)
        })
    }
}

fn unix_path(a: &Address) -> Result<PathBuf, TransportError> {
    match a {
        Address::Unix { path } => Ok(path.clone()),
        other => Err(AddressError {
            address: other.to_string(),
            problem: "the unix transport takes unix:// addresses".into(),
        }
        .into()),
    }
}

/// Binds a listening socket at `path` whose file is mode 0600, replacing a
/// stale socket file and refusing to take over a live one.
fn bind_owner_only(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let addr = SocketAddrUnix::new(path)?;
    let mut replaced = false;
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        match rustix::net::bind(&fd, &addr) {
            Ok(()) => {
                // Not listening yet: connections are refused until the mode
                // is owner-only.
                rustix::fs::chmod(path, Mode::from_raw_mode(0o600))?;
                rustix::net::listen(&fd, BACKLOG)?;
                return Ok(fd);
            }
            Err(rustix::io::Errno::ADDRINUSE) if !replaced => {
                if is_live(path)? {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is listening on this socket; not taking it over",
                    ));
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(path = %path.display(), "replaced a stale unix socket file");
                replaced = true;
            }
            Err(rustix::io::Errno::ADDRINUSE) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process took the socket path while the stale file was replaced",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether someone accepts connections at `path`. Fails if the path is not
/// a socket (it is then not ours to remove).
fn is_live(path: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; not removing it",
        ));
    }
    let probe = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    match rustix::net::connect(&probe, &SocketAddrUnix::new(path)?) {
        // Accepted, or queued behind a full backlog: someone is there.
        Ok(()) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INPROGRESS) => Ok(true),
        Err(rustix::io::Errno::CONNREFUSED) | Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A listening Unix socket.
pub(crate) struct UnixLinkListener {
    pub(crate) listener: UnixListener,
    pub(crate) local: Address,
    pub(crate) cfg: StreamConfig,
    /// The socket file this listener created (path, device, inode), removed
    /// on drop if it is still the same file.
    pub(crate) owned_file: Option<(PathBuf, u64, u64)>,
    pub(crate) _adopted: Option<crate::sys::AdoptGuard>,
}

impl fmt::Debug for UnixLinkListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixListener")
            .field("local", &self.local.to_string())
            .finish()
    }
}

impl Drop for UnixLinkListener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = self.owned_file.take() {
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if m.dev() == dev && m.ino() == ino {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl Listener for UnixLinkListener {
    fn local_addr(&self) -> Address {
        self.local.clone()
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Box<dyn Link>, TransportError>> {
        match self.listener.poll_accept(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(TransportError::io(
                format!("accept on {}", self.local),
                e,
            ))),
            Poll::Ready(Ok((stream, _))) => {
                let peer = describe_peer(&stream, &format!("{} (accepted)", self.local));
                let link = unix_link(stream, "unix", peer, None, &self.cfg);
                Poll::Ready(Ok(Box::new(link)))
            }
        }
    }
}
