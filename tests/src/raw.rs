//! Speaking Courier's wire by hand, for hostile-input tests.
//!
//! [`RawConn`] is a bare socket (tcp or unix) that writes and reads
//! length-prefixed frames, or any bytes at all. [`RawSession`] puts the
//! runtime's own [`Session`] on top of one: a peer that holds the key,
//! authenticates like a real node, and then sends whatever the test wants,
//! valid or not.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_runtime::frame::{FrameReader, ABSOLUTE_MAX_FRAME, PREFIX_LEN};
use courier_runtime::handshake::{HandshakeConfig, Key, Keyring};
use courier_runtime::id::{ActorId, Incarnation, LocalId, NodeId};
use courier_runtime::session::{CloseReason, Event, Role, Session, SessionConfig};
use courier_runtime::wire::{features, Reply, WireRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A connected socket of either kind.
#[derive(Debug)]
pub enum RawStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

/// What a read brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A whole frame body.
    Frame(Bytes),
    /// The peer closed the connection (or reset it).
    Closed,
    /// Nothing within the time given.
    Timeout,
}

/// A bare socket speaking length-prefixed frames.
///
/// On Unix sockets every frame body starts with a byte counting the
/// descriptors sent with it (see `courier_transports::stream`); this
/// connection adds a zero there and strips it from what it receives.
#[derive(Debug)]
pub struct RawConn {
    stream: RawStream,
    reader: FrameReader,
    fd_byte: bool,
}

impl RawConn {
    /// Connects to a `tcp://host:port` or `unix:///path` address.
    pub async fn connect(addr: &str) -> io::Result<Self> {
        let stream = if let Some(hp) = addr.strip_prefix("tcp://") {
            let s = TcpStream::connect(hp).await?;
            s.set_nodelay(true)?;
            RawStream::Tcp(s)
        } else if let Some(p) = addr.strip_prefix("unix://") {
            RawStream::Unix(UnixStream::connect(p).await?)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("raw connections speak tcp:// and unix://, not {addr}"),
            ));
        };
        Ok(Self::from_stream(stream))
    }

    /// Wraps an accepted socket.
    pub fn from_stream(stream: RawStream) -> Self {
        Self {
            fd_byte: matches!(stream, RawStream::Unix(_)),
            stream,
            reader: FrameReader::new(ABSOLUTE_MAX_FRAME - 1),
        }
    }

    /// The bytes of one frame with `body` as this link frames it.
    pub fn frame_bytes(&self, body: &[u8]) -> Vec<u8> {
        let extra = usize::from(self.fd_byte);
        let mut out = Vec::with_capacity(PREFIX_LEN + extra + body.len());
        out.extend_from_slice(&((body.len() + extra) as u32).to_be_bytes());
        if self.fd_byte {
            out.push(0);
        }
        out.extend_from_slice(body);
        out
    }

    /// Writes bytes as they are.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            RawStream::Tcp(s) => s.write_all(bytes).await,
            RawStream::Unix(s) => s.write_all(bytes).await,
        }
    }

    /// Writes one frame: the length prefix and the body.
    pub async fn send_frame(&mut self, body: &[u8]) -> io::Result<()> {
        let out = self.frame_bytes(body);
        self.write_raw(&out).await
    }

    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            RawStream::Tcp(s) => s.read(buf).await,
            RawStream::Unix(s) => s.read(buf).await,
        }
    }

    /// The next frame, the end of the connection, or a timeout.
    pub async fn recv(&mut self, within: Duration) -> Recv {
        let end = tokio::time::Instant::now() + within;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) if self.fd_byte => {
                    return match f.first() {
                        Some(0) => Recv::Frame(f.slice(1..)),
                        _ => Recv::Closed,
                    }
                }
                Ok(Some(f)) => return Recv::Frame(f),
                Ok(None) => {}
                Err(_) => return Recv::Closed,
            }
            match tokio::time::timeout_at(end, self.read_some(&mut buf)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(n)) => self.reader.push(&buf[..n]),
            }
        }
    }

    /// Reads and discards until the peer closes; `true` if it did within
    /// `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let end = tokio::time::Instant::now() + within;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(end, self.read_some(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A listening socket for a hand-driven acceptor.
#[derive(Debug)]
pub enum RawListener {
    /// TCP on loopback.
    Tcp(TcpListener),
    /// A Unix socket file.
    Unix(UnixListener),
}

impl RawListener {
    /// Listens on a free loopback port (`tcp`) or a socket file in `dir`
    /// (`unix`); returns the listener and its address.
    pub async fn bind(scheme: &str, dir: &std::path::Path) -> io::Result<(Self, String)> {
        match scheme {
            "tcp" => {
                let l = TcpListener::bind("127.0.0.1:0").await?;
                let addr = format!("tcp://{}", l.local_addr()?);
                Ok((Self::Tcp(l), addr))
            }
            "unix" => {
                let path = dir.join("raw.sock");
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)?;
                Ok((Self::Unix(l), format!("unix://{}", path.display())))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no raw listener for {other}"),
            )),
        }
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<RawConn> {
        Ok(RawConn::from_stream(match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                RawStream::Tcp(s)
            }
            Self::Unix(l) => RawStream::Unix(l.accept().await?.0),
        }))
    }
}

/// A session config for a hand-driven peer: node `id`, cookie `cookie`,
/// frame MACs asked for or not.
pub fn raw_config(id: NodeId, cookie: &[u8], mac: bool) -> SessionConfig {
    let key = Key::new("default", cookie.to_vec()).expect("cookie of 16+ bytes");
    let mut hs = HandshakeConfig::new(id, Incarnation(7), Keyring::single(key));
    hs.features = if mac { features::FRAME_MAC } else { 0 };
    SessionConfig::new(hs)
}

/// A random node id for a raw peer.
pub fn random_node_id() -> NodeId {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("randomness");
    NodeId(b)
}

fn random_nonce() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("randomness");
    b
}

/// The runtime's [`Session`] driven over a [`RawConn`] by the test.
#[derive(Debug)]
pub struct RawSession {
    /// The socket.
    pub conn: RawConn,
    /// The protocol state.
    pub session: Session,
    /// Events taken from the session and not yet handed out.
    events: std::collections::VecDeque<Event>,
    me: NodeId,
}

impl RawSession {
    /// Starts a session as `role` over `conn` (an initiator sends its hello
    /// at once). Use [`RawSession::establish`] to finish the handshake.
    pub async fn start(conn: RawConn, cfg: SessionConfig, role: Role) -> io::Result<Self> {
        let me = cfg.handshake.node;
        let session = Session::new(cfg, role, Instant::now(), random_nonce(), None)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut s = Self {
            conn,
            session,
            events: Default::default(),
            me,
        };
        s.flush().await?;
        Ok(s)
    }

    /// Connects to `addr` and authenticates with `cfg`; the peer's
    /// identity on success, the session's close reason on failure.
    pub async fn connect(addr: &str, cfg: SessionConfig) -> Result<Self, String> {
        let conn = RawConn::connect(addr).await.map_err(|e| e.to_string())?;
        let mut s = Self::start(conn, cfg, Role::Initiator)
            .await
            .map_err(|e| e.to_string())?;
        s.establish().await?;
        Ok(s)
    }

    /// Runs the handshake to its end (within 10 s).
    pub async fn establish(&mut self) -> Result<(), String> {
        loop {
            match self.next_event(Duration::from_secs(10)).await {
                Some(Event::Established(_)) => return Ok(()),
                Some(Event::Closed { reason, .. }) => return Err(reason.to_string()),
                Some(_) => {}
                None => return Err("no handshake outcome within 10 s".into()),
            }
        }
    }

    /// Writes every frame the session has queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        while let Some(f) = self.session.poll_transmit() {
            self.conn.send_frame(&f).await?;
        }
        Ok(())
    }

    /// The next event, feeding the session what arrives and keeping its
    /// heartbeats going; `None` after `within` without one. A connection
    /// the peer closed comes out as a `Closed` event.
    pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
        let end = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if let Some(e) = self.session.poll_event() {
                return Some(e);
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return None;
            }
            let slice = (end - now).min(Duration::from_millis(100));
            match self.conn.recv(slice).await {
                Recv::Frame(f) => self.session.handle_frame(Instant::now(), f),
                Recv::Closed => self.session.handle_link_lost("the peer closed"),
                Recv::Timeout => self.session.handle_timeout(Instant::now()),
            }
            let _ = self.flush().await;
        }
    }

    /// This raw peer's own node id.
    pub fn own_node(&self) -> NodeId {
        self.me
    }

    /// The peer node's id and incarnation.
    pub fn peer(&self) -> (NodeId, Incarnation) {
        let p = self.session.peer().expect("established");
        (p.node, p.incarnation)
    }

    /// An actor id on the peer.
    pub fn peer_actor(&self, local: LocalId) -> ActorId {
        let (node, incarnation) = self.peer();
        ActorId {
            node,
            incarnation,
            local,
        }
    }

    /// Sends a call and waits (10 s) for its reply, setting aside other
    /// events; `Err` with the close reason if the peer ends the session.
    pub async fn call(
        &mut self,
        target: ActorId,
        type_name: &str,
        refs: &[WireRef],
        payload: &[u8],
    ) -> Result<Reply, String> {
        let req = self
            .session
            .send_call(Instant::now(), target, type_name, refs, payload, 0)
            .map_err(|e| e.to_string())?;
        self.flush().await.map_err(|e| e.to_string())?;
        let mut kept = Vec::new();
        let result = loop {
            match self.next_event(Duration::from_secs(10)).await {
                Some(Event::Reply(r)) if r.request == req => break Ok(r),
                Some(Event::Closed { reason, .. }) => break Err(close_text(&reason)),
                Some(other) => kept.push(other),
                None => break Err("no reply within 10 s".into()),
            }
        };
        self.events.extend(kept);
        result
    }

    /// Looks a name up through the peer's root actor; the actor's id.
    pub async fn lookup(&mut self, name: &str) -> Result<ActorId, String> {
        let payload = courier_runtime::codec::encode(name).map_err(|e| e.to_string())?;
        let root = self.peer_actor(LocalId::ROOT);
        let r = self.call(root, "courier.lookup", &[], &payload).await?;
        r.refs
            .first()
            .map(|r| r.actor)
            .ok_or_else(|| format!("lookup of {name} answered {:?}", r.status))
    }

    /// Waits (up to `within`) for the session to end; its reason.
    pub async fn closed(&mut self, within: Duration) -> Option<CloseReason> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Closed { reason, .. }) => return Some(reason),
                Some(_) => {}
                None => return None,
            }
        }
    }
}

fn close_text(r: &CloseReason) -> String {
    r.to_string()
}
