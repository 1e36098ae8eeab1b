//! Frame integrity on TCP: an on-path attacker (a proxy in the test that
//! forwards bytes) flips one byte of a frame, or injects a frame, after the
//! handshake. With frame MACs the connection closes with a protocol error
//! and the altered message is never delivered; with MACs turned off on both
//! sides, the same flip is delivered, which is what the MAC is for.
//!
//! `FrameMac::Auto` turns MACs on for TCP except to loopback addresses
//! (an attacker there is already on the host), so these tests, which must
//! run on loopback, ask for them with `FrameMac::Always`: what a link to
//! another machine gets by default.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier::{FrameMac, Node, RemoteError};
use courier_runtime::frame::FrameReader;
use courier_runtime::wire::{encode_call, CallHeader, TAG_LEN};
use courier_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SLACK: Duration = Duration::from_secs(5);

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

/// What the proxy does to the next frame from the client.
#[derive(Clone, Debug, PartialEq)]
enum Tamper {
    Pass,
    /// Flip the last byte before the MAC tag (the payload's last byte).
    Flip {
        mac: bool,
    },
    /// Put this frame before it.
    Inject(Bytes),
}

/// An on-path attacker: forwards one connection to `to`, parsing the
/// client's frames so it can alter or inject whole frames.
async fn proxy(to: String) -> (String, Arc<Mutex<Tamper>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let tamper = Arc::new(Mutex::new(Tamper::Pass));
    let t = tamper.clone();
    actix::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to.trim_start_matches("tcp://"))
            .await
            .unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        actix::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let mut reader = FrameReader::new(1 << 30);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reader.push(&buf[..n]);
            while let Ok(Some(frame)) = reader.next_frame() {
                let mode = std::mem::replace(&mut *t.lock().unwrap(), Tamper::Pass);
                let mut body = frame.to_vec();
                match mode {
                    Tamper::Pass => {}
                    Tamper::Flip { mac } => {
                        let at = body.len() - 1 - if mac { TAG_LEN } else { 0 };
                        body[at] ^= 0x01;
                    }
                    Tamper::Inject(extra) => {
                        let mut out = (extra.len() as u32).to_be_bytes().to_vec();
                        out.extend_from_slice(&extra);
                        if sw.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                }
                let mut out = (body.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&body);
                if sw.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    });
    (addr, tamper)
}

async fn server(mac: FrameMac) -> (Node, String) {
    let node = Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_secs(1), Duration::from_secs(10))
        .frame_mac(mac)
        .listen("tcp://127.0.0.1:0")
        .start()
        .await
        .unwrap();
    export_counter(&node, "counter");
    let addr = node.local_addrs()[0].to_string();
    (node, addr)
}

async fn client(mac: FrameMac) -> Node {
    Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_secs(1), Duration::from_secs(10))
        .frame_mac(mac)
        .start()
        .await
        .unwrap()
}

/// The counter's total, read by an honest peer on its own connection.
async fn total(addr: &str) -> u64 {
    let honest = honest_node().await;
    let c = honest.lookup::<Counter>(addr, "counter").await.unwrap();
    c.send(Get).await.unwrap()
}

async fn expect_protocol_close(r: Result<Result<u64, CounterError>, RemoteError>) {
    match r {
        Err(RemoteError::ConnectionLost { reason, .. }) => {
            assert!(reason.contains("integrity"), "{reason}")
        }
        other => panic!("expected the connection to close, got {other:?}"),
    }
}

#[test]
fn a_flipped_byte_after_the_handshake_closes_the_connection_undelivered() {
    run(async {
        let (srv, addr) = server(FrameMac::Always).await;
        let (via, tamper) = proxy(addr.clone()).await;
        let c = client(FrameMac::Always).await;
        let counter = c.lookup::<Counter>(&via, "counter").await.unwrap();
        assert_eq!(counter.send(Add(10)).await.unwrap(), Ok(10));
        let calls = srv.stats().calls_in;

        *tamper.lock().unwrap() = Tamper::Flip { mac: true };
        let r = counter.send(Add(7)).timeout(SLACK).await;
        expect_protocol_close(r).await;
        assert_eq!(total(&addr).await, 10, "the altered Add was not applied");
        assert_eq!(
            srv.stats().calls_in,
            calls + 2,
            "only the honest lookup and Get arrived"
        );
        assert!(counter.send(Get).await.is_err(), "the reference is dead");
        // A fresh lookup through a clean path works.
        let again = c.lookup::<Counter>(&addr, "counter").await.unwrap();
        assert_eq!(again.send(Add(1)).await.unwrap(), Ok(11));
    });
}

#[test]
fn an_injected_frame_after_the_handshake_closes_the_connection_undelivered() {
    run(async {
        let (srv, addr) = server(FrameMac::Always).await;
        let (via, tamper) = proxy(addr.clone()).await;
        let c = client(FrameMac::Always).await;
        let counter = c.lookup::<Counter>(&via, "counter").await.unwrap();
        assert_eq!(counter.send(Add(10)).await.unwrap(), Ok(10));
        let id = counter.id().unwrap();

        // A well-formed one-way Bump to the counter, with a made-up tag.
        let mut forged = bytes::BytesMut::new();
        let header = CallHeader {
            request: 0,
            incarnation: id.incarnation,
            target: id.local,
            fds: 0,
        };
        encode_call(&mut forged, &header, "test.counter.bump", &[], &[0xf6]);
        forged.extend_from_slice(&[0xab; TAG_LEN]);
        *tamper.lock().unwrap() = Tamper::Inject(forged.freeze());
        let r = counter.send(Add(5)).timeout(SLACK).await;
        expect_protocol_close(r).await;
        assert_eq!(
            total(&addr).await,
            10,
            "neither the Bump nor the Add arrived"
        );
        drop(srv);
    });
}

#[test]
fn without_macs_the_same_flip_is_delivered() {
    run(async {
        let (_srv, addr) = server(FrameMac::Never).await;
        let (via, tamper) = proxy(addr.clone()).await;
        let c = client(FrameMac::Never).await;
        let counter = c.lookup::<Counter>(&via, "counter").await.unwrap();
        assert_eq!(counter.send(Add(10)).await.unwrap(), Ok(10));
        *tamper.lock().unwrap() = Tamper::Flip { mac: false };
        // Add(7) is CBOR 0x07 as the payload's last byte; flipped: Add(6).
        assert_eq!(counter.send(Add(7)).await.unwrap(), Ok(16));
        assert_eq!(total(&addr).await, 16);
    });
}

#[test]
fn one_side_asking_for_macs_is_enough() {
    run(async {
        let (srv, addr) = server(FrameMac::Never).await;
        let (via, tamper) = proxy(addr.clone()).await;
        let c = client(FrameMac::Always).await;
        let counter = c.lookup::<Counter>(&via, "counter").await.unwrap();
        assert_eq!(counter.send(Add(10)).await.unwrap(), Ok(10));
        *tamper.lock().unwrap() = Tamper::Flip { mac: true };
        let r = counter.send(Add(7)).timeout(SLACK).await;
        expect_protocol_close(r).await;
        assert_eq!(total(&addr).await, 10);
        drop(srv);
    });
}
