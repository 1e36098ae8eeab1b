//! The node: identity, listeners, connections, export table, registry, and
//! the supervisor actor that keeps them.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, AsyncContext, Context, Handler, Message, Recipient};
use courier_runtime::error::{DeadReason, RefError, RemoteError};
use courier_runtime::frame::DEFAULT_MAX_FRAME;
use courier_runtime::handshake::{HandshakeConfig, Key, Keyring};
use courier_runtime::id::{ActorId, Incarnation, LocalId, NodeId};
use courier_runtime::liveness::LivenessConfig;
use courier_runtime::refs::{Exports, HandOff, Holder, Imports};
use courier_runtime::session::{Role, SessionConfig};
use courier_runtime::transport::{Address, Link, LinkCaps, Listener, Transport};
use courier_runtime::wire::{self, features, Call, ReleaseEntry, ReplyStatus, WireRef};
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::conn::{Command, ConnHandle, Driver, Eviction, ReplyIn};
use crate::export::{
    install_panic_hook, Dispatch, Export, ExportEntry, ExportedAny, Inbound, ReplySink,
};
use crate::info::NODE_INFO;
use crate::metrics::{LatencySummary, Metrics};
use crate::refctx::{self, OutRef, Resolved};
use crate::remote::{Imported, RemoteAddr};

/// Limits that bound what one peer can make this node hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame body after authentication.
    pub max_frame: usize,
    /// Distinct actors of this node one peer may hold references to.
    pub max_refs_per_peer: u64,
    /// Calls awaiting replies on one connection.
    pub max_pending_calls: usize,
    /// Commands queued in front of one connection before senders wait.
    pub command_queue: usize,
    /// Inbound calls being handled at once per connection; past it the
    /// node stops reading from that peer (backpressure).
    pub max_inbound_in_flight: usize,
    /// Inbound connections still in the handshake. Past it, each new one
    /// evicts the oldest (refused as busy), so clients that never finish
    /// the handshake cannot keep honest peers out.
    pub max_handshaking: usize,
    /// How long connecting (transport plus handshake) may take.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_refs_per_peer: 100_000,
            max_pending_calls: 65_536,
            command_queue: 1024,
            max_inbound_in_flight: 1024,
            max_handshaking: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether `addr` (as a link reports its peer) is a loopback address: an
/// attacker on it is already on this host.
fn is_loopback(addr: &str) -> bool {
    match addr.parse::<Address>() {
        Ok(Address::Tcp { host, .. }) | Ok(Address::Quic { host, .. }) => host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        _ => false,
    }
}

/// When frames after the handshake carry a MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FrameMac {
    /// On links that are neither TLS nor kernel-local (TCP), except to a
    /// loopback address (127.0.0.0/8, ::1), where an on-path attacker would
    /// already be on this host.
    #[default]
    Auto,
    /// Always (unless the peer cannot: every Courier build can).
    Always,
    /// Never asked for by this side (the peer may still ask).
    Never,
}

/// A peer connection as seen from this node.
#[derive(Clone, Debug)]
pub struct PeerSummary {
    /// The peer's node id.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// The key it proved with.
    pub key_id: String,
    /// The transport scheme.
    pub scheme: &'static str,
    /// The peer's address as this side sees it.
    pub remote: String,
}

/// One exported actor and who holds it.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// Its id.
    pub id: ActorId,
    /// Its Rust type.
    pub actor_type: &'static str,
    /// Its registered name, if any.
    pub name: Option<String>,
    /// The message types it handles remotely.
    pub message_types: Vec<&'static str>,
    /// Peers holding references, with counts.
    pub holders: Vec<Holder>,
    /// How many times the actor was restarted after stopping or panicking.
    pub restarts: u64,
}

/// Counters of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Established connections.
    pub connections: usize,
    /// Exported actors (the root and node-info actors left out).
    pub exports: usize,
    /// References to those actors peers hold (the sum of every holder's
    /// count; summed on each call, so it costs a pass over the exports).
    pub exported_refs: u64,
    /// Imported actors not yet released.
    pub imports: usize,
    /// Calls and one-way messages received.
    pub calls_in: u64,
    /// Calls and one-way messages sent.
    pub calls_out: u64,
    /// Frame bytes received from peers.
    pub bytes_in: u64,
    /// Frame bytes sent to peers.
    pub bytes_out: u64,
    /// Peers lost (connections that ended).
    pub peers_lost: u64,
    /// Handshakes that failed.
    pub handshakes_failed: u64,
    /// Round trips of the calls this node made.
    pub latency: LatencySummary,
}

/// A watched remote actor stopped or became unreachable.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct ActorDown {
    /// The actor.
    pub actor: ActorId,
    /// Why.
    pub reason: DeadReason,
}

/// A watched peer node became unreachable.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct NodeDown {
    /// The node.
    pub node: NodeId,
    /// What ended the connection.
    pub reason: String,
}

pub(crate) struct State {
    exports: Exports<Arc<dyn ExportedAny>>,
    names: HashMap<String, LocalId>,
    imports: Imports,
    inners: HashMap<ActorId, (Weak<Imported>, u64)>,
    next_instance: u64,
    conns: HashMap<NodeId, Vec<ConnHandle>>,
    by_addr: HashMap<String, ConnHandle>,
    connecting: HashMap<String, Vec<oneshot::Sender<Result<ConnHandle, RemoteError>>>>,
    acquires: HashMap<(u64, u64), ActorId>,
    actor_monitors: HashMap<ActorId, Vec<Recipient<ActorDown>>>,
    node_monitors: HashMap<NodeId, Vec<Recipient<NodeDown>>>,
}

/// What the whole node shares between its connections and references.
pub(crate) struct NodeShared {
    pub id: NodeId,
    pub incarnation: Incarnation,
    pub name: Option<String>,
    keyring: Keyring,
    liveness: LivenessConfig,
    handshake_timeout: Duration,
    frame_mac: FrameMac,
    pub limits: Limits,
    transport: Arc<dyn Transport>,
    state: Mutex<State>,
    listen: Mutex<Vec<Address>>,
    conn_ids: AtomicU64,
    handshaking: AtomicUsize,
    /// Inbound handshakes in progress, oldest first (for eviction).
    inbound_handshakes: Mutex<VecDeque<Weak<Eviction>>>,
    supervisor: OnceLock<Addr<Supervisor>>,
    flush_scheduled: AtomicBool,
    calls_in: AtomicU64,
    peers_lost: AtomicU64,
    handshakes_failed: AtomicU64,
    pub(crate) metrics: Metrics,
    shut: AtomicBool,
    /// Wakes the accept loops at shutdown, so they drop their listeners
    /// (and the node they hold).
    stop_accepting: tokio::sync::Notify,
}

impl NodeShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("node state poisoned")
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn session_config(&self, caps: &LinkCaps, peer: &str) -> SessionConfig {
        let mut hs = HandshakeConfig::new(self.id, self.incarnation, self.keyring.clone());
        hs.listen = self
            .listen
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|a| !matches!(a, Address::Fd { .. }))
            .take(wire::MAX_LISTEN_ADDRS)
            .map(|a| a.to_string())
            .collect();
        let mac = match self.frame_mac {
            FrameMac::Always => true,
            FrameMac::Never => false,
            FrameMac::Auto => !caps.encrypted && !caps.kernel_local && !is_loopback(peer),
        };
        hs.features = features::BLOBS | if mac { features::FRAME_MAC } else { 0 };
        let mut cfg = SessionConfig::new(hs);
        cfg.handshake_timeout = self.handshake_timeout;
        cfg.liveness = self.liveness;
        cfg.max_frame = self.limits.max_frame;
        cfg.max_pending_calls = self.limits.max_pending_calls;
        cfg
    }

    /// Starts a driver for a fresh link.
    pub(crate) fn spawn_driver(
        self: &Arc<Self>,
        link: Box<dyn Link>,
        role: Role,
        scheme: &'static str,
        dial: Option<String>,
    ) -> oneshot::Receiver<Result<ConnHandle, RemoteError>> {
        self.spawn_driver_evictable(link, role, scheme, dial, None)
    }

    fn spawn_driver_evictable(
        self: &Arc<Self>,
        link: Box<dyn Link>,
        role: Role,
        scheme: &'static str,
        dial: Option<String>,
        eviction: Option<Arc<Eviction>>,
    ) -> oneshot::Receiver<Result<ConnHandle, RemoteError>> {
        let (tx, rx) = oneshot::channel();
        match Driver::new(self.clone(), link, role, scheme, dial, Some(tx)) {
            Ok(mut d) => {
                d.eviction = eviction;
                actix::spawn(crate::conn::DriverTask::new(d));
            }
            Err(_) => {
                self.handshake_ended();
            }
        }
        rx
    }

    pub(crate) fn register_conn(&self, h: &ConnHandle, dial: Option<&str>) {
        self.handshake_ended();
        let mut st = self.lock();
        st.conns.entry(h.peer_node()).or_default().push(h.clone());
        if let Some(a) = dial {
            st.by_addr.insert(a.to_owned(), h.clone());
        }
        for a in &h.0.peer.listen {
            st.by_addr.entry(a.clone()).or_insert_with(|| h.clone());
        }
    }

    pub(crate) fn handshake_ended(&self) {
        let _ = self
            .handshaking
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub(crate) fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection ended: when it was the last one to that peer, its
    /// counts are dropped, its references die, and monitors fire.
    pub(crate) fn conn_closed(&self, h: &ConnHandle) {
        self.peers_lost.fetch_add(1, Ordering::Relaxed);
        let peer = h.peer_node();
        let reason =
            h.0.close_reason
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_else(|| "the connection closed".into());
        let mut freed = Vec::new();
        let mut dead_inners = Vec::new();
        let (actor_monitors, node_monitors) = {
            let mut st = self.lock();
            if let Some(v) = st.conns.get_mut(&peer) {
                v.retain(|c| c.0.id != h.0.id);
                if v.is_empty() {
                    st.conns.remove(&peer);
                }
            }
            st.by_addr.retain(|_, c| c.0.id != h.0.id);
            st.acquires.retain(|(conn, _), _| *conn != h.0.id);
            if st.conns.contains_key(&peer) {
                return;
            }
            for (id, v) in st.exports.peer_lost(peer) {
                v.clear_id();
                freed.push((id, v));
            }
            let dead = st.imports.peer_lost(peer);
            for id in &dead {
                if let Some((w, _)) = st.inners.get(id) {
                    if let Some(i) = w.upgrade() {
                        dead_inners.push(i);
                    }
                }
            }
            let mut am = Vec::new();
            let ids: Vec<ActorId> = st
                .actor_monitors
                .keys()
                .filter(|a| a.node == peer)
                .copied()
                .collect();
            for id in ids {
                if let Some(v) = st.actor_monitors.remove(&id) {
                    am.push((id, v));
                }
            }
            let nm = st.node_monitors.remove(&peer).unwrap_or_default();
            (am, nm)
        };
        info!(peer = %peer, reason = %reason, dead_refs = dead_inners.len(), freed_exports = freed.len(),
              "peer down: its references are dead, its holds released");
        for i in &dead_inners {
            i.mark_dead(DeadReason::NodeUnreachable);
        }
        drop(dead_inners);
        drop(freed);
        for (actor, recipients) in actor_monitors {
            for r in recipients {
                r.do_send(ActorDown {
                    actor,
                    reason: DeadReason::NodeUnreachable,
                });
            }
        }
        for r in node_monitors {
            r.do_send(NodeDown {
                node: peer,
                reason: reason.clone(),
            });
        }
        self.schedule_flush();
    }

    /// Resolves the references that came with a frame, counting them.
    pub(crate) fn resolve_refs(
        self: &Arc<Self>,
        h: &ConnHandle,
        refs: &[WireRef],
    ) -> Vec<Resolved> {
        if refs.is_empty() {
            return Vec::new();
        }
        let peer = h.peer_node();
        let mut out = Vec::with_capacity(refs.len());
        let mut acquire = Vec::new();
        {
            let mut st = self.lock();
            for r in refs {
                let a = r.actor;
                if a.node == self.id {
                    if a.incarnation != self.incarnation {
                        out.push(Resolved::Dead(a, DeadReason::OldIncarnation));
                        continue;
                    }
                    match st.exports.get(a.incarnation, a.local) {
                        Ok(e) => out.push(Resolved::Local(e.clone(), Arc::downgrade(self))),
                        Err(_) => out.push(Resolved::Dead(a, DeadReason::ActorStopped)),
                    }
                    continue;
                }
                if r.lend_token == 0 {
                    if a.node != peer {
                        // Only a dead third-party reference travels unlent.
                        out.push(Resolved::Dead(a, DeadReason::NodeUnreachable));
                        continue;
                    }
                    st.imports.receive_direct(a);
                    let addr = h.0.reach.clone();
                    let i = self.inner_for(&mut st, a, Some(h.clone()), addr);
                    out.push(Resolved::Remote(i));
                } else {
                    let how = st.imports.receive_third_party(a, peer, r.lend_token);
                    let existing = st.conns.get(&a.node).and_then(|v| v.first()).cloned();
                    let i = self.inner_for(&mut st, a, existing, r.owner_addr.clone());
                    if how == HandOff::MustAcquire {
                        acquire.push(i.clone());
                    }
                    out.push(Resolved::Remote(i));
                }
            }
        }
        for i in acquire {
            let node = self.clone();
            actix::spawn(async move { node.acquire(i).await });
        }
        self.flush_ref_traffic();
        out
    }

    fn inner_for(
        self: &Arc<Self>,
        st: &mut State,
        a: ActorId,
        conn: Option<ConnHandle>,
        owner_addr: String,
    ) -> Arc<Imported> {
        if let Some((w, _)) = st.inners.get(&a) {
            if let Some(i) = w.upgrade() {
                if i.dead_reason().is_none() {
                    return i;
                }
            }
        }
        st.next_instance += 1;
        let i = Arc::new(Imported {
            id: a,
            instance: st.next_instance,
            owner_addr,
            node: Arc::downgrade(self),
            conn: Mutex::new(conn),
            dead: Mutex::new(None),
            is_dead: std::sync::atomic::AtomicBool::new(false),
        });
        st.inners.insert(a, (Arc::downgrade(&i), st.next_instance));
        i
    }

    async fn acquire(self: Arc<Self>, i: Arc<Imported>) {
        let result = async {
            let (_, conn) = i.connection().await?;
            conn.0
                .ctl
                .send(Command::Acquire(i.id))
                .map_err(|_| conn.lost())
        }
        .await;
        if let Err(e) = result {
            debug!(actor = %i.id, error = %e, "could not acquire a handed-over reference");
            let mut st = self.lock();
            if st.imports.is_acquiring(&i.id) {
                let _ = st.imports.acquired(i.id, false);
            }
            drop(st);
            i.mark_dead(DeadReason::NodeUnreachable);
            self.flush_ref_traffic();
        }
    }

    pub(crate) fn note_acquire(&self, conn: u64, request: u64, actor: ActorId) {
        self.lock().acquires.insert((conn, request), actor);
    }

    pub(crate) fn handle_acquired(&self, conn: u64, request: u64, ok: bool) {
        let dead = {
            let mut st = self.lock();
            let Some(actor) = st.acquires.remove(&(conn, request)) else {
                return;
            };
            match st.imports.acquired(actor, ok) {
                Ok(true) => st.inners.get(&actor).and_then(|(w, _)| w.upgrade()),
                _ => None,
            }
        };
        if let Some(i) = dead {
            i.mark_dead(DeadReason::ActorStopped);
        }
        self.flush_ref_traffic();
    }

    pub(crate) fn handle_acquire(&self, h: &ConnHandle, inc: Incarnation, target: LocalId) -> bool {
        if inc != self.incarnation {
            return false;
        }
        self.lock().exports.note_sent(target, h.peer_node()).is_ok()
    }

    pub(crate) fn handle_unlend(&self, h: &ConnHandle, token: u64) {
        if let Err(e) = self.lock().imports.unlend(token, h.peer_node()) {
            debug!(peer = %h.peer_node(), error = %e, "unlend ignored");
        }
        self.schedule_flush();
    }

    pub(crate) fn handle_release(
        &self,
        h: &ConnHandle,
        entries: &[ReleaseEntry],
    ) -> Result<(), RefError> {
        let mut freed = Vec::new();
        let result = {
            let mut st = self.lock();
            let mut result = Ok(());
            for e in entries {
                match st
                    .exports
                    .release(h.peer_node(), e.incarnation, e.target, e.count)
                {
                    Ok(Some((id, v))) => {
                        debug!(actor = %id, "export freed: no holder left");
                        v.clear_id();
                        freed.push(v);
                    }
                    Ok(None) | Err(RefError::Unknown(_)) | Err(RefError::Stale(_)) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            result
        };
        drop(freed);
        result
    }

    pub(crate) fn handle_down(&self, actor: ActorId) {
        let (inner, monitors) = {
            let mut st = self.lock();
            (
                st.inners.get(&actor).and_then(|(w, _)| w.upgrade()),
                st.actor_monitors.remove(&actor).unwrap_or_default(),
            )
        };
        if let Some(i) = inner {
            i.mark_dead(DeadReason::ActorStopped);
        }
        for r in monitors {
            r.do_send(ActorDown {
                actor,
                reason: DeadReason::ActorStopped,
            });
        }
    }

    pub(crate) fn import_dropped(&self, id: ActorId, instance: u64) {
        {
            let mut st = self.lock();
            match st.inners.get(&id) {
                Some((_, inst)) if *inst == instance => {
                    st.inners.remove(&id);
                    st.imports.handles_dropped(id);
                }
                _ => return,
            }
        }
        self.schedule_flush();
    }

    /// Releases go out in batches: the first drop schedules a flush a few
    /// milliseconds later, and every drop until then joins it.
    pub(crate) fn schedule_flush(&self) {
        if self.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.supervisor.get() {
            Some(s) if s.connected() => s.do_send(Flush),
            _ => self.flush_ref_traffic(),
        }
    }

    pub(crate) fn flush_ref_traffic(&self) {
        self.flush_scheduled.store(false, Ordering::Release);
        let mut out: Vec<(ConnHandle, Command)> = Vec::new();
        {
            let mut st = self.lock();
            while let Some((owner, entries)) = st.imports.poll_release() {
                if let Some(c) = st.conns.get(&owner).and_then(|v| v.first()) {
                    out.push((c.clone(), Command::Release(entries)));
                }
            }
            while let Some((lender, token)) = st.imports.poll_unlend() {
                if let Some(c) = st.conns.get(&lender).and_then(|v| v.first()) {
                    out.push((c.clone(), Command::Unlend(token)));
                }
            }
        }
        for (c, cmd) in out {
            let _ = c.0.ctl.send(cmd);
        }
    }

    /// Turns references leaving in a message into wire references, counting
    /// them. All or nothing: on error nothing stays counted.
    pub(crate) fn account_out(
        &self,
        conn: &ConnHandle,
        refs: &[OutRef],
    ) -> Result<Vec<WireRef>, RemoteError> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let peer = conn.peer_node();
        let mut st = self.lock();
        let mut wire = Vec::with_capacity(refs.len());
        let mut counted: Vec<LocalId> = Vec::new();
        let mut lent: Vec<u64> = Vec::new();
        let mut failure = None;
        for r in refs {
            match r {
                OutRef::Local(id) => {
                    match st.exports.note_sent(id.local, peer) {
                        Ok(()) => counted.push(id.local),
                        Err(RefError::TooManyRefs { max, .. }) => {
                            warn!(peer = %peer, max, "limit reached: references one peer may hold");
                            failure = Some(RemoteError::LimitReached {
                                what: "references one peer may hold from this node",
                                max,
                            });
                            break;
                        }
                        Err(_) => {} // gone: travels as a dead reference
                    }
                    wire.push(WireRef {
                        actor: *id,
                        lend_token: 0,
                        owner_addr: String::new(),
                    });
                }
                OutRef::Imported(i) => {
                    if i.id.node == peer {
                        wire.push(WireRef {
                            actor: i.id,
                            lend_token: 0,
                            owner_addr: String::new(),
                        });
                        continue;
                    }
                    let owner_addr = st
                        .conns
                        .get(&i.id.node)
                        .and_then(|v| v.first())
                        .map(|c| c.0.reach.clone())
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(|| i.owner_addr.clone());
                    match st.imports.lend(i.id, peer) {
                        Ok(token) => {
                            lent.push(token);
                            wire.push(WireRef {
                                actor: i.id,
                                lend_token: token,
                                owner_addr,
                            });
                        }
                        Err(_) => wire.push(WireRef {
                            actor: i.id,
                            lend_token: 0,
                            owner_addr: String::new(),
                        }),
                    }
                }
                OutRef::Dead(id) => wire.push(WireRef {
                    actor: *id,
                    lend_token: 0,
                    owner_addr: String::new(),
                }),
            }
        }
        if let Some(e) = failure {
            let mut freed = Vec::new();
            for l in counted {
                if let Ok(Some((_, v))) = st.exports.release(peer, self.incarnation, l, 1) {
                    v.clear_id();
                    freed.push(v);
                }
            }
            for r in refs {
                if let OutRef::Local(id) = r {
                    if let Some((_, v)) = st.exports.free_if_unheld(id.local) {
                        v.clear_id();
                        freed.push(v);
                    }
                }
            }
            for t in lent {
                let _ = st.imports.unlend(t, peer);
            }
            drop(st);
            drop(freed);
            return Err(e);
        }
        Ok(wire)
    }

    /// Frees the exports a message made and then did not send.
    pub(crate) fn discard_out(&self, refs: &[OutRef]) {
        let mut freed = Vec::new();
        {
            let mut st = self.lock();
            for r in refs {
                if let OutRef::Local(id) = r {
                    if let Some((_, v)) = st.exports.free_if_unheld(id.local) {
                        v.clear_id();
                        freed.push(v);
                    }
                }
            }
        }
        drop(freed);
    }

    /// Exports a local actor if it is not exported yet; returns its id.
    pub(crate) fn ensure_exported<A: Actor>(
        self: &Arc<Self>,
        entry: &Arc<ExportEntry<A>>,
    ) -> ActorId {
        let mut st = self.lock();
        let mut id = entry.id.lock().expect("not poisoned");
        if let Some(id) = *id {
            if st.exports.get(id.incarnation, id.local).is_ok() {
                return id;
            }
        }
        let new = st.exports.export(entry.clone(), entry.pinned);
        *id = Some(new);
        new
    }

    pub(crate) fn register<A: Actor>(
        self: &Arc<Self>,
        name: &str,
        entry: Arc<ExportEntry<A>>,
    ) -> Result<ActorId, RemoteError> {
        if name.is_empty() || name.len() > 255 {
            return Err(RemoteError::Protocol {
                peer: "this node".into(),
                reason: "names are 1 to 255 bytes".into(),
            });
        }
        let mut st = self.lock();
        if st.names.contains_key(name) {
            return Err(RemoteError::Protocol {
                peer: "this node".into(),
                reason: format!("the name {name:?} is already registered"),
            });
        }
        let id = st.exports.export(entry.clone(), true);
        *entry.id.lock().expect("not poisoned") = Some(id);
        st.names.insert(name.to_owned(), id.local);
        Ok(id)
    }

    /// Handles a call or cast that arrived on `h`; returns what is left
    /// for the driver to do.
    /// Counts calls and one-way messages delivered (a driver adds its own
    /// once per poll).
    pub(crate) fn count_calls_in(&self, n: u64) {
        self.calls_in.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dispatch_inbound(
        self: &Arc<Self>,
        h: &ConnHandle,
        call: Call,
        fds: Vec<OwnedFd>,
    ) -> Dispatch {
        let request = call.header.request;
        let actor = ActorId {
            node: self.id,
            incarnation: call.header.incarnation,
            local: call.header.target,
        };
        let span = tracing::debug_span!("call", %actor, msg = call.type_name(), request);
        let _entered = span.enter();
        debug!(bytes = call.payload.len(), "call received");
        let refs = self.resolve_refs(h, &call.refs);
        let reply = (request != 0).then(|| ReplySink {
            conn: h.clone(),
            node: self.clone(),
            request,
            done: false,
        });
        if fds.len() != call.header.fds as usize {
            return match reply {
                Some(r) => Dispatch::Reply(r.fail(
                    ReplyStatus::BadPayload,
                    "the descriptors announced did not arrive with the message",
                )),
                None => Dispatch::Done,
            };
        }
        let target = if call.header.incarnation != self.incarnation {
            Err(ReplyStatus::ActorStopped)
        } else {
            let st = self.lock();
            match st.exports.get(call.header.incarnation, call.header.target) {
                Ok(e) => Ok(e.clone()),
                Err(RefError::Stale(_)) => Err(ReplyStatus::ActorStopped),
                Err(_) => Err(ReplyStatus::UnknownActor),
            }
        };
        match target {
            Ok(t) => t.dispatch(Inbound {
                type_name: call.type_name,
                payload: call.payload,
                refs,
                fds,
                blobs: call.blobs,
                reply,
                conn: h,
                span: span.clone(),
            }),
            Err(status) => match reply {
                Some(r) => {
                    let text = format!("no actor {} on this node", call.header.target);
                    Dispatch::Reply(r.fail(status, &text))
                }
                None => Dispatch::Done,
            },
        }
    }

    pub(crate) async fn connect_addr(
        self: &Arc<Self>,
        addr: &str,
    ) -> Result<ConnHandle, RemoteError> {
        let parsed: Address =
            addr.parse()
                .map_err(|e: courier_runtime::transport::AddressError| {
                    RemoteError::Unreachable {
                        address: addr.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
        let key = parsed.to_string();
        let waiter = {
            let mut st = self.lock();
            if let Some(c) = st.by_addr.get(&key) {
                if !c.is_closed() {
                    return Ok(c.clone());
                }
            }
            match st.connecting.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    st.connecting.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            return rx.await.map_err(|_| RemoteError::Unreachable {
                address: key.clone(),
                reason: "the connection attempt was abandoned".into(),
            })?;
        }
        let result = self.dial(&parsed, &key).await;
        let waiters = self.lock().connecting.remove(&key).unwrap_or_default();
        for w in waiters {
            let _ = w.send(result.clone());
        }
        result
    }

    async fn dial(self: &Arc<Self>, addr: &Address, key: &str) -> Result<ConnHandle, RemoteError> {
        let unreachable = |reason: String| RemoteError::Unreachable {
            address: key.to_owned(),
            reason,
        };
        let attempt = async {
            let link = self
                .transport
                .connect(addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            self.handshaking.fetch_add(1, Ordering::AcqRel);
            let rx = self.spawn_driver(link, Role::Initiator, addr.scheme(), Some(key.to_owned()));
            rx.await
                .map_err(|_| unreachable("the connection ended during the handshake".into()))?
        };
        match tokio::time::timeout(self.limits.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(unreachable(format!(
                "no authenticated connection within {:?}",
                self.limits.connect_timeout
            ))),
        }
    }

    pub(crate) async fn connect_node(
        self: &Arc<Self>,
        node: NodeId,
        addr: &str,
    ) -> Result<ConnHandle, RemoteError> {
        let existing = self
            .lock()
            .conns
            .get(&node)
            .and_then(|v| v.iter().find(|c| !c.is_closed()).cloned());
        if let Some(c) = existing {
            return Ok(c);
        }
        if addr.is_empty() {
            return Err(RemoteError::Unreachable {
                address: format!("node {node}"),
                reason: "no address is known for that node".into(),
            });
        }
        let c = self.connect_addr(addr).await?;
        if c.peer_node() != node {
            return Err(RemoteError::Unreachable {
                address: addr.to_owned(),
                reason: format!("expected node {node} there, found node {}", c.peer_node()),
            });
        }
        Ok(c)
    }

    async fn accept_loop(self: Arc<Self>, mut listener: Box<dyn Listener>) {
        let scheme = listener.local_addr().scheme();
        loop {
            // Shutdown wakes this loop even when no one connects: otherwise
            // the listener, and through it the whole node, would live on.
            // (Found by the soak test: a descriptor per stopped node.)
            let stop = self.stop_accepting.notified();
            tokio::pin!(stop);
            stop.as_mut().enable();
            if self.shut.load(Ordering::Acquire) {
                return;
            }
            let r = tokio::select! {
                r = poll_fn(|cx| listener.poll_accept(cx)) => r,
                _ = &mut stop => return,
            };
            if self.shut.load(Ordering::Acquire) {
                return;
            }
            match r {
                Ok(link) => {
                    let n = self.handshaking.fetch_add(1, Ordering::AcqRel);
                    let eviction = Arc::new(Eviction::default());
                    {
                        // Full: the oldest inbound handshake makes room. An
                        // honest peer finishes in a few round trips, so a
                        // flood of clients that never finish cannot keep it
                        // out; refusing the newest instead would let them.
                        let mut queue = self.inbound_handshakes.lock().expect("not poisoned");
                        queue.retain(|w| w.upgrade().is_some_and(|e| e.is_live()));
                        if n >= self.limits.max_handshaking {
                            let evicted = std::iter::from_fn(|| queue.pop_front())
                                .filter_map(|w| w.upgrade())
                                .any(|e| e.evict());
                            if !evicted {
                                drop(queue);
                                self.handshake_ended();
                                warn!(remote = %link.peer_addr(), "too many connections in the handshake; refused");
                                drop(link);
                                continue;
                            }
                            warn!(remote = %link.peer_addr(),
                                  "too many connections in the handshake; the oldest was dropped");
                        }
                        queue.push_back(Arc::downgrade(&eviction));
                    }
                    drop(self.spawn_driver_evictable(
                        link,
                        Role::Acceptor,
                        scheme,
                        None,
                        Some(eviction),
                    ));
                }
                Err(courier_runtime::transport::TransportError::Closed) => return,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The per-node supervisor actor: batches reference releases and keeps the
/// node's housekeeping on the node's arbiter.
pub struct Supervisor {
    node: Weak<NodeShared>,
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        let node = self.node.clone();
        ctx.run_later(Duration::from_millis(2), move |_, _| {
            if let Some(n) = node.upgrade() {
                n.flush_ref_traffic();
            }
        });
    }
}

/// A running Courier node: the handle applications use.
#[derive(Clone)]
pub struct Node {
    pub(crate) shared: Arc<NodeShared>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .finish()
    }
}

/// Configures and starts a [`Node`].
pub struct NodeBuilder {
    listen: Vec<String>,
    node_id: Option<NodeId>,
    name: Option<String>,
    keyring: Option<Keyring>,
    liveness: LivenessConfig,
    handshake_timeout: Duration,
    frame_mac: FrameMac,
    pub(crate) limits: Limits,
    transport: Option<Arc<dyn Transport>>,
    links: Vec<(Box<dyn Link>, Role, &'static str)>,
    peers: Vec<String>,
    error: Option<String>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            node_id: None,
            name: None,
            keyring: None,
            liveness: LivenessConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            frame_mac: FrameMac::Auto,
            limits: Limits::default(),
            transport: None,
            links: Vec::new(),
            peers: Vec::new(),
            error: None,
        }
    }
}

impl NodeBuilder {
    /// Listens on `addr` (`tcp://`, `unix://`, `quic://`, `fd://`).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push(addr.into());
        self
    }

    /// A fixed node id (default: random at each start).
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id);
        self
    }

    /// A human name for logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The shared secret (at least 16 bytes). Default: `COURIER_COOKIE`,
    /// else the cookie file (see [`crate::cookie::default_cookie_path`]).
    pub fn cookie(mut self, cookie: impl AsRef<[u8]>) -> Self {
        match Key::new("default", cookie.as_ref().to_vec()) {
            Ok(k) => self.keyring = Some(Keyring::single(k)),
            Err(e) => self.error = Some(e.to_string()),
        }
        self
    }

    /// Named keys: the first proves, all are accepted (key rotation, or
    /// telling identities apart).
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// Heartbeat interval and the silence after which a peer is dead.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.liveness = LivenessConfig { interval, timeout };
        self
    }

    /// How long a handshake may take.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// When frames carry MACs.
    pub fn frame_mac(mut self, policy: FrameMac) -> Self {
        self.frame_mac = policy;
        self
    }

    /// Limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The transport (default: `courier-transports`' `AnyTransport` for
    /// tcp, unix and fd; QUIC needs a configured transport).
    pub fn transport(mut self, t: Arc<dyn Transport>) -> Self {
        self.transport = Some(t);
        self
    }

    /// Adds an already-open link (an inherited socketpair, say).
    pub fn link(mut self, link: Box<dyn Link>, role: Role, scheme: &'static str) -> Self {
        self.links.push((link, role, scheme));
        self
    }

    /// Connects to the node at `addr` once the node has started, in the
    /// background (a failure is logged; a later lookup connects on demand).
    pub fn peer(mut self, addr: impl Into<String>) -> Self {
        self.peers.push(addr.into());
        self
    }

    /// Starts the node inside the current actix system: binds every listen
    /// address, starts the supervisor, and accepts connections.
    pub async fn start(self) -> Result<Node, RemoteError> {
        let config_err = |reason: String| RemoteError::Protocol {
            peer: "this node".into(),
            reason,
        };
        if let Some(e) = self.error {
            return Err(RemoteError::Authentication {
                peer: "this node".into(),
                reason: e,
            });
        }
        self.liveness
            .validate()
            .map_err(|e| config_err(e.to_owned()))?;
        install_panic_hook();
        let keyring = match self.keyring {
            Some(k) => k,
            None => default_keyring()?,
        };
        let transport = match self.transport {
            Some(t) => t,
            None => default_transport()?,
        };
        let id = match self.node_id {
            Some(id) => id,
            None => {
                let mut b = [0u8; 16];
                getrandom::fill(&mut b).map_err(|e| config_err(format!("no randomness: {e}")))?;
                NodeId(b)
            }
        };
        let mut inc = [0u8; 8];
        getrandom::fill(&mut inc).map_err(|e| config_err(format!("no randomness: {e}")))?;
        let incarnation = Incarnation(u64::from_be_bytes(inc) | 1);
        let shared = Arc::new(NodeShared {
            id,
            incarnation,
            name: self.name,
            keyring,
            liveness: self.liveness,
            handshake_timeout: self.handshake_timeout,
            frame_mac: self.frame_mac,
            transport: transport.clone(),
            state: Mutex::new(State {
                exports: Exports::new(id, incarnation, self.limits.max_refs_per_peer),
                names: HashMap::new(),
                imports: Imports::new(),
                inners: HashMap::new(),
                next_instance: 0,
                conns: HashMap::new(),
                by_addr: HashMap::new(),
                connecting: HashMap::new(),
                acquires: HashMap::new(),
                actor_monitors: HashMap::new(),
                node_monitors: HashMap::new(),
            }),
            limits: self.limits,
            listen: Mutex::new(Vec::new()),
            conn_ids: AtomicU64::new(0),
            handshaking: AtomicUsize::new(0),
            inbound_handshakes: Mutex::new(VecDeque::new()),
            supervisor: OnceLock::new(),
            flush_scheduled: AtomicBool::new(false),
            calls_in: AtomicU64::new(0),
            peers_lost: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            metrics: Metrics::default(),
            shut: AtomicBool::new(false),
            stop_accepting: tokio::sync::Notify::new(),
        });
        // Slot 0: the root actor, answering lookups.
        {
            let mut st = shared.lock();
            let root: Arc<dyn ExportedAny> = Arc::new(Root {
                node: Arc::downgrade(&shared),
            });
            let rid = st.exports.export(root, true);
            debug_assert_eq!(rid.local, LocalId::ROOT);
        }
        // The node-info actor, answering `courier ls` and `courier stats`.
        crate::info::export_node_info(&Node {
            shared: shared.clone(),
        })?;
        let sup = Supervisor {
            node: Arc::downgrade(&shared),
        }
        .start();
        let _ = shared.supervisor.set(sup);
        for a in &self.listen {
            let addr: Address = a
                .parse()
                .map_err(|e: courier_runtime::transport::AddressError| config_err(e.to_string()))?;
            let listener = transport
                .listen(&addr)
                .await
                .map_err(|e| RemoteError::Unreachable {
                    address: a.clone(),
                    reason: format!("cannot listen: {e}"),
                })?;
            let bound = listener.local_addr();
            info!(node = %id, address = %bound, "listening");
            shared.listen.lock().expect("not poisoned").push(bound);
            actix::spawn(shared.clone().accept_loop(listener));
        }
        for (link, role, scheme) in self.links {
            shared.handshaking.fetch_add(1, Ordering::AcqRel);
            drop(shared.spawn_driver(link, role, scheme, None));
        }
        for addr in self.peers {
            let node = shared.clone();
            actix::spawn(async move {
                match node.connect_addr(&addr).await {
                    Ok(c) => info!(peer = %c.peer_node(), address = %addr, "connected to peer"),
                    Err(e) => warn!(address = %addr, error = %e, "could not connect to peer"),
                }
            });
        }
        Ok(Node { shared })
    }
}

fn default_keyring() -> Result<Keyring, RemoteError> {
    let cookie = match std::env::var("COURIER_COOKIE") {
        Ok(c) => c.into_bytes(),
        Err(_) => {
            let path = crate::cookie::default_cookie_path().ok_or(RemoteError::Authentication {
                peer: "this node".into(),
                reason: "no cookie configured, COURIER_COOKIE unset, and no home directory for a cookie file".into(),
            })?;
            crate::cookie::load_or_create_cookie(&path)?
        }
    };
    Key::new("default", cookie)
        .map(Keyring::single)
        .map_err(|e| RemoteError::Authentication {
            peer: "this node".into(),
            reason: e.to_string(),
        })
}

#[cfg(feature = "transports")]
fn default_transport() -> Result<Arc<dyn Transport>, RemoteError> {
    Ok(Arc::new(courier_transports::AnyTransport::new()))
}

#[cfg(not(feature = "transports"))]
fn default_transport() -> Result<Arc<dyn Transport>, RemoteError> {
    Err(RemoteError::Protocol {
        peer: "this node".into(),
        reason: "no transport given and the `transports` feature is off".into(),
    })
}

impl Node {
    /// Starts configuring a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// This start's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.shared.incarnation
    }

    /// The addresses actually bound (port 0 replaced by the real port).
    pub fn local_addrs(&self) -> Vec<Address> {
        self.shared.listen.lock().expect("not poisoned").clone()
    }

    /// Exports an actor: say which messages it handles remotely, then
    /// [`Export::register`] it under a name or take an
    /// [`Export::anonymous`] reference.
    pub fn export<A: Actor>(&self, addr: Addr<A>) -> Export<A> {
        Export::new(self.clone(), addr, None)
    }

    /// Starts an actor from `factory` and exports it; if it stops or
    /// panics it is started again from `factory`, keeping its id, so remote
    /// references to it keep working.
    pub fn export_supervised<A, F>(&self, factory: F) -> Export<A>
    where
        A: Actor<Context = Context<A>>,
        F: Fn() -> A + Send + Sync + 'static,
    {
        let start: Box<dyn Fn() -> Addr<A> + Send + Sync> = Box::new(move || factory().start());
        let addr = start();
        Export::new(self.clone(), addr, Some(start))
    }

    /// Connects (if not connected) to the node at `addr` and returns a
    /// reference to the actor registered there as `name`.
    pub async fn lookup<A: Actor>(
        &self,
        addr: &str,
        name: &str,
    ) -> Result<RemoteAddr<A>, RemoteError> {
        let conn = self.shared.connect_addr(addr).await?;
        lookup_via(&conn, name).await
    }

    /// Looks `name` up on a peer this node is connected to (for example a
    /// worker joined by a socketpair, which has no address to dial).
    pub async fn lookup_on<A: Actor>(
        &self,
        node: NodeId,
        name: &str,
    ) -> Result<RemoteAddr<A>, RemoteError> {
        let conn = self.shared.connect_node(node, "").await?;
        lookup_via(&conn, name).await
    }

    /// Connects to `addr` (if not connected) and returns who is there.
    pub async fn connect(&self, addr: &str) -> Result<PeerSummary, RemoteError> {
        let c = self.shared.connect_addr(addr).await?;
        Ok(summary(&c))
    }

    /// Sends `to` an [`ActorDown`] when the actor behind `r` stops or its
    /// node becomes unreachable.
    pub fn monitor<A: Actor>(&self, r: &RemoteAddr<A>, to: Recipient<ActorDown>) {
        let Some(id) = r.id() else { return };
        if let Some(reason) = r.dead_reason() {
            to.do_send(ActorDown { actor: id, reason });
            return;
        }
        self.shared
            .lock()
            .actor_monitors
            .entry(id)
            .or_default()
            .push(to);
    }

    /// Sends `to` a [`NodeDown`] when the connection to `node` is lost
    /// (immediately if there is none).
    pub fn monitor_node(&self, node: NodeId, to: Recipient<NodeDown>) {
        let mut st = self.shared.lock();
        if !st.conns.contains_key(&node) {
            drop(st);
            to.do_send(NodeDown {
                node,
                reason: "not connected".into(),
            });
            return;
        }
        st.node_monitors.entry(node).or_default().push(to);
    }

    /// Removes the actor registered as `name` from the registry and the
    /// export table. Peers holding references are told (their references
    /// turn dead with [`DeadReason::ActorStopped`] and their monitors fire).
    /// Returns whether the name was registered.
    pub fn unregister(&self, name: &str) -> bool {
        let (removed, holders) = {
            let mut st = self.shared.lock();
            let Some(local) = st.names.remove(name) else {
                return false;
            };
            let id = st.exports.id(local);
            let holders: Vec<(ActorId, ConnHandle)> = st
                .exports
                .holders(local)
                .iter()
                .filter_map(|h| st.conns.get(&h.peer).and_then(|v| v.first()).cloned())
                .map(|c| (id, c))
                .collect();
            let removed = st.exports.unexport(local);
            (removed, holders)
        };
        if let Some((v, _)) = &removed {
            v.clear_id();
        }
        drop(removed);
        for (id, c) in holders {
            let _ = c.0.ctl.send(Command::Down(id));
        }
        true
    }

    /// Established connections.
    pub fn peers(&self) -> Vec<PeerSummary> {
        let st = self.shared.lock();
        st.conns.values().flatten().map(summary).collect()
    }

    /// Every exported actor, with who holds references to it (the leak
    /// detector's view). The built-in actors (the root in slot 0 and the
    /// node-info actor, see [`crate::info`]) are left out.
    pub fn exports(&self) -> Vec<ExportSummary> {
        let st = self.shared.lock();
        let names: HashMap<LocalId, &String> = st.names.iter().map(|(n, l)| (*l, n)).collect();
        let info = st.names.get(NODE_INFO).copied();
        st.exports
            .iter()
            .filter(|(id, _, _)| id.local != LocalId::ROOT && Some(id.local) != info)
            .map(|(id, v, holders)| ExportSummary {
                id,
                actor_type: v.actor_type(),
                name: names.get(&id.local).map(|s| (*s).clone()),
                message_types: v.message_types(),
                holders: holders.to_vec(),
                restarts: v.restarts(),
            })
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        let st = self.shared.lock();
        let info = st.names.get(NODE_INFO).copied();
        let builtin = 1 + usize::from(info.is_some());
        let exported_refs = st
            .exports
            .iter()
            .filter(|(id, _, _)| Some(id.local) != info)
            .flat_map(|(_, _, holders)| holders.iter().map(|h| h.count))
            .sum();
        let m = &self.shared.metrics;
        NodeStats {
            connections: st.conns.values().map(Vec::len).sum(),
            exports: st.exports.len().saturating_sub(builtin),
            exported_refs,
            imports: st.imports.len(),
            calls_in: self.shared.calls_in.load(Ordering::Relaxed),
            calls_out: Metrics::get(&m.calls_out),
            bytes_in: Metrics::get(&m.bytes_in),
            bytes_out: Metrics::get(&m.bytes_out),
            peers_lost: self.shared.peers_lost.load(Ordering::Relaxed),
            handshakes_failed: self.shared.handshakes_failed.load(Ordering::Relaxed),
            latency: m.latency.summary(),
        }
    }

    /// Closes every connection with a goodbye and stops listening.
    pub async fn shutdown(&self) {
        self.shared.shut.store(true, Ordering::Release);
        self.shared.stop_accepting.notify_waiters();
        let conns: Vec<ConnHandle> = self
            .shared
            .lock()
            .conns
            .values()
            .flatten()
            .cloned()
            .collect();
        for c in conns {
            let _ =
                c.0.ctl
                    .send(Command::Close("the node is shutting down".into()));
        }
        // Give the goodbyes a moment to leave.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// Adds an already-open link (for example a socketpair end) and waits
    /// for its handshake; `role` says which side speaks first.
    pub async fn add_link(
        &self,
        link: Box<dyn Link>,
        role: Role,
        scheme: &'static str,
    ) -> Result<PeerSummary, RemoteError> {
        self.shared.handshaking.fetch_add(1, Ordering::AcqRel);
        let rx = self.shared.spawn_driver(link, role, scheme, None);
        let c = rx.await.map_err(|_| RemoteError::Protocol {
            peer: scheme.into(),
            reason: "the link ended during the handshake".into(),
        })??;
        Ok(summary(&c))
    }
}

async fn lookup_via<A: Actor>(conn: &ConnHandle, name: &str) -> Result<RemoteAddr<A>, RemoteError> {
    let root = ActorId {
        node: conn.peer_node(),
        incarnation: conn.0.peer.incarnation,
        local: LocalId::ROOT,
    };
    let payload = courier_runtime::codec::encode(name)?;
    let (tx, rx) = oneshot::channel();
    conn.send(Command::Call {
        target: root,
        type_name: LOOKUP,
        payload,
        refs: Vec::new(),
        fds: Vec::new(),
        reply: tx,
    })
    .await?;
    let reply: ReplyIn = rx.await.map_err(|_| conn.lost())??;
    match reply.status {
        ReplyStatus::Ok => {
            let r = reply.refs.into_iter().next().ok_or(RemoteError::Protocol {
                peer: conn.0.remote.clone(),
                reason: "lookup reply without a reference".into(),
            })?;
            RemoteAddr::from_resolved(r).map_err(|e| RemoteError::Codec {
                op: "decode",
                type_name: std::any::type_name::<A>().to_owned(),
                reason: e,
            })
        }
        _ => Err(RemoteError::UnknownActor {
            node: conn.peer_node(),
            what: format!("named {name:?}"),
        }),
    }
}

fn summary(c: &ConnHandle) -> PeerSummary {
    PeerSummary {
        node: c.0.peer.node,
        incarnation: c.0.peer.incarnation,
        key_id: c.0.peer.key_id.clone(),
        scheme: c.0.scheme,
        remote: c.0.remote.clone(),
    }
}

pub(crate) const LOOKUP: &str = "courier.lookup";

/// The root actor in slot 0: it answers lookups by name.
struct Root {
    node: Weak<NodeShared>,
}

/// Serializes as a reference to a local export.
struct LocalRef(ActorId);

impl Serialize for LocalRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = refctx::push_ref::<S>(OutRef::Local(self.0))?;
        s.serialize_newtype_struct("courier.ref", &i)
    }
}

impl ExportedAny for Root {
    fn dispatch(self: Arc<Self>, inbound: Inbound) -> Dispatch {
        let Some(reply) = inbound.reply else {
            return Dispatch::Done;
        };
        let Some(node) = self.node.upgrade() else {
            return Dispatch::Done;
        };
        if &inbound.type_name[..] != LOOKUP.as_bytes() {
            let name = String::from_utf8_lossy(&inbound.type_name).into_owned();
            return Dispatch::Reply(reply.fail(ReplyStatus::UnknownMessage, &name));
        }
        let found = courier_runtime::codec::decode::<String>(&inbound.payload)
            .ok()
            .and_then(|name| {
                let st = node.lock();
                st.names.get(&name).map(|l| st.exports.id(*l))
            });
        Dispatch::Reply(match found {
            Some(id) => reply.reply(&LocalRef(id)),
            None => reply.fail(ReplyStatus::UnknownActor, "no actor by that name"),
        })
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn message_types(&self) -> Vec<&'static str> {
        vec![LOOKUP]
    }

    fn actor_type(&self) -> &'static str {
        "courier::Root"
    }

    fn clear_id(&self) {}

    fn restarts(&self) -> u64 {
        0
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Node>();
}

#[allow(dead_code)]
fn _bounds<A: Actor + Handler<M>, M: crate::RemoteMessage>()
where
    A::Context: ToEnvelope<A, M>,
{
}
