//! Courier's demo. For now it runs the protocol core in memory: two nodes
//! authenticate, exchange a typed call and reply, a node with the wrong key
//! is refused, and a peer that falls silent is declared dead with its
//! pending call failed. (Real processes and transports come with the actors
//! layer.)

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_runtime::codec;
use courier_runtime::error::RemoteError;
use courier_runtime::handshake::{HandshakeConfig, Key, Keyring};
use courier_runtime::id::{ActorId, Incarnation, LocalId, NodeId};
use courier_runtime::session::{CloseReason, Event, Role, Session, SessionConfig};
use courier_runtime::wire::ReplyStatus;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
struct Add(u64);

fn node(n: u8, cookie: &str) -> SessionConfig {
    let key = Key::new("default", cookie.as_bytes().to_vec()).expect("cookie is long enough");
    SessionConfig::new(HandshakeConfig::new(
        NodeId([n; 16]),
        Incarnation(u64::from(n) << 32 | 1),
        Keyring::single(key),
    ))
}

/// Moves frames both ways until nothing moves; returns what each side saw.
fn shuttle(now: Instant, a: &mut Session, b: &mut Session) -> (Vec<Event>, Vec<Event>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    let mut wire: VecDeque<(bool, Bytes)> = VecDeque::new();
    for _ in 0..1000 {
        while let Some(f) = a.poll_transmit() {
            wire.push_back((true, f));
        }
        while let Some(f) = b.poll_transmit() {
            wire.push_back((false, f));
        }
        let Some((to_b, f)) = wire.pop_front() else { break };
        if to_b {
            b.handle_frame(now, f);
        } else {
            a.handle_frame(now, f);
        }
        ea.extend(std::iter::from_fn(|| a.poll_event()));
        eb.extend(std::iter::from_fn(|| b.poll_event()));
    }
    (ea, eb)
}

fn main() -> Result<(), RemoteError> {
    let cookie = "demo cookie, 16+ bytes";
    let now = Instant::now();
    println!("== two nodes authenticate (mutual HMAC-SHA256) ==");
    let mut alpha = Session::new(node(1, cookie), Role::Initiator, now, [0xa1; 32], None)
        .expect("valid config");
    let mut beta = Session::new(node(2, cookie), Role::Acceptor, now, [0xb2; 32], None)
        .expect("valid config");
    let (ea, _) = shuttle(now, &mut alpha, &mut beta);
    if let Some(Event::Established(peer)) = ea.first() {
        println!("alpha: authenticated node {} (key {:?})", peer.node, peer.key_id);
    }

    println!("\n== a typed call and its reply ==");
    let peer = alpha.peer().expect("established").clone();
    let counter = ActorId {
        node: peer.node,
        incarnation: peer.incarnation,
        local: LocalId {
            index: 1,
            generation: 0,
        },
    };
    let req = alpha.send_call(now, counter, "counter.add", &[], &codec::encode(&Add(5))?, 0)?;
    println!("alpha -> beta: counter.add(5) as request {req}");
    let (_, eb) = shuttle(now, &mut alpha, &mut beta);
    let mut total = 37u64;
    for ev in eb {
        if let Event::Call(call) = ev {
            let Add(n) = codec::decode(&call.payload)?;
            total += n;
            println!("beta: {} {n} for actor {}, total now {total}", call.type_name(), call.header.target);
            beta.send_reply(now, call.header.request, ReplyStatus::Ok, &[], &codec::encode(&total)?, 0)?;
        }
    }
    let (ea, _) = shuttle(now, &mut alpha, &mut beta);
    for ev in ea {
        if let Event::Reply(r) = ev {
            let v: u64 = codec::decode(&r.payload)?;
            println!("alpha: reply to request {}: Ok({v})", r.request);
        }
    }

    println!("\n== a node with the wrong cookie is refused ==");
    let mut mallory = Session::new(node(3, "not the right cookie"), Role::Initiator, now, [0x33; 32], None)
        .expect("valid config");
    let mut beta2 = Session::new(node(2, cookie), Role::Acceptor, now, [0xb3; 32], None)
        .expect("valid config");
    let (em, eb) = shuttle(now, &mut mallory, &mut beta2);
    for (who, evs) in [("mallory", em), ("beta", eb)] {
        if let Some(Event::Closed { reason, .. }) = evs.last() {
            println!("{who}: {reason}");
        }
    }

    println!("\n== beta falls silent; alpha declares it dead ==");
    let req = alpha.send_call(now, counter, "counter.add", &[], &codec::encode(&Add(1))?, 0)?;
    let mut t = now;
    for _ in 0..100 {
        while alpha.poll_transmit().is_some() {}
        let Some(next) = alpha.poll_timeout() else { break };
        t = next;
        alpha.handle_timeout(t);
        if let Some(Event::Closed { reason, pending }) = alpha.poll_event() {
            let silent = match reason {
                CloseReason::HeartbeatTimeout { silent_for } => silent_for,
                _ => Duration::ZERO,
            };
            println!("alpha: {reason}");
            for p in pending {
                let err = RemoteError::ConnectionLost {
                    peer: peer.node,
                    reason: format!("no heartbeat for {silent:?}"),
                };
                println!("alpha: request {p} (was {req}) failed: {err}");
            }
            break;
        }
    }
    println!("(virtual time elapsed: {:?})", t - now);
    Ok(())
}
