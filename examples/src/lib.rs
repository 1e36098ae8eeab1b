//! Actors and helpers shared by the example programs.
//!
//! Each program in `src/bin/` is described in `examples/README.md`. The
//! key-value store, for example, served and called in one process:
//!
//! ```
//! use courier_examples::{export_store, Fetch, Incr, Store, EXAMPLE_COOKIE};
//!
//! # fn main() -> Result<(), courier::RemoteError> {
//! actix::System::new().block_on(async {
//!     let server = courier::Node::builder()
//!         .cookie(EXAMPLE_COOKIE)
//!         .listen("tcp://127.0.0.1:0")
//!         .start()
//!         .await?;
//!     export_store(&server, "kv")?;
//!     let addr = server.local_addrs()[0].to_string();
//!     let client = courier::Node::builder().cookie(EXAMPLE_COOKIE).start().await?;
//!     let kv = client.lookup::<Store>(&addr, "kv").await?;
//!     assert_eq!(kv.send(Incr { key: "visits".into(), by: 2 }).await?, Ok(2));
//!     assert_eq!(kv.send(Fetch("visits".into())).await?, Some(2));
//!     Ok(())
//! })
//! # }
//! ```

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;
use courier::{Node, NodeBuilder, RemoteAddr, RemoteError};
use courier_transports::quic::{Identity, PeerTrust, QuicConfig};
use courier_transports::AnyTransport;
use serde::{Deserialize, Serialize};

/// The cookie the examples share (a real deployment uses its own, from
/// `COURIER_COOKIE` or the cookie file).
pub const EXAMPLE_COOKIE: &str = "courier example cookie: change me";

/// A transport for every scheme. QUIC uses one certificate for the whole
/// example deployment, made on first use in `certs` and pinned by
/// fingerprint, so every example process trusts exactly its peers.
pub fn transport(certs: &Path) -> Result<Arc<AnyTransport>, RemoteError> {
    let to_err = |e: courier_runtime::transport::TransportError| RemoteError::Protocol {
        peer: "this node".into(),
        reason: e.to_string(),
    };
    let id = Identity::load_or_generate(certs, "courier-example").map_err(to_err)?;
    let trust = PeerTrust::pinned([id.fingerprint()]);
    let t = AnyTransport::builder()
        .quic(QuicConfig::new(id, trust))
        .build()
        .map_err(to_err)?;
    Ok(Arc::new(t))
}

/// A node builder with the example cookie and every transport.
pub fn builder(certs: &Path) -> Result<NodeBuilder, RemoteError> {
    Ok(Node::builder()
        .cookie(EXAMPLE_COOKIE)
        .heartbeat(
            std::time::Duration::from_millis(250),
            std::time::Duration::from_millis(750),
        )
        .transport(transport(certs)?))
}

/// A key-value store with a counter per key.
#[derive(Default)]
pub struct Store {
    values: BTreeMap<String, i64>,
}

impl Actor for Store {
    type Context = Context<Self>;
}

/// What the store refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    /// The key is empty.
    #[error("keys may not be empty")]
    EmptyKey,
    /// The result would overflow.
    #[error("adding {by} to {key} would overflow")]
    Overflow {
        /// The key.
        key: String,
        /// The amount.
        by: i64,
    },
}

/// Adds to a key; replies with its new value.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct Incr {
    /// The key.
    pub key: String,
    /// The amount.
    pub by: i64,
}

/// Reads a key.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Option<i64>")]
pub struct Fetch(pub String);

/// Lists every key and value.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Vec<(String, i64)>")]
pub struct Dump;

/// Makes the store panic (to show supervision).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Explode;

courier::remote_message!(
    Incr = "kv.incr",
    Fetch = "kv.fetch",
    Dump = "kv.dump",
    Explode = "kv.explode",
);

impl Handler<Incr> for Store {
    type Result = Result<i64, StoreError>;
    fn handle(&mut self, m: Incr, _: &mut Context<Self>) -> Self::Result {
        if m.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        let v = self.values.entry(m.key.clone()).or_insert(0);
        *v = v.checked_add(m.by).ok_or(StoreError::Overflow {
            key: m.key,
            by: m.by,
        })?;
        Ok(*v)
    }
}

impl Handler<Fetch> for Store {
    type Result = Option<i64>;
    fn handle(&mut self, m: Fetch, _: &mut Context<Self>) -> Option<i64> {
        self.values.get(&m.0).copied()
    }
}

impl Handler<Dump> for Store {
    type Result = MessageResult<Dump>;
    fn handle(&mut self, _: Dump, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.values.iter().map(|(k, v)| (k.clone(), *v)).collect())
    }
}

impl Handler<Explode> for Store {
    type Result = ();
    fn handle(&mut self, _: Explode, _: &mut Context<Self>) {
        panic!("asked to explode");
    }
}

/// Exports a supervised store under `name`.
pub fn export_store(node: &Node, name: &str) -> Result<RemoteAddr<Store>, RemoteError> {
    node.export_supervised(Store::default)
        .handles::<Incr>()
        .handles::<Fetch>()
        .handles::<Dump>()
        .handles::<Explode>()
        .failure_details(true)
        .register(name)
}

/// A chat room: it hands out its members' references.
#[derive(Default)]
pub struct Room {
    members: Vec<(String, RemoteAddr<Member>)>,
}

impl Actor for Room {
    type Context = Context<Self>;
}

/// A member of a chat room.
pub struct Member {
    name: String,
    heard: Vec<String>,
}

impl Member {
    /// A member called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            heard: Vec::new(),
        }
    }
}

impl Actor for Member {
    type Context = Context<Self>;
}

/// Joins a room; replies with everyone already there.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Vec<(String, RemoteAddr<Member>)>")]
pub struct Join {
    /// Who joins.
    pub name: String,
    /// Their reference.
    pub member: RemoteAddr<Member>,
}

/// Lists the members.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Vec<(String, RemoteAddr<Member>)>")]
pub struct Members;

/// Says something to a member; replies with its answer.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "String")]
pub struct Say {
    /// Who speaks.
    pub from: String,
    /// What they say.
    pub text: String,
}

/// Asks a member to greet another member (a reference passed along).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<String, String>")]
pub struct Greet {
    /// Whom to greet.
    pub friend: RemoteAddr<Member>,
}

/// Hands a member an open file to write a line into.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<usize, String>")]
pub struct WriteLine {
    /// The open file.
    pub file: courier::Fd,
    /// The line.
    pub line: String,
}

courier::remote_message!(
    Join = "chat.join",
    Members = "chat.members",
    Say = "chat.say",
    Greet = "chat.greet",
    WriteLine = "chat.write_line",
);

impl Handler<Join> for Room {
    type Result = MessageResult<Join>;
    fn handle(&mut self, m: Join, _: &mut Context<Self>) -> Self::Result {
        let before = self.members.clone();
        self.members.push((m.name, m.member));
        MessageResult(before)
    }
}

impl Handler<Members> for Room {
    type Result = MessageResult<Members>;
    fn handle(&mut self, _: Members, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.members.clone())
    }
}

impl Handler<Say> for Member {
    type Result = String;
    fn handle(&mut self, m: Say, _: &mut Context<Self>) -> String {
        self.heard.push(format!("{}: {}", m.from, m.text));
        format!("{} heard {:?} from {}", self.name, m.text, m.from)
    }
}

impl Handler<Greet> for Member {
    type Result = ResponseFuture<Result<String, String>>;
    fn handle(&mut self, m: Greet, _: &mut Context<Self>) -> Self::Result {
        let from = self.name.clone();
        Box::pin(async move {
            m.friend
                .send(Say {
                    from,
                    text: "hello, friend".into(),
                })
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Handler<WriteLine> for Member {
    type Result = Result<usize, String>;
    fn handle(&mut self, m: WriteLine, _: &mut Context<Self>) -> Self::Result {
        use std::os::fd::AsFd;
        let line = format!("{} (pid {}): {}\n", self.name, std::process::id(), m.line);
        rustix::io::write(m.file.0.as_fd(), line.as_bytes()).map_err(|e| e.to_string())
    }
}

/// Exports a room under `name`.
pub fn export_room(node: &Node, name: &str) -> Result<RemoteAddr<Room>, RemoteError> {
    node.export(Room::default().start())
        .handles::<Join>()
        .handles::<Members>()
        .register(name)
}

/// Exports a member, anonymously: it is unexported when no peer holds it.
pub fn member(node: &Node, name: &str) -> RemoteAddr<Member> {
    node.export(Member::new(name).start())
        .handles::<Say>()
        .handles::<Greet>()
        .handles::<WriteLine>()
        .anonymous()
}
