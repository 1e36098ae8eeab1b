//! Remote actors for actix.
//!
//! Export an ordinary actix actor from a [`Node`], and call it from another
//! node through a typed [`RemoteAddr`], over any transport Courier has
//! (`tcp://`, `unix://`, `quic://`, `fd://`).
//!
//! ```
//! use actix::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default)]
//! struct Counter(u64);
//! impl Actor for Counter { type Context = Context<Self>; }
//!
//! #[derive(Message, Serialize, Deserialize)]
//! #[rtype(result = "u64")]
//! struct Add(u64);
//! courier::remote_message!(Add = "counter.add");
//!
//! impl Handler<Add> for Counter {
//!     type Result = u64;
//!     fn handle(&mut self, m: Add, _: &mut Context<Self>) -> u64 { self.0 += m.0; self.0 }
//! }
//!
//! #[actix::main]
//! async fn main() -> Result<(), courier::RemoteError> {
//!     let server = courier::Node::builder()
//!         .cookie("a shared secret, 16+ bytes")
//!         .listen("tcp://127.0.0.1:0")
//!         .start().await?;
//!     server.export(Counter::default().start()).handles::<Add>().register("counter")?;
//!     let addr = server.local_addrs()[0].to_string();
//!
//!     let client = courier::Node::builder().cookie("a shared secret, 16+ bytes").start().await?;
//!     let counter = client.lookup::<Counter>(&addr, "counter").await?;
//!     assert_eq!(counter.send(Add(5)).await?, 5);
//!     Ok(())
//! }
//! ```
//!
//! Where to begin: [`Node::builder`], [`Node::export`], [`Node::lookup`],
//! [`RemoteAddr::send`], and [`RemoteError`] for what can go wrong. The
//! protocol itself lives in `courier-runtime`; the wires in
//! `courier-transports`.
//!
//! # Operating a node
//!
//! - [`Config`] picks listen addresses, peers, the cookie, QUIC
//!   certificates and pins, heartbeats and limits per deployment, from a
//!   TOML file, `COURIER_*` environment variables and code, each layer
//!   overriding the one before ([`NodeBuilder::config`] applies it).
//! - Every node exports a node-info actor ([`info`]) that tells
//!   authenticated peers its names, peers, who holds references to its
//!   actors, and its counters ([`Node::stats`]).
//! - Logs and spans go through `tracing`: a `conn` span per connection
//!   (peer, remote address, scheme) and a `call` span per call (actor,
//!   message type, request id).
//! - The `courier` command (`cargo install`able from this package) runs a
//!   standalone node with an [`echo`] actor, makes keys, and pings, lists,
//!   reads the counters of, and benchmarks any node.
//!
//! # Cargo features
//!
//! - `transports` (default): use `courier-transports` when no transport is
//!   given, and build QUIC transports from a [`Config`].
//! - `toml`: read [`Config`] from TOML files.
//! - `cli` (default): the `courier` command (clap, indicatif,
//!   tracing-subscriber, serde_json, and `toml`). Library users can turn it
//!   off with `default-features = false, features = ["transports"]`.

#![deny(missing_docs)]

pub mod config;
mod conn;
pub mod cookie;
pub mod echo;
mod export;
pub mod info;
mod message;
mod metrics;
mod node;
mod refctx;
mod remote;
mod spawn;
mod timer;

pub use config::{Config, ConfigError};
pub use courier_runtime::error::{DeadReason, RemoteError, RemoteFailure};
pub use courier_runtime::handshake::{Key, Keyring};
pub use courier_runtime::id::{ActorId, Incarnation, LocalId, MessageType, NodeId};
pub use courier_runtime::session::Role;
pub use courier_runtime::transport::{Address, Transport};
pub use export::{Caller, Export};
pub use message::{RemoteMessage, RemoteReply};
pub use metrics::LatencySummary;
pub use node::{
    ActorDown, ExportSummary, FrameMac, Limits, Node, NodeBuilder, NodeDown, NodeStats,
    PeerSummary, Supervisor,
};
pub use refctx::{Blob, Fd};
pub use remote::{Call, RemoteAddr, RemoteRecipient, Request};
#[cfg(feature = "transports")]
pub use spawn::worker_link_from_env;
pub use spawn::{Worker, WORKER_ENV};

#[cfg(feature = "transports")]
pub use courier_transports as transports;
