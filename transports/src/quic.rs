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
//! Every frame travels on its own unidirectional stream, so a large frame
//! does not hold up small ones (small frames also get a higher send
//! priority). The receiver reads up to [`QuicConfig::recv_concurrency`]
//! streams at once and hands frames over **in the order they complete, which
//! may differ from the order they were sent**: a small frame sent after a
//! large one usually arrives first. [`LinkCaps::multiplexed`] is `true` to
//! say so; a caller that needs order must number its frames.
//!
//! Each stream starts with one kind byte: `0` a frame (the payload follows,
//! the stream's end ends it), `1` END (8 bytes, big-endian: how many frames
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
//! # Backpressure and memory
//!
//! `poll_ready` is `Pending` while more than [`QuicConfig::send_budget`]
//! bytes or [`QuicConfig::max_frames_in_flight`] frames are not yet handed to
//! quinn. A peer may have at most 64 streams open toward us; quinn buffers at
//! most 16 MiB per connection, and frames being read take at most
//! `recv_concurrency` times the frame limit.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_runtime::frame::DEFAULT_MAX_FRAME;
use courier_runtime::transport::{
    Address, AddressError, BoxFut, Frame, Link, LinkCaps, Listener, Transport, TransportError,
};
use quinn::{Connection, ConnectionError, Endpoint, ReadError, RecvStream, VarInt, WriteError};

mod tls;

pub use tls::{Fingerprint, FingerprintError, Identity, PeerTrust};

/// The label under which [`Link::channel_binding`] exports keying material.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-courier-handshake";

/// The ALPN protocol both ends must speak.
pub const ALPN: &[u8] = b"courier/1";

const KIND_FRAME: u8 = 0;
const KIND_END: u8 = 1;
const KIND_END_ACK: u8 = 2;
static FRAME_HEAD: [u8; 1] = [KIND_FRAME];
static END_ACK: [u8; 1] = [KIND_END_ACK];

/// Connection close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_DROPPED: u32 = 1;
const CLOSE_LINGER_TIMEOUT: u32 = 2;
/// Stream stop code: the frame was over our limit.
const STOP_TOO_LARGE: u32 = 1;

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

struct Shared {
    cfg: QuicConfig,
    client: quinn::ClientConfig,
    server: quinn::ServerConfig,
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

fn transport_config(cfg: &QuicConfig) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(16 * 1024 * 1024));
    t.send_window(16 * 1024 * 1024);
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

fn quic_address(addr: SocketAddr) -> Address {
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

/// What one incoming stream held.
enum Incoming {
    Frame(Bytes),
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
    in_flight: usize,
    frames_sent: u64,
    send: SendState,
    accept: Option<BoxFut<'static, Result<RecvStream, ConnectionError>>>,
    reads: Vec<BoxFut<'static, Result<Incoming, TransportError>>>,
    done: VecDeque<Frame>,
    frames_received: u64,
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
    fn new(conn: Connection, endpoint: Option<Endpoint>, shared: Arc<Shared>) -> Self {
        let peer = quic_address(conn.remote_address()).to_string();
        let max_now = Arc::new(AtomicUsize::new(shared.cfg.max_frame_len));
        Self {
            conn,
            endpoint,
            shared,
            peer,
            max_now,
            ops: Vec::new(),
            in_flight: 0,
            frames_sent: 0,
            send: SendState::Open,
            accept: None,
            reads: Vec::new(),
            done: VecDeque::new(),
            frames_received: 0,
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
        let priority = if len <= crate::stream::COALESCE_MAX {
            1
        } else {
            0
        };
        let fut = send_stream(
            self.conn.clone(),
            Bytes::from_static(&FRAME_HEAD),
            frame.payload,
            priority,
            self.peer.clone(),
        );
        self.ops.push(SendOp {
            bytes: len + 1,
            fut,
        });
        self.in_flight += len + 1;
        self.frames_sent += 1;
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.send == SendState::Failed {
            return Poll::Ready(Err(TransportError::Closed));
        }
        self.poll_ops(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match self.send {
            SendState::Closed => return Poll::Ready(Ok(())),
            SendState::Failed => return Poll::Ready(Err(TransportError::Closed)),
            SendState::Open => {
                let mut end = BytesMut::with_capacity(9);
                end.extend_from_slice(&[KIND_END]);
                end.extend_from_slice(&self.frames_sent.to_be_bytes());
                let fut = send_stream(
                    self.conn.clone(),
                    end.freeze(),
                    Bytes::new(),
                    1,
                    self.peer.clone(),
                );
                self.ops.push(SendOp { bytes: 0, fut });
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
            while self.conn_error.is_none() && self.reads.len() < self.shared.cfg.recv_concurrency {
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
    fn fail_recv(&mut self) {
        self.recv_done = true;
        self.reads.clear();
        self.done.clear();
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
                        Incoming::Frame(_) | Incoming::Nothing => {}
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

/// Opens a stream, writes `head` and `body` on it and finishes it. A
/// control stream (END, END-ACK) to a peer that has already closed the
/// connection cleanly has nothing left to say: that counts as sent.
fn send_stream(
    conn: Connection,
    head: Bytes,
    body: Bytes,
    priority: i32,
    peer: String,
) -> BoxFut<'static, Result<(), TransportError>> {
    let control = head.first() != Some(&KIND_FRAME);
    Box::pin(async move {
        let res = async {
            let mut s = conn.open_uni().await.map_err(WriteError::ConnectionLost)?;
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
                // The kind byte, and room for END's count whatever the limit.
                if total > (max.saturating_add(1)).max(9) {
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

/// What a lost connection means to the caller: `None` for a clean end.
fn conn_error(e: &ConnectionError, peer: &str) -> Option<TransportError> {
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

/// One bidirectional quinn stream between two endpoints on loopback, as a
/// plain byte stream: the "raw QUIC" baseline the benchmark measures
/// Courier against. Both ends use a fresh certificate pinned by the other,
/// the same TLS settings and flow-control windows as Courier's links.
pub async fn raw_stream_pair() -> Result<(RawStream, RawStream), TransportError> {
    let id = Identity::generate("courier-raw")?;
    let cfg = QuicConfig::new(id.clone(), PeerTrust::pinned([id.fingerprint()]));
    let t = QuicTransport::new(cfg.clone())?;
    let mut tc = transport_config(&cfg)?;
    tc.max_concurrent_bidi_streams(VarInt::from_u32(1));
    let tc = Arc::new(tc);
    let mut server_cfg = t.shared.server.clone();
    server_cfg.transport_config(tc.clone());
    let mut client_cfg = t.shared.client.clone();
    client_cfg.transport_config(tc);
    let io = |e: io::Error| TransportError::io("bind a raw QUIC endpoint", e);
    let server =
        Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("literal")).map_err(io)?;
    let addr = server.local_addr().map_err(io)?;
    let mut client = Endpoint::client("127.0.0.1:0".parse().expect("literal")).map_err(io)?;
    client.set_default_client_config(client_cfg);
    let connecting = client
        .connect(addr, "courier-raw")
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let conn_err = |e: ConnectionError| TransportError::Tls(e.to_string());
    let accept = async {
        let incoming = server.accept().await.ok_or(TransportError::Closed)?;
        let conn = incoming.await.map_err(conn_err)?;
        let (send, recv) = conn.accept_bi().await.map_err(conn_err)?;
        Ok::<_, TransportError>((conn, send, recv))
    };
    let open = async {
        let conn = connecting.await.map_err(conn_err)?;
        let (mut send, recv) = conn.open_bi().await.map_err(conn_err)?;
        // A stream is announced to the peer with its first bytes.
        send.write_all(&[0])
            .await
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok::<_, TransportError>((conn, send, recv))
    };
    let (a, o) = tokio::join!(accept, open);
    let (sc, ss, mut sr) = a?;
    let (cc, cs, cr) = o?;
    let mut first = [0u8; 1];
    sr.read_exact(&mut first)
        .await
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    Ok((
        RawStream {
            send: cs,
            recv: cr,
            _conn: cc,
            _endpoint: client,
        },
        RawStream {
            send: ss,
            recv: sr,
            _conn: sc,
            _endpoint: server,
        },
    ))
}

/// A quinn bidirectional stream as an `AsyncRead + AsyncWrite` (see
/// [`raw_stream_pair`]). Keeps its connection and endpoint alive.
#[derive(Debug)]
pub struct RawStream {
    send: quinn::SendStream,
    recv: RecvStream,
    _conn: Connection,
    _endpoint: Endpoint,
}

impl tokio::io::AsyncRead for RawStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.recv), cx, buf)
    }
}

impl tokio::io::AsyncWrite for RawStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.send), cx)
    }
}
