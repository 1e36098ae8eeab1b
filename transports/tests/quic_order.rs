//! QUIC keeps small frames in the order they were sent, however they were
//! grouped onto streams: alone, in batches cut by size or count, or around
//! large frames that travel on streams of their own.

mod common;

use common::*;
use courier_runtime::transport::Frame;

#[tokio::test]
async fn small_frames_keep_their_order_across_batches_and_large_frames() {
    let (mut c, mut s) = Harness::quic().pair().await;
    // 3,000 frames: sizes from 0 to 8 KiB (so batches are cut by the byte
    // limit as well as by the frame count), and every 500th one 256 KiB.
    let len = |i: u32| -> usize {
        if i % 500 == 250 {
            256 * 1024
        } else {
            ((i as usize) * 131) % 8193
        }
    };
    const N: u32 = 3_000;
    let frames: Vec<Frame> = (0..N).map(|i| Frame::new(payload(i, len(i)))).collect();
    let server = async {
        let mut got = Vec::new();
        for _ in 0..N {
            got.push(recv_frame(s.as_mut()).await.payload);
        }
        got
    };
    let (sent, got) = within(STEP * 2, "3,000 frames", async {
        tokio::join!(exchange(c.as_mut(), frames, 0), server)
    })
    .await;
    assert!(sent.is_empty());
    // Small frames in send order; the large ones whole, wherever they fell.
    let small: Vec<_> = (0..N).filter(|&i| len(i) <= 8192).collect();
    let got_small: Vec<_> = got.iter().filter(|p| p.len() <= 8192).collect();
    assert_eq!(got_small.len(), small.len(), "small frames lost");
    for (k, &i) in small.iter().enumerate() {
        assert!(
            *got_small[k] == payload(i, len(i)),
            "small frame {k} is not frame {i}: out of order or damaged"
        );
    }
    let mut large: Vec<_> = got.iter().filter(|p| p.len() > 8192).cloned().collect();
    large.sort();
    let mut want: Vec<_> = (0..N)
        .filter(|&i| len(i) > 8192)
        .map(|i| payload(i, len(i)))
        .collect();
    want.sort();
    assert!(large == want, "large frames lost or damaged");
}

/// A flood of small frames toward a reader that falls behind: the sender
/// runs ahead by thousands of frames spread over many streams, and the
/// reader must still get every one in order, neither failing on how many
/// overtook an earlier one nor holding an unbounded number of them.
#[tokio::test]
async fn a_flood_of_small_frames_toward_a_slow_reader_arrives_in_order() {
    let (mut c, mut s) = Harness::quic().pair().await;
    const N: u32 = 100_000;
    let frames: Vec<Frame> = (0..N).map(|i| Frame::new(payload(i, 64))).collect();
    let server = async {
        let mut next = 0u32;
        while next < N {
            // Reads in bursts with pauses, so batches pile up meanwhile.
            for _ in 0..20_000 {
                if next == N {
                    break;
                }
                let f = recv_frame(s.as_mut()).await;
                assert!(
                    f.payload == payload(next, 64),
                    "frame {next} is out of order or damaged"
                );
                next += 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
    };
    let (sent, ()) = within(STEP * 2, "100,000 frames", async {
        tokio::join!(exchange(c.as_mut(), frames, 0), server)
    })
    .await;
    assert!(sent.is_empty());
}
