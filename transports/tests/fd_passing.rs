//! Descriptor passing: many descriptors, none leaked, truncated or
//! misattributed control data refused (and every descriptor closed).
//!
//! These tests count this process's open descriptors, so they run one at a
//! time (a lock) and in their own test binary.

mod common;

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use common::*;
use courier_runtime::transport::{Frame, Link, TransportError};
use courier_transports::fd::{link_from_fd, socketpair};
use courier_transports::{LinkExt, StreamConfig};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `f` alone, on a runtime of its own, and checks that the process has
/// as many open descriptors afterwards as before.
fn serial(f: impl std::future::Future<Output = ()>) {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    // Tokio opens a few process-wide descriptors (the signal driver's
    // socketpair) with its first runtime and keeps them: open them first.
    drop(runtime());
    let before = open_fds();
    let rt = runtime();
    rt.block_on(f);
    drop(rt);
    if open_fds() != before {
        for e in std::fs::read_dir("/proc/self/fd").unwrap() {
            let e = e.unwrap();
            eprintln!("{:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()));
        }
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
}

/// 10,000 pipe ends travel, 8 per frame, each usable on the other side, and
/// the descriptor count ends where it began.
#[test]
fn ten_thousand_descriptors_none_leaked() {
    serial(async {
        let (mut a, mut b) = socketpair(&StreamConfig::default()).unwrap();
        const PER_FRAME: usize = 8;
        const FRAMES_PER_ROUND: usize = 25;
        const TOTAL: usize = 10_000;
        let mut passed = 0usize;
        let mut round = 0u32;
        within(STEP * 3, "10,000 descriptors", async {
            while passed < TOTAL {
                // Send a round of frames, keeping the read ends here.
                let mut readers: Vec<OwnedFd> = Vec::new();
                for f in 0..FRAMES_PER_ROUND {
                    let mut fds = Vec::new();
                    for _ in 0..PER_FRAME {
                        let (r, w) = pipe();
                        readers.push(r);
                        fds.push(w);
                    }
                    let tag = (round as usize * FRAMES_PER_ROUND + f) as u32;
                    a.feed(Frame {
                        payload: tag.to_be_bytes().to_vec().into(),
                        fds,
                    })
                    .await
                    .unwrap();
                }
                a.flush().await.unwrap();
                // Receive them; write through every descriptor.
                for f in 0..FRAMES_PER_ROUND {
                    let got = recv_frame(b.as_mut()).await;
                    let tag = (round as usize * FRAMES_PER_ROUND + f) as u32;
                    assert_eq!(&got.payload[..], &tag.to_be_bytes());
                    assert_eq!(got.fds.len(), PER_FRAME);
                    for (i, fd) in got.fds.iter().enumerate() {
                        write_fd(fd, &[(f * PER_FRAME + i) as u8]);
                    }
                    passed += PER_FRAME;
                }
                // Read back through the matching read ends.
                for (i, r) in readers.iter().enumerate() {
                    assert_eq!(read_fd(r, 1), [i as u8], "descriptor {i} of round {round}");
                }
                round += 1;
            }
        })
        .await;
        assert_eq!(passed, TOTAL);
        a.close().await.unwrap();
        assert!(within(STEP, "end", b.recv()).await.is_none());
    });
}

/// A raw Unix socket for playing a misbehaving sender, and a link on the
/// other end.
fn raw_and_link() -> (OwnedFd, Box<dyn Link>) {
    let (raw, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    (raw, link_from_fd(theirs, &StreamConfig::default()).unwrap())
}

/// Sends `data` with `fds` attached, as one `sendmsg`.
fn raw_send(sock: &OwnedFd, data: &[u8], fds: &[OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, data.len());
}

/// A frame on an fd link: length, descriptor count, payload.
fn wire_frame(nfds: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(nfds);
    v.extend_from_slice(payload);
    v
}

/// More descriptors in one message than a frame may carry: the kernel
/// truncates the control data (`MSG_CTRUNC`), the link reports it, and every
/// descriptor that did arrive is closed.
#[test]
fn truncated_control_data_is_reported_and_nothing_leaks() {
    serial(async {
        let (raw, mut link) = raw_and_link();
        let fds: Vec<OwnedFd> = (0..100).map(|_| pipe().1).collect();
        raw_send(&raw, &wire_frame(100, b"x"), &fds);
        drop(fds);
        match within(STEP, "recv", link.recv()).await {
            Some(Err(TransportError::FdsTruncated)) => {}
            other => panic!("expected FdsTruncated, got {other:?}"),
        }
        assert!(within(STEP, "after", link.recv()).await.is_none());
    });
}

/// Descriptors sent with a frame that announces none are refused, and
/// closed.
#[test]
fn descriptors_no_frame_claims_are_refused() {
    serial(async {
        let (raw, mut link) = raw_and_link();
        let fds: Vec<OwnedFd> = (0..3).map(|_| pipe().1).collect();
        let mut data = wire_frame(0, b"first");
        data.extend_from_slice(&wire_frame(0, b"second"));
        raw_send(&raw, &data, &fds);
        drop(fds);
        // A later frame, beyond the bytes the descriptors came with.
        raw_send(&raw, &wire_frame(0, b"third"), &[]);
        // The first frames may be handed over; the stray descriptors are
        // found no later than the next frame read past them.
        let mut refused = false;
        for _ in 0..3 {
            match within(STEP, "recv", link.recv()).await {
                Some(Ok(f)) => assert!(f.fds.is_empty()),
                Some(Err(TransportError::Framing(_))) => {
                    refused = true;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused, "stray descriptors were accepted");

        // The same at end of stream.
        let (raw, mut link) = raw_and_link();
        let fds: Vec<OwnedFd> = (0..3).map(|_| pipe().1).collect();
        raw_send(&raw, &wire_frame(0, b"only"), &fds);
        drop(fds);
        drop(raw);
        assert!(matches!(
            within(STEP, "recv", link.recv()).await,
            Some(Ok(_))
        ));
        assert!(matches!(
            within(STEP, "recv", link.recv()).await,
            Some(Err(TransportError::Framing(_)))
        ));
    });
}

/// A frame announcing descriptors that did not come with it is refused.
#[test]
fn announced_descriptors_must_arrive_with_the_frame() {
    serial(async {
        let (raw, mut link) = raw_and_link();
        raw_send(&raw, &wire_frame(2, b"where are they"), &[]);
        match within(STEP, "recv", link.recv()).await {
            Some(Err(TransportError::Framing(m))) => assert!(m.contains("2 descriptors"), "{m}"),
            other => panic!("expected a framing error, got {other:?}"),
        }
        // And a count that does not match what came.
        let (raw, mut link) = raw_and_link();
        let fds: Vec<OwnedFd> = (0..2).map(|_| pipe().1).collect();
        raw_send(&raw, &wire_frame(3, b"three?"), &fds);
        drop(fds);
        assert!(matches!(
            within(STEP, "recv", link.recv()).await,
            Some(Err(TransportError::Framing(_)))
        ));
        // An announced count over the cap.
        let (raw, mut link) = raw_and_link();
        raw_send(&raw, &wire_frame(200, b"x"), &[]);
        assert!(matches!(
            within(STEP, "recv", link.recv()).await,
            Some(Err(TransportError::Framing(_)))
        ));
    });
}

/// Frames with descriptors mixed with plain frames and large payloads,
/// queued together and written in batches, keep their descriptors.
#[test]
fn descriptors_stay_with_their_frames_in_batches() {
    serial(async {
        let (mut a, mut b) = socketpair(&StreamConfig::default()).unwrap();
        let mut readers = Vec::new();
        let mut frames = Vec::new();
        for i in 0..200u32 {
            let nfds = (i % 4) as usize; // 0..=3 descriptors
            let len = if i % 17 == 0 {
                300_000
            } else {
                (i as usize * 31) % 2000
            };
            let mut fds = Vec::new();
            for _ in 0..nfds {
                let (r, w) = pipe();
                readers.push((i, r));
                fds.push(w);
            }
            frames.push(Frame {
                payload: payload(i, len),
                fds,
            });
        }
        let got = within(STEP * 2, "batches", async {
            let (got, ()) = tokio::join!(exchange(b.as_mut(), Vec::new(), 200), async {
                for f in frames {
                    a.feed(f).await.unwrap();
                }
                a.flush().await.unwrap();
            });
            got
        })
        .await;
        for (i, f) in got.iter().enumerate() {
            let i = i as u32;
            assert_eq!(f.payload, payload(i, f.payload.len()));
            assert_eq!(f.fds.len(), (i % 4) as usize, "frame {i}");
            for fd in &f.fds {
                write_fd(fd, &i.to_be_bytes());
            }
        }
        for (i, r) in &readers {
            assert_eq!(read_fd(r, 4), i.to_be_bytes(), "descriptor of frame {i}");
        }
    });
}
