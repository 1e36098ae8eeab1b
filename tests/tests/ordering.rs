//! One sender's messages arrive in the order sent, whichever way each one
//! took to the connection: built straight into the link's buffer or
//! handed to the driver directly by a caller on the driver's thread, or
//! queued (a busy driver, a full outgoing queue, a caller on another
//! thread, a message carrying a blob, which never takes the first way).

use std::time::{Duration, Instant};

use actix::prelude::*;
use courier::{RemoteAddr, RemoteError};
use courier_tests::node;
use serde::{Deserialize, Serialize};

/// Records, per sender, the last sequence number seen and how many
/// arrived out of order.
#[derive(Default)]
struct SeqSink {
    last: [Option<u64>; 2],
    seen: [u64; 2],
    out_of_order: u64,
}

impl Actor for SeqSink {
    type Context = Context<Self>;
}

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
struct Seq {
    from: usize,
    n: u64,
}

#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "(u64, u64, u64)")]
struct Tally;

/// `Seq` with a blob beside it.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
struct SeqBlob {
    from: usize,
    n: u64,
    blob: courier::Blob,
}

courier::remote_message!(
    Seq = "test.order.seq",
    SeqBlob = "test.order.seq_blob",
    Tally = "test.order.tally"
);

impl SeqSink {
    fn record(&mut self, from: usize, n: u64) {
        let from = from.min(1);
        if self.last[from].is_some_and(|last| n <= last) {
            self.out_of_order += 1;
        }
        self.last[from] = Some(n);
        self.seen[from] += 1;
    }
}

impl Handler<Seq> for SeqSink {
    type Result = ();
    fn handle(&mut self, m: Seq, _: &mut Context<Self>) {
        self.record(m.from, m.n);
    }
}

impl Handler<SeqBlob> for SeqSink {
    type Result = ();
    fn handle(&mut self, m: SeqBlob, _: &mut Context<Self>) {
        assert_eq!(m.blob.len(), 8);
        self.record(m.from, m.n);
    }
}

impl Handler<Tally> for SeqSink {
    type Result = MessageResult<Tally>;
    fn handle(&mut self, _: Tally, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.seen[0], self.seen[1], self.out_of_order))
    }
}

const N: u64 = 20_000;

/// Sends `Seq { from, 0..N }`, waiting out `MailboxFull` with `pause`.
/// Bounded: gives up after a minute.
fn send_all(r: &RemoteAddr<SeqSink>, from: usize, mut pause: impl FnMut()) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..N {
        loop {
            match r.do_send(Seq { from, n }) {
                Ok(()) => break,
                Err(RemoteError::MailboxFull { .. }) if Instant::now() < deadline => pause(),
                Err(e) => return Err(format!("sender {from}, message {n}: {e}")),
            }
        }
    }
    Ok(())
}

#[test]
fn one_senders_messages_keep_their_order_on_every_path() {
    actix::System::new().block_on(async {
        let server = node(Some("tcp://127.0.0.1:0")).await;
        server
            .export(SeqSink::default().start())
            .handles::<Seq>()
            .handles::<SeqBlob>()
            .handles::<Tally>()
            .register("seq")
            .unwrap();
        let addr = server.local_addrs()[0].to_string();
        let client = node(None).await;
        let sink = client.lookup::<SeqSink>(&addr, "seq").await.unwrap();

        // Sender 1 on a thread of its own (always queued); sender 0 on the
        // arbiter, in bursts that fill the outgoing queues, so its messages
        // switch between the ways, one in seven with a blob.
        let remote = sink.clone();
        let other = std::thread::spawn(move || {
            send_all(&remote, 1, || {
                std::thread::sleep(Duration::from_micros(200))
            })
        });
        let mut burst = 0u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        for n in 0..N {
            loop {
                let sent = if n % 7 == 3 {
                    sink.do_send(SeqBlob {
                        from: 0,
                        n,
                        blob: courier::Blob::new(n.to_be_bytes().to_vec()),
                    })
                } else {
                    sink.do_send(Seq { from: 0, n })
                };
                match sent {
                    Ok(()) => break,
                    Err(RemoteError::MailboxFull { .. }) if Instant::now() < deadline => {
                        tokio::task::yield_now().await
                    }
                    Err(e) => panic!("sender 0, message {n}: {e}"),
                }
            }
            burst += 1;
            if burst == 997 {
                burst = 0;
                tokio::task::yield_now().await;
            }
        }
        // Let the other thread finish without blocking the arbiter.
        let joined = tokio::task::spawn_blocking(move || other.join())
            .await
            .unwrap();
        joined.unwrap().unwrap();

        // A call made after both senders finished arrives after all of
        // their messages.
        let (a, b, bad) = sink.send(Tally).await.unwrap();
        assert_eq!(bad, 0, "messages out of order");
        assert_eq!((a, b), (N, N), "messages lost");
    });
}
