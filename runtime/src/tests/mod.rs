//! Deterministic tests of the core: two (or three) sessions joined by frame
//! queues under a virtual clock. No sockets, no timers, no threads.

mod handshake;
mod refs_prop;
mod session;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::handshake::{HandshakeConfig, Key, Keyring};
use crate::id::{Incarnation, NodeId};
use crate::session::{Event, Role, Session, SessionConfig};

pub(crate) fn key(secret: &str) -> Key {
    Key::new("default", secret.as_bytes().to_vec()).unwrap()
}

pub(crate) fn config(node: u8, k: Key) -> SessionConfig {
    let mut hs = HandshakeConfig::new(
        NodeId([node; 16]),
        Incarnation(node as u64 * 100),
        Keyring::single(k),
    );
    hs.listen = vec![format!("tcp://127.0.0.{node}:7000")];
    SessionConfig::new(hs)
}

/// Two sessions and the frames in flight between them.
pub(crate) struct Pair {
    pub now: Instant,
    pub a: Session,
    pub b: Session,
    pub a_to_b: VecDeque<Bytes>,
    pub b_to_a: VecDeque<Bytes>,
    pub events_a: Vec<Event>,
    pub events_b: Vec<Event>,
}

impl Pair {
    /// `a` initiates, `b` accepts.
    pub fn new(ca: SessionConfig, cb: SessionConfig) -> Self {
        let now = Instant::now();
        let a = Session::new(ca, Role::Initiator, now, [0xa1; 32], None).unwrap();
        let b = Session::new(cb, Role::Acceptor, now, [0xb2; 32], None).unwrap();
        Self {
            now,
            a,
            b,
            a_to_b: VecDeque::new(),
            b_to_a: VecDeque::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
        }
    }

    pub fn connected(secret: &str) -> Self {
        let mut p = Self::new(config(1, key(secret)), config(2, key(secret)));
        p.drive();
        assert!(p.a.is_established() && p.b.is_established());
        p.events_a.clear();
        p.events_b.clear();
        p
    }

    /// Moves frames and collects events until nothing moves. Fails on a
    /// livelock rather than spinning forever.
    pub fn drive(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(f) = self.a.poll_transmit() {
                self.a_to_b.push_back(f);
                moved = true;
            }
            while let Some(f) = self.b.poll_transmit() {
                self.b_to_a.push_back(f);
                moved = true;
            }
            if let Some(f) = self.a_to_b.pop_front() {
                self.b.handle_frame(self.now, f);
                moved = true;
            }
            if let Some(f) = self.b_to_a.pop_front() {
                self.a.handle_frame(self.now, f);
                moved = true;
            }
            while let Some(e) = self.a.poll_event() {
                self.events_a.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.events_b.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("livelock: frames still moving after 10,000 steps");
    }

    /// Advances the clock, firing both sessions' timers on the way.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        for _ in 0..100_000 {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|&t| t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = t.max(self.now);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.drive();
        }
        self.now = end;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.drive();
    }
}
