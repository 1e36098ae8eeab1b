//! QUIC links: `quic://host:port`, with quinn and rustls (ring provider).
//!
//! # Security
//!
//! Mutual TLS 1.3: each end presents its [`Identity`] and accepts the other
//! only if [`PeerTrust`] vouches for it (a pinned SHA-256 certificate
//! fingerprint, or a CA). Session resumption is off, so every connection
//! verifies certificates afresh. [`Link::channel_binding`] exports 32 bytes
//! of keying material (label [`CHANNEL_BINDING_LABEL`], empty context) for
//! the node handshake to bind itself to this TLS session.
//!
//! A client whose own certificate the server refuses may see `connect`
//! succeed (TLS 1.3 clients finish first); its first `poll_recv` then fails
//! with a TLS error and the server never yields the link.
//!
//! # Streams and frame order
//!
//! A large frame travels on its own unidirectional stream, so it does not
//! hold up small ones (small frames also get a higher send priority); small
//! frames handed over between two flushes share one stream, so a burst of
//! small messages does not open a stream each. Frames of up to [`COALESCE_MAX`](crate::stream::COALESCE_MAX)
//! bytes carry a sequence number and are handed over **in the order they
//! were sent**: one that overtakes an earlier small frame is held back until
//! that one arrives. Larger frames are handed over as soon as they are
//! complete, so a small frame sent after a large one may arrive before it.
//! [`LinkCaps::multiplexed`](courier_runtime::transport::LinkCaps::multiplexed)
//! is `true` to say so.
//!
//! Each stream starts with one kind byte: `0` a large frame (the payload
//! follows, the stream's end ends it), `3` a small frame (an 8-byte
//! big-endian sequence number among small frames, then the payload), `4` a
//! batch of two to 64 small frames (the first one's sequence number, then
//! each frame as a 4-byte big-endian length and its bytes; at most 8 KiB in
//! all), `1` END (8 bytes, big-endian: how many frames
//! were sent before it), `2` END-ACK (the receiver has handed over every
//! frame up to END).
//!
//! # Closing
//!
//! `poll_close` sends END once every queued frame is handed to quinn. The
//! peer's `poll_recv` yields `None` after it has handed over that many
//! frames, and answers END-ACK. Dropping a link after `poll_close` keeps the
//! connection in the background until END-ACK arrives, the peer closes, or
//! [`QuicConfig::linger`] passes, so no frame is lost to an early close;
//! dropping it without `poll_close` closes the connection at once (the peer
//! sees an error). No file descriptors travel over QUIC.
//!
//! # Endpoints
//!
//! A listener owns one UDP endpoint; each outgoing connection gets its own
//! client endpoint (an ephemeral UDP port), kept as long as the link. A
//! listener drives handshakes only while it is polled for `poll_accept`, and
//! refuses new connections once dropped (accepted links keep working).
//!
//! # Backpressure and memory
//!
//! `poll_ready` is `Pending` while more than [`QuicConfig::send_budget`]
//! bytes or [`QuicConfig::max_frames_in_flight`] frames are not yet handed to
//! quinn. A peer may have at most 64 streams open toward us; quinn buffers at
//! most 16 MiB per connection, and frames being read take at most
//! `recv_concurrency` times the frame limit. Small frames that overtook an
//! earlier one are held until it arrives: past 1,024 of them no new stream
//! is taken, so at most (1,024 + `recv_concurrency` × 64) × 8 KiB are held
//! (12.6 MiB with the defaults).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use courier_runtime::frame::DEFAULT_MAX_FRAME;
use courier_runtime::transport::{
    Address, AddressError, BoxFut, Link, Listener, Transport, TransportError,
};
use quinn::{Connection, Endpoint, VarInt};

mod link;
mod raw;
mod tls;

use link::{conn_error, QuicLink};
pub use raw::{raw_stream_pair, RawStream};
pub use tls::{Fingerprint, FingerprintError, Identity, PeerTrust};

/// The label under which [`Link::channel_binding`] exports keying material.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-courier-handshake";

/// The ALPN protocol both ends must speak.
pub const ALPN: &[u8] = b"courier/1";

/// Most streams a peer may have open toward us.
const MAX_STREAMS: u32 = 64;

/// Settings of the QUIC transport.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// Our certificate and key.
    pub identity: Identity,
    /// Which peers to accept.
    pub trust: PeerTrust,
    /// The name the server's certificate must carry when it is checked
    /// against a CA; by default the host of the address. Irrelevant for
    /// pinned peers.
    pub server_name: Option<String>,
    /// The largest frame a link accepts or sends (`set_max_frame_len` may
    /// lower it). Links start at this limit.
    pub max_frame_len: usize,
    /// Bytes not yet handed to quinn above which `poll_ready` waits.
    pub send_budget: usize,
    /// Frames not yet handed to quinn above which `poll_ready` waits.
    pub max_frames_in_flight: usize,
    /// Streams (frames) read at once.
    pub recv_concurrency: usize,
    /// Connections mid-handshake a listener allows; more are refused.
    pub max_handshaking: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// A connection silent this long is dead (keep-alives go every third).
    pub idle_timeout: Duration,
    /// How long a closed, dropped link waits for the peer to take its last
    /// frames.
    pub linger: Duration,
}

impl QuicConfig {
    /// Defaults around an identity and a trust policy.
    pub fn new(identity: Identity, trust: PeerTrust) -> Self {
        Self {
            identity,
            trust,
            server_name: None,
            max_frame_len: DEFAULT_MAX_FRAME,
            send_budget: 4 * 1024 * 1024,
            max_frames_in_flight: 256,
            recv_concurrency: 8,
            max_handshaking: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            linger: Duration::from_secs(10),
        }
    }
}

/// The QUIC transport.
#[derive(Clone)]
pub struct QuicTransport {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) cfg: QuicConfig,
    pub(crate) client: quinn::ClientConfig,
    pub(crate) server: quinn::ServerConfig,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("identity", &self.shared.cfg.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// Builds the TLS and QUIC configurations; fails if the identity or the
    /// trust policy is unusable (for example, trusts nobody).
    pub fn new(cfg: QuicConfig) -> Result<Self, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(tls::PeerVerifier::new(&cfg.trust, &provider)?);
        let tls_err = |e: rustls::Error| TransportError::Tls(e.to_string());

        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(cfg.identity.chain(), cfg.identity.key())
            .map_err(tls_err)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_early_data = false;

        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(cfg.identity.chain(), cfg.identity.key())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let transport = Arc::new(transport_config(&cfg)?);
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(qc));
        client.transport_config(transport.clone());
        let qs = quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(qs));
        server.transport_config(transport);
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                client,
                server,
            }),
        })
    }

    /// Our certificate's fingerprint, for peers to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.shared.cfg.identity.fingerprint()
    }
}

pub(crate) fn transport_config(cfg: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(16 * 1024 * 1024));
    t.send_window(16 * 1024 * 1024);
    // Streams go out in the order they were written, not round-robin: the
    // peer delivers small frames in order, so a batch whose bytes were
    // held back behind later batches would hold up everything after it
    // (see `link::MAX_HELD`). It also spares splitting many small streams
    // across packets.
    t.send_fairness(false);
    let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| TransportError::Tls("the QUIC idle timeout is too long".into()))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(cfg.idle_timeout / 3));
    Ok(t)
}

async fn resolve(host: &str, port: u16, op: &str) -> Result<SocketAddr, TransportError> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TransportError::io(op, e))?
        .next()
        .ok_or_else(|| {
            TransportError::io(
                op,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the host name resolved to no address",
                ),
            )
        })
}

fn quic_parts(a: &Address) -> Result<(String, u16), TransportError> {
    match a {
        Address::Quic { host, port } => Ok((host.clone(), *port)),
        other => Err(AddressError {
            address: other.to_string(),
            problem: "the quic transport takes quic:// addresses".into(),
        }
        .into()),
    }
}

pub(crate) fn quic_address(addr: SocketAddr) -> Address {
    Address::Quic {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

impl Transport for QuicTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        let shared = self.shared.clone();
        let to = to.clone();
        Box::pin(async move {
            let (host, port) = quic_parts(&to)?;
            let op = format!("connect to {to}");
            let addr = resolve(&host, port, &op).await?;
            let bind: SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let endpoint = Endpoint::client(bind).map_err(|e| TransportError::io(&op, e))?;
            let mut name = shared.cfg.server_name.clone().unwrap_or(host);
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                name = "courier".into();
            }
            let connecting = endpoint
                .connect_with(shared.client.clone(), addr, &name)
                .map_err(|e| TransportError::io(&op, io::Error::other(e.to_string())))?;
            let conn = match tokio::time::timeout(shared.cfg.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(conn_error(&e, &to.to_string()).unwrap_or(TransportError::Closed))
                }
                Err(_) => {
                    return Err(TransportError::io(
                        op,
                        io::Error::new(io::ErrorKind::TimedOut, "the QUIC handshake timed out"),
                    ))
                }
            };
            Ok(Box::new(QuicLink::new(conn, Some(endpoint), shared)) as Box<dyn Link>)
        })
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        let shared = self.shared.clone();
        let at = at.clone();
        Box::pin(async move {
            let (host, port) = quic_parts(&at)?;
            let op = format!("listen on {at}");
            let addr = resolve(&host, port, &op).await?;
            let endpoint = Endpoint::server(shared.server.clone(), addr)
                .map_err(|e| TransportError::io(&op, e))?;
            let local = endpoint
                .local_addr()
                .map_err(|e| TransportError::io(&op, e))?;
            Ok(Box::new(QuicListener {
                endpoint,
                local: quic_address(local),
                shared,
                accept: None,
                handshakes: Vec::new(),
            }) as Box<dyn Listener>)
        })
    }
}

/// A QUIC endpoint accepting connections.
struct QuicListener {
    endpoint: Endpoint,
    local: Address,
    shared: Arc<Shared>,
    accept: Option<BoxFut<'static, Option<quinn::Incoming>>>,
    handshakes: Vec<BoxFut<'static, Result<Connection, String>>>,
}

impl fmt::Debug for QuicListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicListener")
            .field("local", &self.local.to_string())
            .field("handshaking", &self.handshakes.len())
            .finish()
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        // Refuse new connections; the ones accepted keep working.
        self.endpoint.set_server_config(None);
    }
}

impl Listener for QuicListener {
    fn local_addr(&self) -> Address {
        self.local.clone()
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<Box<dyn Link>, TransportError>> {
        loop {
            let mut i = 0;
            while i < self.handshakes.len() {
                match self.handshakes[i].as_mut().poll(cx) {
                    Poll::Ready(Ok(conn)) => {
                        drop(self.handshakes.swap_remove(i));
                        let link = QuicLink::new(conn, None, self.shared.clone());
                        return Poll::Ready(Ok(Box::new(link)));
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(listener = %self.local, error = %e, "quic handshake failed");
                        drop(self.handshakes.swap_remove(i));
                    }
                    Poll::Pending => i += 1,
                }
            }
            let endpoint = &self.endpoint;
            let fut = self.accept.get_or_insert_with(|| {
                let ep = endpoint.clone();
                Box::pin(async move { ep.accept().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.accept = None;
                    return Poll::Ready(Err(TransportError::Closed));
                }
                Poll::Ready(Some(incoming)) => {
                    self.accept = None;
                    if self.handshakes.len() >= self.shared.cfg.max_handshaking {
                        tracing::debug!(listener = %self.local, "too many quic handshakes; refusing one");
                        incoming.refuse();
                        continue;
                    }
                    let limit = self.shared.cfg.handshake_timeout;
                    self.handshakes.push(Box::pin(async move {
                        let connecting = incoming.accept().map_err(|e| e.to_string())?;
                        match tokio::time::timeout(limit, connecting).await {
                            Ok(Ok(c)) => Ok(c),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("the handshake timed out".into()),
                        }
                    }));
                }
            }
        }
    }
}
