//! Courier's transports: TCP, Unix-domain sockets, QUIC and fd-passing,
//! each implementing runtime's [`Transport`], [`Listener`] and [`Link`].
//!
//! A link moves whole [`Frame`]s (a payload and, where the link can, open
//! file descriptors). The address scheme picks the transport, so a
//! deployment changes wire by changing a string:
//!
//! | address | module | carries fds | multiplexed | encrypted |
//! |---|---|---|---|---|
//! | `tcp://host:port` | [`tcp`] | no | no | no |
//! | `unix:///abs/path.sock` | [`unix`] | yes (64 per frame) | no | no (kernel-local) |
//! | `fd://N`, `fd://listen` | [`fd`] | yes on Unix sockets | no | no (kernel-local) |
//! | `quic://host:port` | [`quic`] | no | yes: frames may arrive out of order | TLS 1.3 |
//!
//! # Where to begin
//!
//! Build one [`AnyTransport`] and hand it to the actors layer as
//! `Arc<dyn Transport>`; it dispatches on the scheme of each address:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use courier_runtime::transport::{Address, Frame, Transport};
//! use courier_transports::quic::{Identity, PeerTrust, QuicConfig};
//! use courier_transports::{AnyTransport, LinkExt, ListenerExt};
//!
//! // QUIC needs an identity (kept in a directory across restarts) and a
//! // trust policy; TCP, Unix and fd work without configuration. Here both
//! // ends share one certificate and pin it.
//! let dir = std::env::temp_dir().join(format!("courier-doc-{}", std::process::id()));
//! let identity = Identity::load_or_generate(&dir, "localhost")?;
//! println!("peers pin us with {}", identity.fingerprint());
//! let trust = PeerTrust::pinned([identity.fingerprint()]);
//! let transport: Arc<dyn Transport> = Arc::new(
//!     AnyTransport::builder()
//!         .quic(QuicConfig::new(identity, trust))
//!         .build()?,
//! );
//!
//! // The same code for every scheme: try "quic://127.0.0.1:0".
//! let mut listener = transport.listen(&"tcp://127.0.0.1:0".parse()?).await?;
//! let mut link = transport.connect(&listener.local_addr()).await?;
//! let mut accepted = listener.accept().await?;
//! // Unauthenticated peers get tiny frames until the handshake is done.
//! accepted.set_max_frame_len(courier_runtime::frame::HANDSHAKE_MAX_FRAME);
//! link.send(Frame::new(&b"hello"[..])).await?;
//! assert_eq!(&accepted.recv().await.unwrap()?.payload[..], b"hello");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! Every link and listener must be created and polled inside a tokio
//! runtime. An error from [`Listener::poll_accept`] concerns one incoming
//! connection (for example `EMFILE`); keep accepting unless it is
//! `TransportError::Closed`. Links start with the transport's full frame
//! limit: lower it with [`Link::set_max_frame_len`] before the first
//! `poll_recv` on an unauthenticated link.
//!
//! Stream links (TCP, Unix, fd) share one implementation in [`stream`]: its
//! module docs give the wire format, including how descriptors are tied to
//! frames, and how writes are batched and bounded. QUIC's certificates,
//! pinning and stream use are in [`quic`].
//!
//! # What this crate leaves out
//!
//! Node authentication (the HMAC handshake), heartbeats and message
//! encoding live above, in runtime and the actors layer; this crate only
//! moves frames and reports what each link can do ([`LinkCaps`]). QUIC's TLS
//! secures the pipe and exports keying material ([`Link::channel_binding`])
//! but does not replace the node handshake. The crate targets Unix.
//!
//! # Cargo features
//!
//! `tcp`, `unix`, `fd` and `quic`, all on by default and additive: each adds
//! one transport, and an address whose transport is compiled out fails with
//! an address error naming the feature.
//!
//! [`Frame`]: courier_runtime::transport::Frame
//! [`LinkCaps`]: courier_runtime::transport::LinkCaps

#![deny(missing_docs)]
// With some transports compiled out, helpers shared by the stream
// transports (framing, descriptor I/O) go partly unused.
#![cfg_attr(
    not(all(feature = "tcp", feature = "unix", feature = "fd")),
    allow(dead_code, unused_imports)
)]

use std::fmt;

use courier_runtime::transport::{
    Address, AddressError, BoxFut, Link, Listener, Transport, TransportError,
};

mod fdlink;
pub mod stream;
mod sys;
pub mod util;

#[cfg(feature = "fd")]
pub mod fd;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(any(feature = "tcp", feature = "fd"))]
pub mod tcp;
#[cfg(any(feature = "unix", feature = "fd"))]
pub mod unix;

pub use stream::{StreamConfig, MAX_FDS_PER_FRAME};
pub use util::{LinkExt, ListenerExt};

/// A transport for every scheme this build has, dispatching on the address.
#[derive(Clone)]
pub struct AnyTransport {
    #[cfg(feature = "tcp")]
    tcp: tcp::TcpTransport,
    #[cfg(feature = "unix")]
    unix: unix::UnixTransport,
    #[cfg(feature = "fd")]
    fd: fd::FdTransport,
    #[cfg(feature = "quic")]
    quic: Option<quic::QuicTransport>,
}

impl fmt::Debug for AnyTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AnyTransport");
        #[cfg(feature = "quic")]
        d.field("quic", &self.quic.is_some());
        d.finish_non_exhaustive()
    }
}

impl Default for AnyTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl AnyTransport {
    /// Stream transports with default settings, and no QUIC (which needs a
    /// certificate and a trust policy: see [`AnyTransport::builder`]).
    pub fn new() -> Self {
        Self::with_streams(StreamConfig::default())
    }

    /// Starts configuring a transport.
    pub fn builder() -> AnyTransportBuilder {
        AnyTransportBuilder::default()
    }

    fn with_streams(cfg: StreamConfig) -> Self {
        let _ = &cfg;
        Self {
            #[cfg(feature = "tcp")]
            tcp: tcp::TcpTransport::new(cfg.clone()),
            #[cfg(feature = "unix")]
            unix: unix::UnixTransport::new(cfg.clone()),
            #[cfg(feature = "fd")]
            fd: fd::FdTransport::new(cfg.clone()),
            #[cfg(feature = "quic")]
            quic: None,
        }
    }

    fn pick(&self, a: &Address) -> Result<&dyn Transport, TransportError> {
        let missing = |feature: &str| -> TransportError {
            AddressError {
                address: a.to_string(),
                problem: format!(
                    "this build lacks the {feature} transport (cargo feature `{feature}` of courier-transports)"
                ),
            }
            .into()
        };
        let _ = &missing;
        match a {
            Address::Tcp { .. } => {
                #[cfg(feature = "tcp")]
                return Ok(&self.tcp);
                #[cfg(not(feature = "tcp"))]
                return Err(missing("tcp"));
            }
            Address::Unix { .. } => {
                #[cfg(feature = "unix")]
                return Ok(&self.unix);
                #[cfg(not(feature = "unix"))]
                return Err(missing("unix"));
            }
            Address::Fd { .. } => {
                #[cfg(feature = "fd")]
                return Ok(&self.fd);
                #[cfg(not(feature = "fd"))]
                return Err(missing("fd"));
            }
            Address::Quic { .. } => {
                #[cfg(feature = "quic")]
                return match &self.quic {
                    Some(q) => Ok(q),
                    None => Err(AddressError {
                        address: a.to_string(),
                        problem: "quic:// needs a certificate and a trust policy: build the \
                                  transport with AnyTransport::builder().quic(QuicConfig::new(..))"
                            .into(),
                    }
                    .into()),
                };
                #[cfg(not(feature = "quic"))]
                return Err(missing("quic"));
            }
        }
    }
}

impl Transport for AnyTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        match self.pick(to) {
            Ok(t) => t.connect(to),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        match self.pick(at) {
            Ok(t) => t.listen(at),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

/// Configures an [`AnyTransport`].
#[derive(Debug, Default)]
pub struct AnyTransportBuilder {
    stream: StreamConfig,
    #[cfg(feature = "quic")]
    quic: Option<quic::QuicConfig>,
}

impl AnyTransportBuilder {
    /// Settings for TCP, Unix and fd links.
    pub fn stream_config(mut self, cfg: StreamConfig) -> Self {
        self.stream = cfg;
        self
    }

    /// Enables `quic://` with this identity and trust policy.
    #[cfg(feature = "quic")]
    pub fn quic(mut self, cfg: quic::QuicConfig) -> Self {
        self.quic = Some(cfg);
        self
    }

    /// Builds the transport; fails if the QUIC configuration is unusable.
    pub fn build(self) -> Result<AnyTransport, TransportError> {
        #[allow(unused_mut)]
        let mut t = AnyTransport::with_streams(self.stream);
        #[cfg(feature = "quic")]
        if let Some(q) = self.quic {
            t.quic = Some(quic::QuicTransport::new(q)?);
        }
        Ok(t)
    }
}
