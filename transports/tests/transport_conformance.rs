//! One conformance suite, run against every transport over loopback:
//! TCP (IPv4 and IPv6), Unix sockets, fd-passing (sockets handed over by
//! number) and QUIC.

mod common;

use std::task::Poll;
use std::time::Duration;

use common::*;
use courier_runtime::transport::{Frame, Link, TransportError};
use courier_transports::{LinkExt, ListenerExt};

const MIB: usize = 1024 * 1024;

/// Frames of 0 bytes, 1 byte, 64 bytes and 8 MiB arrive intact, in order
/// (unless the link says it is multiplexed), and are echoed back.
async fn sizes(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    let lens = [0usize, 1, 64, 8 * MIB, 64, 0];
    let frames: Vec<Frame> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| Frame::new(payload(i as u32, n)))
        .collect();
    let client = async {
        let got = exchange(c.as_mut(), frames, lens.len()).await;
        got
    };
    let server = async {
        for _ in 0..lens.len() {
            let f = recv_frame(s.as_mut()).await;
            s.send(Frame::new(f.payload)).await.expect("echo");
        }
    };
    let (got, ()) = within(STEP * 2, "sizes", async { tokio::join!(client, server) }).await;
    let mut expected: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| payload(i as u32, n).to_vec())
        .collect();
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|f| f.payload.to_vec()).collect();
    if c.caps().multiplexed {
        expected.sort();
        got.sort();
    }
    assert!(got == expected, "{}: frames differ", h.name);
}

/// Both ends send and receive at once, with frames large enough to fill
/// the socket buffers both ways.
async fn both_directions(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    let make = |base: u32| -> Vec<Frame> {
        (0..60u32)
            .map(|i| {
                let len = if i % 10 == 0 {
                    MIB
                } else {
                    (i as usize * 97) % 5000
                };
                Frame::new(payload(base + i, len))
            })
            .collect()
    };
    let (from_s, from_c) = within(STEP * 2, "both directions", async {
        tokio::join!(
            exchange(c.as_mut(), make(0), 60),
            exchange(s.as_mut(), make(1000), 60)
        )
    })
    .await;
    let check = |got: Vec<Frame>, base: u32, multiplexed: bool| {
        let mut want: Vec<Vec<u8>> = make(base).into_iter().map(|f| f.payload.to_vec()).collect();
        let mut got: Vec<Vec<u8>> = got.into_iter().map(|f| f.payload.to_vec()).collect();
        if multiplexed {
            want.sort();
            got.sort();
        }
        assert!(got == want, "frames differ");
    };
    let m = c.caps().multiplexed;
    check(from_s, 1000, m);
    check(from_c, 0, m);
}

/// Fifty connections at once, each echoed by its own server task.
async fn many_connections(h: Harness) {
    let mut l = h.listen().await;
    let addr = l.local_addr();
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let mut link = within(STEP, "accept", l.accept()).await.expect("accept");
            tasks.push(tokio::spawn(async move {
                while let Some(f) = link.recv().await {
                    let f = f.expect("server recv");
                    link.send(Frame::new(f.payload)).await.expect("server send");
                }
                link.close().await.expect("server close");
            }));
        }
        for t in tasks {
            within(STEP, "server task", t).await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for i in 0..50u32 {
        let mut link = h.connect(&addr).await;
        clients.push(tokio::spawn(async move {
            let p = payload(i, 100 + i as usize);
            link.send(Frame::new(p.clone())).await.expect("client send");
            let back = recv_frame(link.as_mut()).await;
            assert_eq!(back.payload, p);
            link.close().await.expect("client close");
            assert!(within(STEP, "end", link.recv()).await.is_none());
        }));
    }
    for c in clients {
        within(STEP, "client", c).await.unwrap();
    }
    within(STEP, "server", server).await.unwrap();
}

/// A clean close: every frame, then `None`, in both directions.
async fn clean_close(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    for i in 0..3 {
        c.feed(Frame::new(payload(i, 1000))).await.unwrap();
    }
    c.close().await.expect("close");
    drop(c);
    for i in 0..3 {
        let f = recv_frame(s.as_mut()).await;
        assert_eq!(f.payload, payload(i, 1000), "{}", h.name);
    }
    assert!(
        within(STEP, "end", s.recv()).await.is_none(),
        "{}: expected the end",
        h.name
    );
    assert!(within(STEP, "end again", s.recv()).await.is_none());
    s.close().await.expect("server close after the peer's end");
}

/// A peer dropped without closing: `None` or an error, never a hang.
async fn abrupt_close(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    c.send(Frame::new(payload(1, 10))).await.unwrap();
    let f = recv_frame(s.as_mut()).await;
    assert_eq!(f.payload.len(), 10);
    drop(c);
    match within(STEP, "after drop", s.recv()).await {
        None | Some(Err(_)) => {}
        Some(Ok(f)) => panic!(
            "{}: a frame of {} bytes after the drop",
            h.name,
            f.payload.len()
        ),
    }
    // Sending to the dead peer fails or is discarded; it never hangs.
    let _ = within(STEP, "send after drop", async {
        for _ in 0..3 {
            if s.send(Frame::new(payload(2, 100_000))).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Oversized frames: refused by the sender before anything is queued, and
/// by a receiver whose limit is lower than the announced length.
async fn oversized(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    c.set_max_frame_len(1024);
    assert_eq!(c.caps().max_frame_len, 1024);
    assert!(matches!(
        poll_once(|cx| c.poll_ready(cx)).await,
        Poll::Ready(Ok(()))
    ));
    match c.start_send(Frame::new(payload(0, 1025))) {
        Err(TransportError::TooLarge {
            len: 1025,
            max: 1024,
        }) => {}
        other => panic!("{}: expected TooLarge, got {other:?}", h.name),
    }
    // Nothing was queued: the next frame is the first to arrive.
    c.send(Frame::new(payload(1, 1024))).await.unwrap();
    assert_eq!(recv_frame(s.as_mut()).await.payload, payload(1, 1024));

    // The receiver refuses a frame over its own limit.
    s.set_max_frame_len(100);
    c.set_max_frame_len(usize::MAX);
    c.send(Frame::new(payload(2, 4096))).await.unwrap();
    match within(STEP, "oversized recv", s.recv()).await {
        Some(Err(TransportError::TooLarge { max: 100, .. })) => {}
        other => panic!("{}: expected TooLarge on receive, got {other:?}", h.name),
    }
    // The link is finished after the error.
    assert!(within(STEP, "after error", s.recv()).await.is_none());
}

/// Frames built in the link's own buffer (`begin_frame`, `frame_buf`,
/// `end_frame`) arrive intact and in order among frames queued with
/// `start_send`, whatever their size; one taken back or over the limit
/// never arrives.
async fn in_place(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    let lens = [0usize, 1, 64, 3000, 8192, 9000, 64, 20_000, 100, 0];
    let rounds = 20u32;
    let body = |round: u32, k: usize| payload(round * 100 + k as u32, lens[k]);
    let mut expected: Vec<Vec<u8>> = (0..rounds)
        .flat_map(|r| (0..lens.len()).map(move |k| (r, k)))
        .map(|(r, k)| body(r, k).to_vec())
        .collect();
    let name = h.name;
    let client = async {
        // A link over its send budget begins no frame: written out, it
        // must begin one again.
        async fn begin(c: &mut dyn Link, name: &str) {
            if !c.begin_frame() {
                c.flush().await.expect("flush");
                assert!(c.begin_frame(), "{name}: no frame begun on an empty queue");
            }
        }
        for round in 0..rounds {
            for k in 0..lens.len() {
                if k % 3 == 0 {
                    c.feed(Frame::new(body(round, k))).await.expect("feed");
                } else {
                    begin(c.as_mut(), name).await;
                    c.frame_buf()
                        .expect("a frame begun")
                        .extend_from_slice(&body(round, k));
                    c.end_frame(true).expect("end_frame");
                }
            }
            // Taken back: never sent.
            begin(c.as_mut(), name).await;
            c.frame_buf().unwrap().extend_from_slice(b"taken back");
            c.end_frame(false).unwrap();
            // Over the limit: refused, and nothing of it sent.
            c.set_max_frame_len(1024);
            begin(c.as_mut(), name).await;
            c.frame_buf().unwrap().extend_from_slice(&payload(0, 1025));
            match c.end_frame(true) {
                Err(TransportError::TooLarge {
                    len: 1025,
                    max: 1024,
                }) => {}
                other => panic!("{name}: expected TooLarge, got {other:?}"),
            }
            c.set_max_frame_len(usize::MAX);
        }
        c.flush().await.expect("flush");
        c.caps().multiplexed
    };
    let n = expected.len();
    let server = async {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(recv_frame(s.as_mut()).await.payload.to_vec());
        }
        got
    };
    let (multiplexed, mut got) =
        within(STEP * 2, "in place", async { tokio::join!(client, server) }).await;
    if multiplexed {
        // Large frames travel on streams of their own, in any order.
        expected.sort();
        got.sort();
    }
    assert!(got == expected, "{name}: frames differ");
}

/// Connecting to a listener that is gone fails cleanly.
async fn listener_closed(h: Harness) {
    let l = h.listen().await;
    let addr = l.local_addr();
    drop(l);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = within(STEP, "connect to a closed listener", h.try_connect(&addr)).await;
    match r {
        Err(_) => {}
        Ok(mut link) => {
            // QUIC may not learn before its first exchange; it must fail then.
            let _ = link.send(Frame::new(payload(0, 10))).await;
            match within(STEP, "recv on a link to nobody", link.recv()).await {
                Some(Err(_)) | None => {}
                Some(Ok(_)) => panic!("{}: a frame from a closed listener", h.name),
            }
        }
    }
}

/// A peer that does not read: `poll_ready` turns `Pending` after a bounded
/// amount, and everything arrives once the peer reads.
async fn backpressure(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    let size = 64 * 1024;
    let mut sent = 0usize;
    let mut pending_since: Option<tokio::time::Instant> = None;
    // The peer reads nothing; everything queued must stay bounded.
    while sent * size < 256 * MIB {
        match poll_once(|cx| c.poll_ready(cx)).await {
            Poll::Ready(Ok(())) => {
                c.start_send(Frame::new(payload(sent as u32, size)))
                    .unwrap();
                sent += 1;
                pending_since = None;
                let _ = poll_once(|cx| c.poll_flush(cx)).await;
            }
            Poll::Ready(Err(e)) => panic!("{}: poll_ready: {e}", h.name),
            Poll::Pending => {
                let since = *pending_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!("{}: backpressure after {} KiB", h.name, sent * size / 1024);
    assert!(
        pending_since.is_some(),
        "{}: {} MiB queued without backpressure",
        h.name,
        sent * size / MIB
    );
    assert!(
        sent * size <= 64 * MIB,
        "{}: {} frames accepted",
        h.name,
        sent
    );
    // Now read everything: nothing lost, nothing stuck.
    let receiver = async {
        let mut n = 0;
        while n < sent {
            let f = recv_frame(s.as_mut()).await;
            assert_eq!(f.payload.len(), size);
            n += 1;
        }
    };
    within(STEP * 2, "drain", async {
        tokio::join!(receiver, async { c.flush().await.expect("flush") })
    })
    .await;
}

/// Small frames (coalesced into shared writes) toward a peer that reads
/// nothing until the link pushes back: every frame then arrives intact
/// and in order. (Writes cut short inside a frame are tested in
/// `stream.rs`, over a pipe that takes 100 bytes at a time.)
async fn small_frames_backpressure(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    // Sizes vary so that a partial write ends inside a frame, at any
    // offset of the length prefix or body.
    let len = |i: usize| (i * 37) % 301;
    let mut sent = 0usize;
    let mut blocked = false;
    // Bounded: at most 400,000 frames (about 60 MB) if no backpressure
    // ever came, which the assertion below reports.
    while sent < 400_000 {
        match poll_once(|cx| c.poll_ready(cx)).await {
            Poll::Ready(Ok(())) => {
                c.start_send(Frame::new(payload(sent as u32, len(sent))))
                    .unwrap();
                sent += 1;
                if sent % 16 == 0 {
                    if let Poll::Ready(Err(e)) = poll_once(|cx| c.poll_flush(cx)).await {
                        panic!("{}: flush: {e}", h.name);
                    }
                }
            }
            Poll::Ready(Err(e)) => panic!("{}: poll_ready: {e}", h.name),
            Poll::Pending => {
                blocked = true;
                break;
            }
        }
    }
    assert!(
        blocked,
        "{}: {sent} small frames queued without backpressure",
        h.name
    );
    let receiver = async {
        let mut got = Vec::with_capacity(sent);
        for _ in 0..sent {
            got.push(recv_frame(s.as_mut()).await.payload);
        }
        got
    };
    let (got, flushed) = within(STEP * 2, "drain small frames", async {
        tokio::join!(receiver, c.flush())
    })
    .await;
    flushed.expect("flush");
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|b| b.to_vec()).collect();
    let mut expected: Vec<Vec<u8>> = (0..sent)
        .map(|i| payload(i as u32, len(i)).to_vec())
        .collect();
    if c.caps().multiplexed {
        expected.sort();
        got.sort();
    }
    assert!(got == expected, "{}: small frames differ", h.name);
}

/// Descriptors travel where the link can carry them, and are refused with
/// a clear error (nothing written) where it cannot.
async fn descriptors(h: Harness) {
    let (mut c, mut s) = h.pair().await;
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let frame = Frame {
        payload: payload(5, 10),
        fds: vec![w1, w2],
    };
    if !h.carries_fds() {
        assert!(!c.caps().carries_fds);
        match c.start_send(frame) {
            Err(TransportError::Cannot {
                what: "carry file descriptors",
                ..
            }) => {}
            other => panic!("{}: expected Cannot, got {other:?}", h.name),
        }
        c.send(Frame::new(payload(6, 10))).await.unwrap();
        assert_eq!(recv_frame(s.as_mut()).await.payload, payload(6, 10));
        return;
    }
    assert!(c.caps().carries_fds && c.caps().max_fds_per_frame >= 2);
    c.send(frame).await.unwrap();
    let got = recv_frame(s.as_mut()).await;
    assert_eq!(got.payload, payload(5, 10));
    assert_eq!(got.fds.len(), 2);
    write_fd(&got.fds[0], b"one");
    write_fd(&got.fds[1], b"two");
    assert_eq!(read_fd(&r1, 3), b"one");
    assert_eq!(read_fd(&r2, 3), b"two");
    for fd in &got.fds {
        let flags = rustix::io::fcntl_getfd(fd).unwrap();
        assert!(
            flags.contains(rustix::io::FdFlags::CLOEXEC),
            "received fds are close-on-exec"
        );
    }
    // A frame with too many descriptors is refused whole.
    let many: Vec<_> = (0..65).map(|_| pipe().1).collect();
    match c.start_send(Frame {
        payload: payload(7, 1),
        fds: many,
    }) {
        Err(TransportError::Cannot { .. }) => {}
        other => panic!("expected a refusal of 65 descriptors, got {other:?}"),
    }
}

macro_rules! conformance {
    ($($module:ident => $make:expr;)*) => {$(
        mod $module {
            use super::*;

            async fn run(case: impl std::future::Future<Output = ()>) {
                within(Duration::from_secs(240), stringify!($module), case).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sizes() { run(super::sizes($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn both_directions() { run(super::both_directions($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_connections() { run(super::many_connections($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn clean_close() { run(super::clean_close($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn abrupt_close() { run(super::abrupt_close($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn oversized() { run(super::oversized($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn listener_closed() { run(super::listener_closed($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn backpressure() { run(super::backpressure($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn small_frames_backpressure() { run(super::small_frames_backpressure($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn descriptors() { run(super::descriptors($make)).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_place() { run(super::in_place($make)).await }
        }
    )*};
}

conformance! {
    tcp4 => Harness::tcp4();
    tcp6 => Harness::tcp6();
    unix => Harness::unix();
    fd => Harness::fd();
    quic => Harness::quic();
}
