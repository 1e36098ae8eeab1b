//! Courier's protocol core, without IO.
//!
//! This crate is the part of Courier that decides: how frames are cut, what
//! an envelope looks like, how two nodes authenticate each other, how remote
//! references are counted, and when a silent peer is dead. It holds no
//! sockets, no timers, no threads, no random source and no actix: callers
//! pass in bytes, time and nonces, and take out bytes, deadlines and events.
//! That keeps every subtle rule testable deterministically (see
//! `src/tests/`), and lets every transport reuse the same core.
//!
//! ```text
//!                 +-------------------------------------------------+
//!  link bytes --> | frame::FrameDecoder   (length prefix, max size)  |
//!                 |        | frame bodies                            |
//!                 |        v                                         |
//!                 | session::Session                                 |
//!  now ---------> |   handshake (AwaitHello -> AwaitResponse -> Open) | --> poll_transmit(): frame bodies
//!                 |   frame MACs, liveness, pending calls            | --> poll_event(): Established,
//!  app sends ---> |   wire::Envelope (fixed headers, CBOR payloads)  |       Call, Reply, Release, Closed
//!                 +-------------------------------------------------+ --> poll_timeout(): next deadline
//!                 | refs::Exports / refs::Imports (reference counts)  |
//!                 +-------------------------------------------------+
//! ```
//!
//! Where to begin: [`session::Session`] for one connection, [`refs`] for the
//! counting rules, [`transport`] for the trait the wires implement, and
//! [`error::RemoteError`] for what callers see.
//!
//! ```
//! use std::time::Instant;
//! use courier_runtime::handshake::{HandshakeConfig, Key, Keyring};
//! use courier_runtime::id::{Incarnation, NodeId};
//! use courier_runtime::session::{Event, Role, Session, SessionConfig};
//!
//! let cfg = |n: u8| {
//!     let key = Key::new("default", b"a cookie of 16+ bytes".to_vec()).unwrap();
//!     SessionConfig::new(HandshakeConfig::new(NodeId([n; 16]), Incarnation(1), Keyring::single(key)))
//! };
//! let now = Instant::now();
//! let mut a = Session::new(cfg(1), Role::Initiator, now, [1; 32], None).unwrap();
//! let mut b = Session::new(cfg(2), Role::Acceptor, now, [2; 32], None).unwrap();
//! // Shuttle frames until both sides are established (hello, challenge,
//! // response, welcome).
//! for _ in 0..4 {
//!     while let Some(f) = a.poll_transmit() { b.handle_frame(now, f); }
//!     while let Some(f) = b.poll_transmit() { a.handle_frame(now, f); }
//! }
//! assert!(matches!(a.poll_event(), Some(Event::Established(_))));
//! assert!(b.is_established());
//! ```
//!
//! Left out on purpose: anything that waits (the actors layer drives the
//! session from a task), encryption (QUIC brings TLS; TCP frames get MACs),
//! and session resumption (the envelope leaves room: heartbeats carry an
//! acknowledgement and frames are numbered for the MAC).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod codec;
pub mod error;
pub mod frame;
#[cfg(any(test, feature = "__fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod id;
pub mod liveness;
pub mod refs;
pub mod session;
pub mod transport;
pub mod wire;

#[cfg(test)]
mod tests;
