//! The same request/reply and one-way test body over every transport:
//! tcp, unix, quic (with pinned certificates) and fd (a socketpair).

use std::sync::Arc;
use std::time::Duration;

use courier::{Node, RemoteAddr, RemoteError, Role};
use courier_tests::*;
use courier_transports::quic::{Identity, PeerTrust, QuicConfig};
use courier_transports::{AnyTransport, StreamConfig};

fn run<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

/// The body every transport must pass.
async fn request_reply_and_one_way(counter: RemoteAddr<Counter>) {
    assert_eq!(counter.send(Add(40)).await.unwrap(), Ok(40));
    assert_eq!(counter.send(Add(0)).await.unwrap(), Err(CounterError::Zero));
    for _ in 0..100 {
        counter.do_send(Bump).unwrap();
    }
    assert_eq!(counter.send(Get).await.unwrap(), 140);
    // A large payload (1 MiB) and many concurrent calls.
    let big = vec![7u8; 1 << 20];
    assert_eq!(counter.send(Blob(big)).await.unwrap(), 1 << 20);
    let calls: Vec<_> = (1..=50).map(|_| counter.send(Add(1))).collect();
    let mut last = 0;
    for c in calls {
        last = last.max(c.await.unwrap().unwrap());
    }
    assert_eq!(last, 190);
    let e = counter.send(NotHandled).await.unwrap_err();
    assert!(matches!(e, RemoteError::UnknownMessage { .. }), "{e}");
    blobs_both_ways(&counter).await;
    one_way_flood(&counter).await;
}

/// One-way messages as fast as the connection takes them, backing off
/// only when told the queues are full: every one accepted arrives.
async fn one_way_flood(counter: &RemoteAddr<Counter>) {
    const N: u64 = 50_000;
    let before = counter.send(Get).await.unwrap();
    let mut sent = 0;
    let mut full = 0u64;
    for _ in 0..10_000_000 {
        if sent == N {
            break;
        }
        match counter.do_send(Bump) {
            Ok(()) => sent += 1,
            Err(RemoteError::MailboxFull { .. }) => {
                full += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("one-way message {sent} refused: {e}"),
        }
    }
    assert_eq!(sent, N, "{full} refusals");
    let total = counter
        .send(Get)
        .timeout(Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(total, before + N);
}

/// Blobs of many sizes (empty, around the small-frame limits, 3 MiB), in
/// a structure, out and back: every byte arrives, in its place.
async fn blobs_both_ways(counter: &RemoteAddr<Counter>) {
    let pattern = |len: usize, seed: u8| -> courier::Blob {
        courier::Blob::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>(),
        )
    };
    let first = pattern(3 << 20, 1);
    let rest = vec![
        Some(pattern(0, 2)),
        None,
        Some(pattern(1, 3)),
        Some(pattern(4095, 4)),
        Some(pattern(65_537, 5)),
    ];
    let total = first.len() + rest.iter().flatten().map(|b| b.len()).sum::<usize>();
    let back = counter
        .send(EchoBlobs {
            first: first.clone(),
            rest: rest.clone(),
            note: "blobs".into(),
        })
        .await
        .unwrap();
    assert_eq!(back.total, total);
    let heads: Vec<Option<u8>> = std::iter::once(Some(&first))
        .chain(rest.iter().map(Option::as_ref))
        .map(|b| b.and_then(|b| b.first().copied()))
        .collect();
    assert_eq!(back.heads, heads, "the blobs arrived out of place");
    assert!(back.first == first, "the 3 MiB blob came back changed");
    assert_eq!(back.rest, rest);
    // A blob past the frame limit (16 MiB by default) is refused before
    // anything is written, and the connection goes on.
    let e = counter
        .send(EchoBlobs {
            first: courier::Blob::from(vec![0u8; (16 << 20) + 1]),
            rest: vec![],
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::TooLarge { .. }), "{e}");
    // A reply past it is refused on the remote node, and the caller is
    // told so instead of waiting for ever.
    assert_eq!(counter.send(MakeBlob(100)).await.unwrap().len(), 100);
    let e = counter
        .send(MakeBlob((16 << 20) + 1))
        .timeout(Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    assert!(counter.send(Get).await.is_ok());
}

async fn over_address(listen: &str, transport: Option<Arc<dyn courier::Transport>>) {
    let mut sb = Node::builder().cookie(COOKIE).listen(listen);
    let mut cb = Node::builder().cookie(COOKIE);
    if let Some(t) = transport {
        sb = sb.transport(t.clone());
        cb = cb.transport(t);
    }
    let server = sb.start().await.unwrap();
    export_counter(&server, "counter");
    let addr = server.local_addrs()[0].to_string();
    let client = cb.start().await.unwrap();
    let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
    request_reply_and_one_way(counter).await;
}

#[test]
fn over_tcp() {
    run(over_address("tcp://127.0.0.1:0", None));
}

#[test]
fn over_tcp_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    run(over_address("tcp://[::1]:0", None));
}

#[test]
fn over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    run(over_address(&format!("unix://{}", path.display()), None));
}

#[test]
fn over_quic() {
    let id = Identity::generate("courier-test").unwrap();
    let trust = PeerTrust::pinned([id.fingerprint()]);
    let t = AnyTransport::builder()
        .quic(QuicConfig::new(id, trust))
        .build()
        .unwrap();
    run(over_address("quic://127.0.0.1:0", Some(Arc::new(t))));
}

#[test]
fn over_fd_socketpair() {
    run(async {
        let (a, b) = courier_transports::fd::socketpair(&StreamConfig::default()).unwrap();
        let server = node(None).await;
        export_counter(&server, "counter");
        let client = node(None).await;
        let (s, c) = tokio::join!(
            server.add_link(a, Role::Acceptor, "fd"),
            client.add_link(b, Role::Initiator, "fd")
        );
        assert_eq!(s.unwrap().node, client.id());
        let peer = c.unwrap();
        assert_eq!(peer.node, server.id());
        let counter = client
            .lookup_on::<Counter>(server.id(), "counter")
            .await
            .unwrap();
        request_reply_and_one_way(counter).await;
    });
}

#[test]
fn quic_refuses_an_unpinned_peer() {
    run(async {
        let server_id = Identity::generate("server").unwrap();
        let client_id = Identity::generate("client").unwrap();
        // The server trusts only itself; the client trusts the server.
        let st = AnyTransport::builder()
            .quic(QuicConfig::new(
                server_id.clone(),
                PeerTrust::pinned([server_id.fingerprint()]),
            ))
            .build()
            .unwrap();
        let ct = AnyTransport::builder()
            .quic(QuicConfig::new(
                client_id,
                PeerTrust::pinned([server_id.fingerprint()]),
            ))
            .build()
            .unwrap();
        let server = Node::builder()
            .cookie(COOKIE)
            .listen("quic://127.0.0.1:0")
            .transport(Arc::new(st))
            .start()
            .await
            .unwrap();
        export_counter(&server, "counter");
        let addr = server.local_addrs()[0].to_string();
        let client = Node::builder()
            .cookie(COOKIE)
            .transport(Arc::new(ct))
            .limits(courier::Limits {
                connect_timeout: Duration::from_secs(5),
                ..courier::Limits::default()
            })
            .start()
            .await
            .unwrap();
        let e = client
            .lookup::<Counter>(&addr, "counter")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                RemoteError::Unreachable { .. } | RemoteError::Protocol { .. }
            ),
            "{e}"
        );
        assert_eq!(server.stats().calls_in, 0);
    });
}

#[test]
fn over_tcp_with_frame_macs() {
    // Loopback turns MACs off by default; a node that insists gets them,
    // whatever the other side prefers.
    run(async {
        let server = Node::builder()
            .cookie(COOKIE)
            .listen("tcp://127.0.0.1:0")
            .frame_mac(courier::FrameMac::Always)
            .start()
            .await
            .unwrap();
        export_counter(&server, "counter");
        let addr = server.local_addrs()[0].to_string();
        let client = Node::builder().cookie(COOKIE).start().await.unwrap();
        let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
        request_reply_and_one_way(counter).await;
    });
}
