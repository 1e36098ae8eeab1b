//! Actors and helpers shared by Courier's end-to-end tests and the
//! `courier-test-node` program they start as a separate process.
//!
//! A test starts nodes with the shared test cookie and short heartbeats,
//! exports the counter, and calls it:
//!
//! ```
//! use courier_tests::{export_counter, node, Add, Counter};
//!
//! actix::System::new().block_on(async {
//!     let server = node(Some("tcp://127.0.0.1:0")).await;
//!     export_counter(&server, "counter");
//!     let addr = server.local_addrs()[0].to_string();
//!     let client = node(None).await;
//!     let counter = client.lookup::<Counter>(&addr, "counter").await.unwrap();
//!     assert_eq!(counter.send(Add(5)).await.unwrap(), Ok(5));
//! });
//! ```

#![deny(missing_docs)]

use std::os::fd::AsFd;
use std::time::Duration;

use actix::prelude::*;
use courier::{Fd, Node, RemoteAddr, RemoteError};
use serde::{Deserialize, Serialize};

pub mod faults;
pub mod raw;

/// The cookie every test node uses (unless a test wants a wrong one).
pub const COOKIE: &str = "courier test cookie, not secret";

/// A counter: the classic remote actor.
#[derive(Default)]
pub struct Counter {
    /// Running total.
    pub total: u64,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

/// What the counter refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CounterError {
    /// Adding zero is refused (to test typed errors).
    #[error("refusing to add zero")]
    Zero,
}

/// Adds to the counter; replies with the new total.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<u64, CounterError>")]
pub struct Add(pub u64);

/// Reads the total.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "u64")]
pub struct Get;

/// Adds one, one-way.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Bump;

/// Makes the handler panic.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Crash;

/// Stops the actor (after answering).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Quit;

/// Answers after this many milliseconds.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct Slow(pub u64);

/// A message the counter is never exported with.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct NotHandled;

/// Echoes bytes (for large payloads).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "usize")]
pub struct Blob(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Asks who is calling: the handler sees the authenticated peer.
#[derive(Message, Serialize, Deserialize, Default)]
#[rtype(result = "Option<String>")]
pub struct WhoAmI {
    /// Filled in by Courier on arrival from a peer.
    #[serde(skip)]
    pub caller: Option<courier::Caller>,
}

courier::remote_message!(WhoAmI = "test.counter.whoami", caller = caller);

impl Handler<WhoAmI> for Counter {
    type Result = Option<String>;
    fn handle(&mut self, m: WhoAmI, _: &mut Context<Self>) -> Option<String> {
        m.caller.map(|c| format!("{} {}", c.node, c.key_id))
    }
}

/// Blobs that travel beside the payload, inside a structure; the reply
/// echoes them (so replies carry blobs too) with their total length.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Echoed")]
pub struct EchoBlobs {
    /// A blob at the top.
    pub first: courier::Blob,
    /// Blobs inside a vector, some absent.
    pub rest: Vec<Option<courier::Blob>>,
    /// An ordinary field beside them.
    pub note: String,
}

/// The reply to [`EchoBlobs`].
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Echoed {
    /// Bytes in all the blobs received.
    pub total: usize,
    /// The first byte of each blob received, in order (`None` for an
    /// empty or absent one).
    pub heads: Vec<Option<u8>>,
    /// The blobs, sent back.
    pub first: courier::Blob,
    /// The rest, sent back.
    pub rest: Vec<Option<courier::Blob>>,
}

impl Handler<EchoBlobs> for Counter {
    type Result = MessageResult<EchoBlobs>;
    fn handle(&mut self, m: EchoBlobs, _: &mut Context<Self>) -> Self::Result {
        let total = m.first.len() + m.rest.iter().flatten().map(|b| b.len()).sum::<usize>();
        let heads = std::iter::once(Some(&m.first))
            .chain(m.rest.iter().map(Option::as_ref))
            .map(|b| b.and_then(|b| b.first().copied()))
            .collect();
        MessageResult(Echoed {
            total,
            heads,
            first: m.first,
            rest: m.rest,
        })
    }
}

/// Asks for a blob of this many bytes back.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "courier::Blob")]
pub struct MakeBlob(pub usize);

impl Handler<MakeBlob> for Counter {
    type Result = MessageResult<MakeBlob>;
    fn handle(&mut self, m: MakeBlob, _: &mut Context<Self>) -> Self::Result {
        MessageResult(courier::Blob::from(vec![1u8; m.0]))
    }
}

courier::remote_message!(
    MakeBlob = "test.counter.make_blob",
    EchoBlobs = "test.counter.echo_blobs",
    Add = "test.counter.add",
    Get = "test.counter.get",
    Bump = "test.counter.bump",
    Crash = "test.counter.crash",
    Quit = "test.counter.quit",
    Slow = "test.counter.slow",
    NotHandled = "test.counter.not_handled",
    Blob = "test.counter.blob",
);

impl Handler<Add> for Counter {
    type Result = Result<u64, CounterError>;
    fn handle(&mut self, m: Add, _: &mut Context<Self>) -> Self::Result {
        if m.0 == 0 {
            return Err(CounterError::Zero);
        }
        self.total += m.0;
        Ok(self.total)
    }
}

impl Handler<Get> for Counter {
    type Result = u64;
    fn handle(&mut self, _: Get, _: &mut Context<Self>) -> u64 {
        self.total
    }
}

impl Handler<Bump> for Counter {
    type Result = ();
    fn handle(&mut self, _: Bump, _: &mut Context<Self>) {
        self.total += 1;
    }
}

impl Handler<Crash> for Counter {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!("the counter was asked to crash");
    }
}

impl Handler<Quit> for Counter {
    type Result = ();
    fn handle(&mut self, _: Quit, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Slow> for Counter {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, m: Slow, _: &mut Context<Self>) -> Self::Result {
        Box::pin(actix::fut::wrap_future(tokio::time::sleep(
            Duration::from_millis(m.0),
        )))
    }
}

impl Handler<NotHandled> for Counter {
    type Result = ();
    fn handle(&mut self, _: NotHandled, _: &mut Context<Self>) {}
}

impl Handler<Blob> for Counter {
    type Result = usize;
    fn handle(&mut self, m: Blob, _: &mut Context<Self>) -> usize {
        m.0.len()
    }
}

/// Exports a counter, supervised, with every message but `NotHandled`.
pub fn export_counter(node: &Node, name: &str) -> RemoteAddr<Counter> {
    node.export_supervised(Counter::default)
        .handles::<Add>()
        .handles::<Get>()
        .handles::<Bump>()
        .handles::<Crash>()
        .handles::<Quit>()
        .handles::<Slow>()
        .handles::<Blob>()
        .handles::<EchoBlobs>()
        .handles::<MakeBlob>()
        .handles::<WhoAmI>()
        .failure_details(true)
        .backtraces(true)
        .register(name)
        .expect("name is free")
}

/// A chat room handing out member references.
#[derive(Default)]
pub struct Room {
    members: Vec<(String, RemoteAddr<Member>)>,
}

impl Actor for Room {
    type Context = Context<Self>;
}

/// A chat member: keeps what it heard.
#[derive(Default)]
pub struct Member {
    heard: Vec<String>,
}

impl Actor for Member {
    type Context = Context<Self>;
}

/// Joins the room; replies with the member count.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "usize")]
pub struct Join {
    /// The new member.
    pub member: RemoteAddr<Member>,
    /// Its name.
    pub name: String,
}

/// Leaves the room (drops the room's reference).
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "usize")]
pub struct Leave(pub String);

/// Returns every member reference.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Vec<(String, RemoteAddr<Member>)>")]
pub struct Members;

/// Tells a member something.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "usize")]
pub struct Say(pub String);

/// What a member heard.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Vec<String>")]
pub struct Heard;

/// Writes text into an open file handed over with the message.
#[derive(Message, Serialize, Deserialize)]
#[rtype(result = "Result<usize, String>")]
pub struct WriteInto {
    /// The file.
    pub file: Fd,
    /// What to write.
    pub text: String,
}

courier::remote_message!(
    Join = "test.room.join",
    Leave = "test.room.leave",
    Members = "test.room.members",
    Say = "test.member.say",
    Heard = "test.member.heard",
    WriteInto = "test.file.write",
);

impl Handler<Join> for Room {
    type Result = usize;
    fn handle(&mut self, m: Join, _: &mut Context<Self>) -> usize {
        self.members.push((m.name, m.member));
        self.members.len()
    }
}

impl Handler<Leave> for Room {
    type Result = usize;
    fn handle(&mut self, m: Leave, _: &mut Context<Self>) -> usize {
        self.members.retain(|(n, _)| *n != m.0);
        self.members.len()
    }
}

impl Handler<Members> for Room {
    type Result = MessageResult<Members>;
    fn handle(&mut self, _: Members, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.members.clone())
    }
}

impl Handler<Say> for Member {
    type Result = usize;
    fn handle(&mut self, m: Say, _: &mut Context<Self>) -> usize {
        self.heard.push(m.0);
        self.heard.len()
    }
}

impl Handler<Heard> for Member {
    type Result = MessageResult<Heard>;
    fn handle(&mut self, _: Heard, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.heard.clone())
    }
}

impl Handler<WriteInto> for Member {
    type Result = Result<usize, String>;
    fn handle(&mut self, m: WriteInto, _: &mut Context<Self>) -> Self::Result {
        rustix::io::write(m.file.0.as_fd(), m.text.as_bytes()).map_err(|e| e.to_string())
    }
}

/// Exports a room under `name`.
pub fn export_room(node: &Node, name: &str) -> RemoteAddr<Room> {
    node.export(Room::default().start())
        .handles::<Join>()
        .handles::<Leave>()
        .handles::<Members>()
        .register(name)
        .expect("name is free")
}

/// A member, exported anonymously (freed when no peer holds it).
pub fn new_member(node: &Node) -> RemoteAddr<Member> {
    node.export(Member::default().start())
        .handles::<Say>()
        .handles::<Heard>()
        .handles::<WriteInto>()
        .anonymous()
}

/// Starts a node with the test cookie, listening on `listen` (if any).
pub async fn node(listen: Option<&str>) -> Node {
    let mut b = Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_millis(500), Duration::from_millis(1500));
    if let Some(l) = listen {
        b = b.listen(l);
    }
    b.start().await.expect("node starts")
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `courier-test-node` child process, killed when dropped.
pub struct TestNode {
    /// The process.
    pub child: std::process::Child,
    /// The address it listens on.
    pub addr: String,
    /// Lines it printed after READY (SAID lines come before READY).
    pub said: Vec<String>,
}

impl TestNode {
    /// Starts `courier-test-node` at `bin` with `args`, and waits (up to 30 s)
    /// for its READY line.
    pub fn start(bin: &str, args: &[&str]) -> TestNode {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .env("RUST_BACKTRACE", "0")
            .spawn()
            .expect("test node starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut said = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("READY ") {
                        return TestNode {
                            child,
                            addr: addr.to_owned(),
                            said,
                        };
                    }
                    said.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("test node did not get ready within 30 s; it printed {said:?}");
                }
            }
        }
    }

    /// [`TestNode::start`] without blocking the calling node's thread (which
    /// must keep serving while the child starts).
    pub async fn start_async(bin: &'static str, args: Vec<String>) -> TestNode {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            TestNode::start(bin, &args)
        })
        .await
        .expect("starter thread")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal sent");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of this process (`VmRSS` in `/proc/self/status`), KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Descriptors this process has open (entries of `/proc/self/fd`).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raises the soft limit on open descriptors to at least `want` (up to the
/// hard limit); returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if current >= want {
        return current;
    }
    let target = lim.maximum.map_or(want, |m| m.min(want));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// What an honest peer checks while a node is under attack: it looks the
/// counter up at `addr` and makes `n` calls, each of which must be
/// answered.
pub async fn honest_calls(client: &Node, addr: &str, n: u64) -> Result<(), RemoteError> {
    let counter = client.lookup::<Counter>(addr, "counter").await?;
    let mut last = 0;
    for _ in 0..n {
        let total = counter
            .send(Add(1))
            .timeout(Duration::from_secs(10))
            .await?
            .expect("adding one is never refused");
        assert!(
            total > last,
            "the counter went backwards: {total} after {last}"
        );
        last = total;
    }
    Ok(())
}

/// Where a node under test listens for `scheme` (`tcp` or `unix`): a free
/// loopback port, or a socket file in `dir`.
pub fn listen_addr(scheme: &str, dir: &std::path::Path, name: &str) -> String {
    match scheme {
        "tcp" => "tcp://127.0.0.1:0".into(),
        "unix" => format!("unix://{}/{name}.sock", dir.display()),
        other => panic!("no listen address for {other}"),
    }
}

/// A node for hostile-input tests: listens on `scheme`, exports a counter
/// ("counter") and a room ("room"), has the given handshake deadline and
/// limits, and heartbeats every 200 ms with a generous 5 s timeout (so a
/// slow, shared machine never fakes a dead peer). Returns it and its
/// address.
pub async fn target_node(
    scheme: &str,
    dir: &std::path::Path,
    handshake_timeout: Duration,
    limits: courier::Limits,
) -> (Node, String) {
    let node = Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_millis(200), Duration::from_secs(5))
        .handshake_timeout(handshake_timeout)
        .limits(limits)
        .listen(listen_addr(scheme, dir, "target"))
        .start()
        .await
        .expect("node starts");
    export_counter(&node, "counter");
    export_room(&node, "room");
    let addr = node.local_addrs()[0].to_string();
    (node, addr)
}

/// An honest client node (the test cookie, heartbeats every 200 ms with a
/// 5 s timeout).
pub async fn honest_node() -> Node {
    Node::builder()
        .cookie(COOKIE)
        .heartbeat(Duration::from_millis(200), Duration::from_secs(5))
        .start()
        .await
        .expect("node starts")
}
