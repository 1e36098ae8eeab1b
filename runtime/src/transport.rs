//! The one transport trait every wire implements, and the address syntax.
//!
//! A transport moves whole **frames** (a body plus, where the link can, open
//! file descriptors), never a raw byte stream: a stream has no slot for
//! descriptors and would hide QUIC's message boundaries. The runtime defines
//! the traits; `courier-transports` implements them for TCP, Unix sockets,
//! QUIC and inherited descriptors; the actors layer only ever holds
//! `Box<dyn Link>`.
//!
//! # Polling contract
//!
//! All `poll_*` methods follow the `std::future` rules: `Pending` means the
//! task in `cx` is woken when calling again may make progress. A link is used
//! by one task at a time (`&mut self`); sending and receiving may be
//! interleaved freely. After `poll_recv` returns `Ready(None)` or an error,
//! the link is finished and later calls return `Ready(None)`.

use std::fmt;
use std::future::Future;
#[cfg(unix)]
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};

/// A pinned, boxed, `Send` future: what the object-safe traits return.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One message on a link: a body and the descriptors travelling with it.
#[derive(Debug, Default)]
pub struct Frame {
    /// The frame body (an envelope).
    pub payload: Bytes,
    /// Open descriptors sent with this frame (only on links whose
    /// [`LinkCaps::carries_fds`] is true). Received descriptors are owned
    /// and close-on-exec.
    #[cfg(unix)]
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// A frame with a body and no descriptors.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            #[cfg(unix)]
            fds: Vec::new(),
        }
    }

    /// How many descriptors travel with the frame.
    pub fn fd_count(&self) -> usize {
        #[cfg(unix)]
        {
            self.fds.len()
        }
        #[cfg(not(unix))]
        {
            0
        }
    }
}

/// What a link can do, so callers ask instead of assuming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkCaps {
    /// The largest frame body the link sends or accepts right now.
    pub max_frame_len: usize,
    /// Open file descriptors can travel with frames.
    pub carries_fds: bool,
    /// Most descriptors in one frame.
    pub max_fds_per_frame: usize,
    /// Frames travel on independent streams: a large one does not hold up
    /// small ones behind it, and so frames may be delivered in a different
    /// order than they were sent (QUIC). When false, frames arrive in the
    /// order sent.
    pub multiplexed: bool,
    /// The link is encrypted and integrity-protected below Courier (TLS).
    pub encrypted: bool,
    /// Both ends are on this host, joined by the kernel (Unix, socketpair).
    pub kernel_local: bool,
}

/// What failed in a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The address is malformed or names a transport this build lacks.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// An operating-system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done, such as "connect to tcp://127.0.0.1:7000".
        op: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The link or listener is closed.
    #[error("the connection is closed")]
    Closed,
    /// A frame over the link's limit; nothing was written or read for it.
    #[error("frame of {len} bytes is over the link's limit of {max} bytes")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The link cannot do what was asked (for example carry descriptors over
    /// TCP); nothing was written.
    #[error("{transport} cannot {what}; use a unix:// or fd:// address for that")]
    Cannot {
        /// The transport's scheme.
        transport: &'static str,
        /// What it cannot do.
        what: &'static str,
    },
    /// Control data (descriptors) arrived truncated: descriptors were lost.
    #[error(
        "descriptors arrived truncated (MSG_CTRUNC): the sender sent more than could be received"
    )]
    FdsTruncated,
    /// The TLS layer refused the peer or failed (QUIC).
    #[error("tls: {0}")]
    Tls(String),
    /// The peer broke the framing (for example a bad length prefix).
    #[error("the peer broke the framing: {0}")]
    Framing(String),
}

impl TransportError {
    /// Wraps an io error with what was being done.
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            op: op.into(),
            source,
        }
    }
}

/// A connection carrying frames.
pub trait Link: Send + fmt::Debug {
    /// What the link can do.
    fn caps(&self) -> LinkCaps;

    /// Lowers (or raises, up to the transport's configured maximum) the
    /// largest frame accepted from now on: the handshake keeps it tiny until
    /// the peer is authenticated.
    fn set_max_frame_len(&mut self, max: usize);

    /// The peer's address as this side sees it, for logs.
    fn peer_addr(&self) -> String;

    /// 32 bytes of keying material exported from the link's TLS session, or
    /// `None` where there is no TLS. The handshake mixes it into its
    /// transcript, binding node authentication to this very session.
    fn channel_binding(&self) -> Option<[u8; 32]> {
        None
    }

    /// Ready when `start_send` may be called: the bounded send queue has
    /// room. This is the backpressure point.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// Queues one frame. Checks size and descriptor support first and fails
    /// without queuing anything if either is exceeded. Call only after
    /// `poll_ready` returned `Ready(Ok)`.
    fn start_send(&mut self, frame: Frame) -> Result<(), TransportError>;

    /// Starts a frame without descriptors built straight into the link's
    /// send buffer (see [`Self::frame_buf`]), sparing the copy
    /// `start_send` makes. False when the link has no such buffer or
    /// cannot take a frame now (its queue is over budget, or it is
    /// closing); then use `poll_ready` and `start_send`. When true, must be
    /// followed by [`Self::end_frame`] before any other call but
    /// `frame_buf`.
    fn begin_frame(&mut self) -> bool {
        false
    }

    /// The buffer of the frame begun, to append its body to (what is
    /// before its end is not the caller's to change).
    fn frame_buf(&mut self) -> Option<&mut BytesMut> {
        None
    }

    /// Ends the frame begun with [`Self::begin_frame`]: queues what was
    /// appended as one frame's body when `keep` is true, or takes it back
    /// out of the buffer. A body over the frame limit is taken back and
    /// is an error, as in `start_send`.
    fn end_frame(&mut self, keep: bool) -> Result<(), TransportError> {
        let _ = keep;
        Err(TransportError::Closed)
    }

    /// Writes queued frames out; `Ready(Ok)` once all are handed to the OS.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// Flushes, then closes the sending side so the peer sees a clean end.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// The next frame, `Ready(None)` at a clean end of stream.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>>;
}

/// Accepts incoming links.
pub trait Listener: Send + fmt::Debug {
    /// The address actually bound (a port 0 replaced by the real one).
    fn local_addr(&self) -> Address;

    /// The next incoming link.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Box<dyn Link>, TransportError>>;
}

/// A way of making links: one per scheme, or one dispatching on the scheme.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Opens a link to `to`.
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>>;

    /// Starts listening at `at`.
    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>>;
}

/// Where a node listens or connects: the scheme picks the transport.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// `tcp://host:port` (IPv6 hosts in brackets).
    Tcp {
        /// Host name or IP literal (without brackets).
        host: String,
        /// Port; 0 asks for any free port when listening.
        port: u16,
    },
    /// `unix:///absolute/path.sock`.
    Unix {
        /// The socket file's absolute path.
        path: PathBuf,
    },
    /// `quic://host:port`.
    Quic {
        /// Host name or IP literal (without brackets).
        host: String,
        /// UDP port; 0 asks for any free port when listening.
        port: u16,
    },
    /// `fd://N`: an already-open descriptor (a connected socket or a
    /// listening one); `fd://listen` takes the first socket-activation
    /// descriptor (`LISTEN_FDS`).
    Fd {
        /// The descriptor number, or `None` for socket activation.
        fd: Option<i32>,
    },
}

impl Address {
    /// The scheme, such as `"tcp"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Tcp { .. } => "tcp",
            Self::Unix { .. } => "unix",
            Self::Quic { .. } => "quic",
            Self::Fd { .. } => "fd",
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn host(h: &str) -> String {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_owned()
            }
        }
        match self {
            Self::Tcp { host: h, port } => write!(f, "tcp://{}:{port}", host(h)),
            Self::Quic { host: h, port } => write!(f, "quic://{}:{port}", host(h)),
            Self::Unix { path } => write!(f, "unix://{}", path.display()),
            Self::Fd { fd: Some(n) } => write!(f, "fd://{n}"),
            Self::Fd { fd: None } => write!(f, "fd://listen"),
        }
    }
}

/// An address that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad address {address:?}: {problem}")]
pub struct AddressError {
    /// The text given.
    pub address: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let bad = |problem: &str| AddressError {
            address: s.to_owned(),
            problem: problem.to_owned(),
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad(
                "expected scheme://..., with scheme one of tcp, unix, quic, fd",
            ));
        };
        match scheme {
            "tcp" | "quic" => {
                let (host, port) = split_host_port(rest).map_err(|p| bad(&p))?;
                Ok(if scheme == "tcp" {
                    Self::Tcp { host, port }
                } else {
                    Self::Quic { host, port }
                })
            }
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(bad(
                        "a unix address needs an absolute path: unix:///path/to.sock",
                    ));
                }
                if rest.len() > 107 {
                    return Err(bad("unix socket paths are limited to 107 bytes"));
                }
                if rest.as_bytes().contains(&0) {
                    return Err(bad("the path holds a NUL byte"));
                }
                Ok(Self::Unix {
                    path: PathBuf::from(rest),
                })
            }
            "fd" => {
                if rest == "listen" {
                    return Ok(Self::Fd { fd: None });
                }
                let fd: i32 = rest.parse().map_err(|_| {
                    bad("expected fd://N with N a descriptor number, or fd://listen")
                })?;
                if fd < 0 {
                    return Err(bad("descriptor numbers are not negative"));
                }
                Ok(Self::Fd { fd: Some(fd) })
            }
            other => Err(bad(&format!(
                "unknown scheme {other:?}; expected tcp, unix, quic or fd"
            ))),
        }
    }
}

fn split_host_port(rest: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (h, p) = after
            .split_once(']')
            .ok_or("an IPv6 host needs a closing bracket: [::1]:7000")?;
        let p = p
            .strip_prefix(':')
            .ok_or("expected :port after the bracketed host")?;
        (h, p)
    } else {
        let (h, p) = rest
            .rsplit_once(':')
            .ok_or("expected host:port (port 0 picks a free one)")?;
        if h.contains(':') {
            return Err("an IPv6 host must be in brackets: [::1]:7000".into());
        }
        (h, p)
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains('/') || p_has_junk(port) {
        return Err("expected host:port with nothing after the port".into());
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok((host.to_owned(), port))
}

fn p_has_junk(port: &str) -> bool {
    port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        for s in [
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:0",
            "tcp://localhost:80",
            "quic://example.org:4433",
            "unix:///tmp/courier.sock",
            "fd://3",
            "fd://listen",
        ] {
            let a: Address = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (s, needle) in [
            ("127.0.0.1:7000", "scheme"),
            ("http://x:1", "unknown scheme"),
            ("tcp://x", "host:port"),
            ("tcp://x:99999", "0 to 65535"),
            ("tcp://:80", "empty"),
            ("tcp://::1:80", "brackets"),
            ("tcp://[::1:80", "closing bracket"),
            ("tcp://x:80/path", "nothing after the port"),
            ("unix://relative.sock", "absolute"),
            ("fd://-1", "negative"),
            ("fd://three", "descriptor number"),
        ] {
            let e = s.parse::<Address>().unwrap_err();
            assert!(e.to_string().contains(needle), "{s}: {e}");
        }
    }
}
