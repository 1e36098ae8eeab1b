//! TCP links: `tcp://host:port`.
//!
//! Connections set `TCP_NODELAY` (frames are batched by the link itself, so
//! Nagle's delay would only add latency). Hosts may be names, IPv4 or
//! bracketed IPv6 literals (`tcp://[::1]:7000`). Listening on port 0 picks a
//! free port; [`Listener::local_addr`] reports it. Frames use runtime's plain
//! length-prefixed format (see [`crate::stream`]); descriptors cannot travel.

use std::fmt;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use courier_runtime::transport::{
    Address, AddressError, BoxFut, Link, Listener, Transport, TransportError,
};
use tokio::net::{TcpListener, TcpStream};

use crate::stream::{PlainStream, StreamConfig, StreamLink};

/// The TCP transport.
#[derive(Clone, Debug, Default)]
pub struct TcpTransport {
    cfg: StreamConfig,
}

impl TcpTransport {
    /// A TCP transport with the given stream settings.
    pub fn new(cfg: StreamConfig) -> Self {
        Self { cfg }
    }
}

impl Transport for TcpTransport {
    fn connect(&self, to: &Address) -> BoxFut<'static, Result<Box<dyn Link>, TransportError>> {
        let cfg = self.cfg.clone();
        let to = to.clone();
        Box::pin(async move {
            let (host, port) = tcp_parts(&to)?;
            let op = format!("connect to {to}");
            let attempt = async {
                let addrs = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| TransportError::io(format!("resolve {host} for {to}"), e))?;
                let mut last = None;
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = Some(e),
                    }
                }
                Err(TransportError::io(
                    op.clone(),
                    last.unwrap_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the host name resolved to no address",
                        )
                    }),
                ))
            };
            let stream = match tokio::time::timeout(cfg.connect_timeout, attempt).await {
                Ok(r) => r?,
                Err(_) => return Err(TransportError::io(op, std::io::ErrorKind::TimedOut.into())),
            };
            Ok(Box::new(tcp_link(stream, None, &cfg)?) as Box<dyn Link>)
        })
    }

    fn listen(&self, at: &Address) -> BoxFut<'static, Result<Box<dyn Listener>, TransportError>> {
        let cfg = self.cfg.clone();
        let at = at.clone();
        Box::pin(async move {
            let (host, port) = tcp_parts(&at)?;
            let op = format!("listen on {at}");
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| TransportError::io(op.clone(), e))?
                .next()
                .ok_or_else(|| {
                    TransportError::io(
                        op.clone(),
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the host name resolved to no address",
                        ),
                    )
                })?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| TransportError::io(op.clone(), e))?;
            tcp_listener(listener, cfg).map(|l| Box::new(l) as Box<dyn Listener>)
        })
    }
}

fn tcp_parts(a: &Address) -> Result<(String, u16), TransportError> {
    match a {
        Address::Tcp { host, port } => Ok((host.clone(), *port)),
        other => Err(AddressError {
            address: other.to_string(),
            problem: "the tcp transport takes tcp:// addresses".into(),
        }
        .into()),
    }
}

/// The address text of a socket address, as a `tcp://` address.
pub(crate) fn tcp_address(addr: SocketAddr) -> Address {
    Address::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// Wraps a connected TCP stream as a link (setting `TCP_NODELAY`).
pub(crate) fn tcp_link(
    stream: TcpStream,
    adopted: Option<crate::sys::AdoptGuard>,
    cfg: &StreamConfig,
) -> Result<StreamLink<PlainStream<TcpStream>>, TransportError> {
    let peer = stream
        .peer_addr()
        .map(|a| tcp_address(a).to_string())
        .unwrap_or_else(|_| "tcp://(unknown peer)".into());
    stream
        .set_nodelay(true)
        .map_err(|e| TransportError::io(format!("set TCP_NODELAY on {peer}"), e))?;
    Ok(StreamLink::new(
        PlainStream::new(stream, "tcp", adopted),
        peer,
        false,
        cfg,
    ))
}

/// Wraps a listening TCP socket.
pub(crate) fn tcp_listener(
    listener: TcpListener,
    cfg: StreamConfig,
) -> Result<TcpLinkListener, TransportError> {
    let local = listener
        .local_addr()
        .map_err(|e| TransportError::io("read the bound tcp address", e))?;
    Ok(TcpLinkListener {
        listener,
        local: tcp_address(local),
        cfg,
        _adopted: None,
    })
}

/// A listening TCP socket.
pub(crate) struct TcpLinkListener {
    listener: TcpListener,
    local: Address,
    cfg: StreamConfig,
    pub(crate) _adopted: Option<crate::sys::AdoptGuard>,
}

impl fmt::Debug for TcpLinkListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("local", &self.local.to_string())
            .finish()
    }
}

impl Listener for TcpLinkListener {
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
                Poll::Ready(tcp_link(stream, None, &self.cfg).map(|l| Box::new(l) as Box<dyn Link>))
            }
        }
    }
}
