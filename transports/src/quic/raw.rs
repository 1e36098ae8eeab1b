//! The "raw QUIC" baseline for benchmarks: one quinn bidirectional stream,
//! with the same TLS settings and windows as Courier's links.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_runtime::transport::TransportError;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, VarInt};

use super::{transport_config, Identity, PeerTrust, QuicConfig, QuicTransport};

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
