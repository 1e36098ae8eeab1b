//! One connection's protocol state: the handshake, then calls, replies,
//! reference traffic and heartbeats, with per-frame MACs where negotiated.
//!
//! A [`Session`] is sans-IO. Feed it what happened, then drain what it wants:
//!
//! ```text
//!            handle_frame(now, bytes)      poll_transmit() -> frame bodies to send
//!  link ---> handle_timeout(now)    Session
//!            handle_link_lost(why)         poll_event()    -> Established, Call, Reply, ...
//!  app  ---> send_call / send_reply / ...  poll_timeout()  -> when to call handle_timeout
//! ```
//!
//! Time and nonces come from the caller, so a run replays exactly.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{HandshakeError, ProtocolError, RemoteError};
use crate::frame::{FrameError, DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME};
use crate::handshake::{
    refusal_for, AwaitChallenge, AwaitHello, AwaitResponse, AwaitWelcome, Established,
    HandshakeConfig, PeerInfo,
};
use crate::id::{validate_type_name, ActorId, Incarnation, LocalId, RequestIdSet};
use crate::liveness::{Liveness, LivenessAction, LivenessConfig};
use crate::wire::{
    encode_call, encode_control, encode_release, encode_reply, features, Call, CallHeader,
    DecodeError, Envelope, ReleaseEntry, Reply, ReplyStatus, WireRef, CALL_HEADER_LEN, NONCE_LEN,
    REPLY_HEADER_LEN, TAG_LEN,
};

type HmacSha256 = Hmac<Sha256>;

/// Which end of the link this session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This side connected: it sends the hello.
    Initiator,
    /// This side accepted: it answers with the challenge.
    Acceptor,
}

/// Settings of one session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Identity and keys for the handshake.
    pub handshake: HandshakeConfig,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// Heartbeat settings.
    pub liveness: LivenessConfig,
    /// Largest frame body after authentication (MAC excluded).
    pub max_frame: usize,
    /// Most calls awaiting replies at once.
    pub max_pending_calls: usize,
}

impl SessionConfig {
    /// Defaults around a handshake config: 10 s handshake, 1 s heartbeats
    /// with a 3 s timeout, 16 MiB frames, 65,536 pending calls.
    pub fn new(handshake: HandshakeConfig) -> Self {
        Self {
            handshake,
            handshake_timeout: Duration::from_secs(10),
            liveness: LivenessConfig::default(),
            max_frame: DEFAULT_MAX_FRAME,
            max_pending_calls: 65_536,
        }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The handshake failed.
    Handshake(HandshakeError),
    /// The peer broke the protocol.
    Protocol(ProtocolError),
    /// The peer said goodbye.
    PeerGoodbye(String),
    /// This side closed.
    LocalClose(String),
    /// Nothing arrived from the peer for too long.
    HeartbeatTimeout {
        /// How long it was silent.
        silent_for: Duration,
    },
    /// The link failed or ended.
    LinkLost(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Handshake(e) => write!(f, "handshake failed: {e}"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::PeerGoodbye(why) => write!(f, "the peer said goodbye ({why})"),
            Self::LocalClose(why) => write!(f, "closed by this node ({why})"),
            Self::HeartbeatTimeout { silent_for } => {
                write!(f, "no heartbeat from the peer for {silent_for:?}")
            }
            Self::LinkLost(why) => write!(f, "the connection broke ({why})"),
        }
    }
}

/// What the session has to tell its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handshake succeeded; application frames may flow.
    Established(PeerInfo),
    /// A call to dispatch; answer with [`Session::send_reply`].
    Call(Call),
    /// A one-way message to dispatch.
    Cast(Call),
    /// The reply to one of our calls.
    Reply(Reply),
    /// The peer released references it held.
    Release(Vec<ReleaseEntry>),
    /// The peer asks for a count on an actor of ours (third-party hand-off).
    Acquire {
        /// Correlates our answer.
        request: u64,
        /// Incarnation named.
        incarnation: Incarnation,
        /// The actor.
        target: LocalId,
    },
    /// The answer to one of our acquires.
    Acquired {
        /// Our acquire.
        request: u64,
        /// Whether we now hold a count.
        ok: bool,
    },
    /// The peer settled a loan we made.
    Unlend {
        /// The loan.
        token: u64,
    },
    /// An actor of the peer's that we held has stopped.
    Down {
        /// Its incarnation.
        incarnation: Incarnation,
        /// The actor on the peer.
        target: LocalId,
    },
    /// The session ended; `pending` lists the calls that got no reply.
    Closed {
        /// Why.
        reason: CloseReason,
        /// Request ids of calls left without a reply.
        pending: Vec<u64>,
    },
}

enum State {
    AwaitChallenge(AwaitChallenge),
    AwaitWelcome(AwaitWelcome),
    AwaitHello(AwaitHello),
    AwaitResponse(AwaitResponse),
    Open(Box<Open>),
    Closed,
}

struct Open {
    peer: PeerInfo,
    /// The peer said goodbye; the session ends when the link does, so that
    /// frames sent before the goodbye but delivered after it (multiplexed
    /// links do not keep order) are still taken.
    goodbye: Option<String>,
    mac: Option<FrameMac>,
    liveness: Liveness,
    next_request: u64,
    pending: RequestIdSet,
    next_acquire: u64,
    recv_seq: u64,
    send_seq: u64,
}

struct FrameMac {
    send: HmacSha256,
    recv: HmacSha256,
}

/// Counters a session keeps, for stats and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Frames handed to the link.
    pub frames_out: u64,
    /// Frames taken from the link.
    pub frames_in: u64,
    /// Replies that came after their call was cancelled, and were dropped.
    pub late_replies: u64,
}

/// One connection's protocol state machine.
pub struct Session {
    role: Role,
    config: SessionConfig,
    state: State,
    deadline: Instant,
    transmit: VecDeque<Bytes>,
    events: VecDeque<Event>,
    stats: SessionStats,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("state", &self.state_name())
            .field("peer", &self.peer())
            .finish()
    }
}

impl Session {
    /// Starts a session at `now`. `nonce` must be fresh random bytes;
    /// `binding` is the link's TLS channel binding, if any. An initiator
    /// queues its hello at once.
    pub fn new(
        config: SessionConfig,
        role: Role,
        now: Instant,
        nonce: [u8; NONCE_LEN],
        binding: Option<[u8; 32]>,
    ) -> Result<Self, HandshakeError> {
        config.liveness.validate().map_err(HandshakeError::Config)?;
        let mut transmit = VecDeque::new();
        let state = match role {
            Role::Initiator => {
                let (st, hello) = AwaitChallenge::start(config.handshake.clone(), nonce, binding)?;
                transmit.push_back(hello);
                State::AwaitChallenge(st)
            }
            Role::Acceptor => {
                State::AwaitHello(AwaitHello::new(config.handshake.clone(), nonce, binding)?)
            }
        };
        Ok(Self {
            role,
            deadline: now + config.handshake_timeout,
            config,
            state,
            transmit,
            events: VecDeque::new(),
            stats: SessionStats::default(),
        })
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The authenticated peer, once established.
    pub fn peer(&self) -> Option<&PeerInfo> {
        match &self.state {
            State::Open(o) => Some(&o.peer),
            _ => None,
        }
    }

    /// Whether the peer said goodbye (the session closes when the link ends).
    pub fn peer_said_goodbye(&self) -> bool {
        matches!(&self.state, State::Open(o) if o.goodbye.is_some())
    }

    /// Whether application frames may flow.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Whether the session has ended (frames to send may remain queued).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether frames after the handshake carry MACs.
    pub fn frame_mac(&self) -> bool {
        matches!(&self.state, State::Open(o) if o.mac.is_some())
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Calls awaiting replies.
    pub fn pending_calls(&self) -> usize {
        match &self.state {
            State::Open(o) => o.pending.len(),
            _ => 0,
        }
    }

    /// The largest frame body the link should accept now: tiny until the
    /// peer is authenticated.
    pub fn max_frame_len(&self) -> usize {
        match &self.state {
            State::Open(o) => self.config.max_frame + if o.mac.is_some() { TAG_LEN } else { 0 },
            _ => HANDSHAKE_MAX_FRAME,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::AwaitChallenge(_) => "AwaitChallenge",
            State::AwaitWelcome(_) => "AwaitWelcome",
            State::AwaitHello(_) => "AwaitHello",
            State::AwaitResponse(_) => "AwaitResponse",
            State::Open(_) => "Open",
            State::Closed => "Closed",
        }
    }

    /// The next frame body to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Open(o) => Some(o.liveness.poll_timeout()),
            State::Closed => None,
            _ => Some(self.deadline),
        }
    }

    /// Time passed: checks the handshake deadline and the heartbeat clock.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Closed => {}
            State::Open(o) => match o.liveness.handle_timeout(now) {
                LivenessAction::Idle => {}
                LivenessAction::SendHeartbeat => {
                    let ack = o.recv_seq;
                    self.push_control(now, &Envelope::Heartbeat { ack });
                }
                LivenessAction::PeerDead { silent_for } => {
                    self.close_with(CloseReason::HeartbeatTimeout { silent_for })
                }
            },
            _ => {
                if now >= self.deadline {
                    self.fail_handshake(HandshakeError::Timeout);
                }
            }
        }
    }

    /// Counts as hearing from the peer: used while this side deliberately
    /// stops reading (its own backpressure), so the peer is not blamed.
    pub fn handle_activity(&mut self, now: Instant) {
        if let State::Open(o) = &mut self.state {
            o.liveness.on_recv(now);
        }
    }

    /// The link ended or failed.
    pub fn handle_link_lost(&mut self, why: impl Into<String>) {
        match self.state {
            State::Closed => {}
            State::Open(ref mut o) => match o.goodbye.take() {
                Some(bye) => self.close_with(CloseReason::PeerGoodbye(bye)),
                None => self.close_with(CloseReason::LinkLost(why.into())),
            },
            _ => self.fail_handshake(HandshakeError::Closed),
        }
    }

    /// Ends a handshake still in progress to make room for others (the
    /// node is over its limit of connections in the handshake): the peer
    /// is refused as busy and the session closes with
    /// [`HandshakeError::Busy`]. No effect once established or closed.
    pub fn evict(&mut self) {
        if !matches!(self.state, State::Open(_) | State::Closed) {
            self.fail_handshake(HandshakeError::Busy);
        }
    }

    /// Closes the session, telling the peer why (if authenticated).
    pub fn close(&mut self, now: Instant, why: &str) {
        if matches!(self.state, State::Open(_)) {
            self.push_control(now, &Envelope::Goodbye(why.to_owned()));
        }
        if !self.is_closed() {
            self.close_with(CloseReason::LocalClose(why.to_owned()));
        }
    }

    /// One frame body arrived from the link; what it brings is queued for
    /// [`Self::poll_event`].
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        if let Some(ev) = self.receive(now, frame) {
            self.events.push_back(ev);
        }
    }

    /// [`Self::handle_frame`], handing back the frame's event at once when
    /// no earlier event waits (the usual case: a call, cast or reply on an
    /// open session), which spares queueing it; anything else the frame
    /// causes is queued as by `handle_frame`.
    pub fn receive(&mut self, now: Instant, frame: Bytes) -> Option<Event> {
        self.stats.frames_in += 1;
        // The common case, handled in place: moving the state out and back
        // costs a copy of the whole enum per frame.
        if let State::Open(o) = &mut self.state {
            let result = o.receive(now, frame, self.config.max_frame);
            return match result {
                Ok(Some(ev)) if self.events.is_empty() => Some(ev),
                other => {
                    self.after_receive(now, other);
                    None
                }
            };
        }
        self.handle_frame_slow(now, frame);
        None
    }

    fn handle_frame_slow(&mut self, now: Instant, frame: Bytes) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        if !matches!(state, State::Open(_) | State::Closed) && frame.len() > HANDSHAKE_MAX_FRAME {
            self.state = state;
            return self.fail_handshake(HandshakeError::FrameTooLarge(FrameError::TooLarge {
                len: frame.len(),
                max: HANDSHAKE_MAX_FRAME,
            }));
        }
        match state {
            State::Closed => {}
            State::AwaitChallenge(st) => match st.handle(&frame) {
                Ok((next, response)) => {
                    self.transmit.push_back(response);
                    self.state = State::AwaitWelcome(next);
                }
                Err(e) => self.fail_handshake(e),
            },
            State::AwaitWelcome(st) => match st.handle(&frame) {
                Ok(est) => self.open(now, est),
                Err(e) => self.fail_handshake(e),
            },
            State::AwaitHello(st) => match st.handle(&frame) {
                Ok((next, challenge)) => {
                    self.transmit.push_back(challenge);
                    self.state = State::AwaitResponse(next);
                }
                Err(e) => self.fail_handshake(e),
            },
            State::AwaitResponse(st) => match st.handle(&frame) {
                Ok((est, welcome)) => {
                    self.transmit.push_back(welcome);
                    self.open(now, est);
                }
                Err(e) => self.fail_handshake(e),
            },
            // Not reached (`receive` handles an open session in place), but
            // correct if it were.
            State::Open(mut o) => {
                let result = o.receive(now, frame, self.config.max_frame);
                self.state = State::Open(o);
                self.after_receive(now, result);
            }
        }
    }

    /// What an open session does with what a frame brought.
    fn after_receive(&mut self, now: Instant, result: Result<Option<Event>, Incoming>) {
        match result {
            Ok(Some(ev)) => self.events.push_back(ev),
            Ok(None) => {}
            Err(Incoming::Goodbye(why)) => {
                if let State::Open(o) = &mut self.state {
                    o.goodbye.get_or_insert(why);
                }
            }
            Err(Incoming::Late) => self.stats.late_replies += 1,
            Err(Incoming::Broken(e)) => {
                // Tell the peer before going: it helps debugging.
                self.push_control(now, &Envelope::Goodbye(format!("protocol error: {e}")));
                self.close_with(CloseReason::Protocol(e));
            }
        }
    }

    /// Sends a call to `target` on the peer; returns its request id.
    /// `payload` is the CBOR-encoded message; `fds` the number of
    /// descriptors the caller sends with the frame.
    pub fn send_call(
        &mut self,
        now: Instant,
        target: ActorId,
        type_name: &str,
        refs: &[WireRef],
        payload: &[u8],
        fds: u8,
    ) -> Result<u64, RemoteError> {
        self.send_message(now, target, type_name, refs, payload, fds, true)
    }

    /// Sends a one-way message to `target` on the peer.
    pub fn send_cast(
        &mut self,
        now: Instant,
        target: ActorId,
        type_name: &str,
        refs: &[WireRef],
        payload: &[u8],
        fds: u8,
    ) -> Result<(), RemoteError> {
        self.send_message(now, target, type_name, refs, payload, fds, false)
            .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_message(
        &mut self,
        now: Instant,
        target: ActorId,
        type_name: &str,
        refs: &[WireRef],
        payload: &[u8],
        fds: u8,
        is_call: bool,
    ) -> Result<u64, RemoteError> {
        let max_frame = self.config.max_frame;
        let max_pending = self.config.max_pending_calls;
        let o = self.open_mut()?;
        o.check_target(target)?;
        validate_type_name(type_name.as_bytes()).map_err(|e| RemoteError::Codec {
            op: "encode",
            type_name: type_name.to_owned(),
            reason: e.to_string(),
        })?;
        if refs.len() > u16::MAX as usize {
            return Err(RemoteError::LimitReached {
                what: "references in one message",
                max: u16::MAX as u64,
            });
        }
        let size = CALL_HEADER_LEN + type_name.len() + refs.len() * 64 + payload.len();
        if size > max_frame {
            return Err(RemoteError::TooLarge {
                size,
                max: max_frame,
            });
        }
        let request = if is_call {
            if o.pending.len() >= max_pending {
                return Err(RemoteError::LimitReached {
                    what: "calls awaiting replies on one connection",
                    max: max_pending as u64,
                });
            }
            o.next_request += 1;
            o.pending.insert(o.next_request);
            o.next_request
        } else {
            0
        };
        let header = CallHeader {
            request,
            incarnation: target.incarnation,
            target: target.local,
            fds,
        };
        let mut out = BytesMut::with_capacity(size + TAG_LEN);
        encode_call(&mut out, &header, type_name, refs, payload);
        self.push_frame(now, out);
        Ok(request)
    }

    /// Sends a call whose frame the caller built with
    /// [`crate::wire::encode_call`], its request id set to
    /// [`crate::wire::REQUEST_TO_ASSIGN`]: the payload is not copied again.
    /// Returns the request id assigned.
    pub fn send_call_frame(
        &mut self,
        now: Instant,
        target: ActorId,
        mut frame: BytesMut,
    ) -> Result<u64, RemoteError> {
        let max_pending = self.config.max_pending_calls;
        self.check_prebuilt(target, &frame, crate::wire::kind::CALL)?;
        let o = self.open_mut()?;
        if o.pending.len() >= max_pending {
            return Err(RemoteError::LimitReached {
                what: "calls awaiting replies on one connection",
                max: max_pending as u64,
            });
        }
        o.next_request += 1;
        let request = o.next_request;
        o.pending.insert(request);
        frame[8..16].copy_from_slice(&request.to_be_bytes());
        self.push_frame(now, frame);
        Ok(request)
    }

    /// Sends a one-way message whose frame the caller built with
    /// [`crate::wire::encode_call`] (request id 0).
    pub fn send_cast_frame(
        &mut self,
        now: Instant,
        target: ActorId,
        frame: BytesMut,
    ) -> Result<(), RemoteError> {
        self.check_prebuilt(target, &frame, crate::wire::kind::CAST)?;
        self.push_frame(now, frame);
        Ok(())
    }

    /// Sends a one-way message built in place, in `buf[start..]` (the
    /// link's own buffer, see `Link::begin_frame`), checked as by
    /// [`Self::send_cast_frame`]: appends its MAC when frames carry one.
    /// The caller hands the frame to the link only if this succeeds, and
    /// only when nothing waits in [`Self::poll_transmit`] (which would
    /// otherwise go out after it).
    pub fn send_cast_in_place(
        &mut self,
        now: Instant,
        target: ActorId,
        buf: &mut BytesMut,
        start: usize,
    ) -> Result<(), RemoteError> {
        debug_assert!(self.transmit.is_empty(), "frames wait in front");
        self.check_prebuilt(target, &buf[start..], crate::wire::kind::CAST)?;
        self.sign(now, buf, start);
        Ok(())
    }

    /// Sends a reply whose frame the caller built with
    /// [`crate::wire::encode_reply`].
    pub fn send_reply_frame(&mut self, now: Instant, frame: BytesMut) -> Result<(), RemoteError> {
        let max_frame = self.config.max_frame;
        self.open_mut()?;
        if frame.first() != Some(&crate::wire::kind::REPLY) {
            return Err(RemoteError::Protocol {
                peer: "peer".into(),
                reason: "not a reply frame".into(),
            });
        }
        if frame.len() > max_frame {
            return Err(RemoteError::TooLarge {
                size: frame.len(),
                max: max_frame,
            });
        }
        self.push_frame(now, frame);
        Ok(())
    }

    fn check_prebuilt(
        &mut self,
        target: ActorId,
        frame: &[u8],
        kind: u8,
    ) -> Result<(), RemoteError> {
        let max_frame = self.config.max_frame;
        let o = self.open_mut()?;
        o.check_target(target)?;
        if frame.len() < CALL_HEADER_LEN || frame[0] != kind {
            return Err(RemoteError::Protocol {
                peer: o.peer.node.to_string(),
                reason: "malformed prebuilt frame".into(),
            });
        }
        if frame.len() > max_frame {
            return Err(RemoteError::TooLarge {
                size: frame.len(),
                max: max_frame,
            });
        }
        Ok(())
    }

    /// Answers a call.
    pub fn send_reply(
        &mut self,
        now: Instant,
        request: u64,
        status: ReplyStatus,
        refs: &[WireRef],
        payload: &[u8],
        fds: u8,
    ) -> Result<(), RemoteError> {
        let max_frame = self.config.max_frame;
        self.open_mut()?;
        let size = REPLY_HEADER_LEN + refs.len() * 64 + payload.len();
        if size > max_frame || refs.len() > u16::MAX as usize {
            return Err(RemoteError::TooLarge {
                size,
                max: max_frame,
            });
        }
        let mut out = BytesMut::with_capacity(size + TAG_LEN);
        encode_reply(&mut out, request, status, fds, refs, payload);
        self.push_frame(now, out);
        Ok(())
    }

    /// Forgets a call whose caller gave up (timed out); a late reply to it
    /// is dropped quietly.
    pub fn cancel_call(&mut self, request: u64) {
        if let State::Open(o) = &mut self.state {
            o.pending.remove(&request);
        }
    }

    /// Tells the peer we dropped references it gave us.
    pub fn send_release(
        &mut self,
        now: Instant,
        entries: &[ReleaseEntry],
    ) -> Result<(), RemoteError> {
        self.open_mut()?;
        // Split huge batches so each frame stays under the limit.
        let per_frame =
            (self.config.max_frame.saturating_sub(8) / crate::wire::RELEASE_ENTRY_LEN).max(1);
        for chunk in entries.chunks(per_frame) {
            let mut out = BytesMut::with_capacity(8 + chunk.len() * 24 + TAG_LEN);
            encode_release(&mut out, chunk);
            self.push_frame(now, out);
        }
        Ok(())
    }

    /// Asks the peer (the owner) for a count on one of its actors; returns
    /// the acquire's id, echoed in [`Event::Acquired`].
    pub fn send_acquire(&mut self, now: Instant, target: ActorId) -> Result<u64, RemoteError> {
        let o = self.open_mut()?;
        o.next_acquire += 1;
        let request = o.next_acquire;
        self.push_control(
            now,
            &Envelope::Acquire {
                request,
                incarnation: target.incarnation,
                target: target.local,
            },
        );
        Ok(request)
    }

    /// Answers an acquire.
    pub fn send_acquired(
        &mut self,
        now: Instant,
        request: u64,
        ok: bool,
    ) -> Result<(), RemoteError> {
        self.open_mut()?;
        self.push_control(now, &Envelope::Acquired { request, ok });
        Ok(())
    }

    /// Settles a loan the peer made us.
    pub fn send_unlend(&mut self, now: Instant, token: u64) -> Result<(), RemoteError> {
        self.open_mut()?;
        self.push_control(now, &Envelope::Unlend { token });
        Ok(())
    }

    /// Tells the peer that one of our actors it held has stopped.
    pub fn send_down(&mut self, now: Instant, actor: ActorId) -> Result<(), RemoteError> {
        self.open_mut()?;
        self.push_control(
            now,
            &Envelope::Down {
                incarnation: actor.incarnation,
                target: actor.local,
            },
        );
        Ok(())
    }

    fn open_mut(&mut self) -> Result<&mut Open, RemoteError> {
        match &mut self.state {
            State::Open(o) => Ok(o),
            State::Closed => Err(RemoteError::Protocol {
                peer: "peer".into(),
                reason: "the connection is closed".into(),
            }),
            _ => Err(RemoteError::Protocol {
                peer: "peer".into(),
                reason: "the handshake has not finished".into(),
            }),
        }
    }

    fn push_control(&mut self, now: Instant, env: &Envelope) {
        let mut out = BytesMut::with_capacity(64);
        encode_control(&mut out, env);
        self.push_frame(now, out);
    }

    fn push_frame(&mut self, now: Instant, mut body: BytesMut) {
        self.sign(now, &mut body, 0);
        self.transmit.push_back(body.freeze());
    }

    /// Counts `buf[start..]` as the next frame sent, appending its MAC when
    /// frames carry one.
    fn sign(&mut self, now: Instant, buf: &mut BytesMut, start: usize) {
        if let State::Open(o) = &mut self.state {
            if let Some(mac) = &o.mac {
                let mut m = mac.send.clone();
                m.update(&o.send_seq.to_be_bytes());
                m.update(&buf[start..]);
                buf.put_slice(&m.finalize().into_bytes());
            }
            o.send_seq += 1;
            o.liveness.on_send(now);
        }
        self.stats.frames_out += 1;
    }

    fn open(&mut self, now: Instant, est: Established) {
        let mac = (est.peer.features & features::FRAME_MAC != 0).then(|| FrameMac {
            send: HmacSha256::new_from_slice(&est.keys.send).expect("any key length"),
            recv: HmacSha256::new_from_slice(&est.keys.recv).expect("any key length"),
        });
        self.events.push_back(Event::Established(est.peer.clone()));
        self.state = State::Open(Box::new(Open {
            peer: est.peer,
            goodbye: None,
            mac,
            liveness: Liveness::new(self.config.liveness, now),
            next_request: 0,
            pending: RequestIdSet::default(),
            next_acquire: 0,
            recv_seq: 0,
            send_seq: 0,
        }));
    }

    fn fail_handshake(&mut self, err: HandshakeError) {
        if let Some(refusal) = refusal_for(&err) {
            self.transmit.push_back(refusal);
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            reason: CloseReason::Handshake(err),
            pending: Vec::new(),
        });
    }

    fn close_with(&mut self, reason: CloseReason) {
        let pending = match std::mem::replace(&mut self.state, State::Closed) {
            State::Open(o) => {
                let mut v: Vec<u64> = o.pending.into_iter().collect();
                v.sort_unstable();
                v
            }
            _ => Vec::new(),
        };
        self.events.push_back(Event::Closed { reason, pending });
    }
}

enum Incoming {
    Goodbye(String),
    Late,
    Broken(ProtocolError),
}

impl From<ProtocolError> for Incoming {
    fn from(e: ProtocolError) -> Self {
        Self::Broken(e)
    }
}

impl Open {
    /// Whether a message to `target` may go out on this session.
    fn check_target(&self, target: ActorId) -> Result<(), RemoteError> {
        if let Some(bye) = &self.goodbye {
            return Err(RemoteError::ConnectionLost {
                peer: self.peer.node,
                reason: format!("the peer said goodbye ({bye})"),
            });
        }
        if target.node != self.peer.node {
            return Err(RemoteError::Protocol {
                peer: self.peer.node.to_string(),
                reason: format!("actor {target} does not live on this peer"),
            });
        }
        if target.incarnation != self.peer.incarnation {
            return Err(RemoteError::DeadReference {
                actor: target,
                reason: crate::error::DeadReason::OldIncarnation,
            });
        }
        Ok(())
    }

    fn receive(
        &mut self,
        now: Instant,
        mut frame: Bytes,
        max: usize,
    ) -> Result<Option<Event>, Incoming> {
        let limit = max + if self.mac.is_some() { TAG_LEN } else { 0 };
        if frame.len() > limit {
            return Err(ProtocolError::FrameTooLarge(FrameError::TooLarge {
                len: frame.len(),
                max: limit,
            })
            .into());
        }
        let seq = self.recv_seq;
        if let Some(mac) = &self.mac {
            if frame.len() < TAG_LEN {
                return Err(ProtocolError::BadMac { seq }.into());
            }
            let tag = frame.split_off(frame.len() - TAG_LEN);
            let mut m = mac.recv.clone();
            m.update(&seq.to_be_bytes());
            m.update(&frame);
            if m.verify_slice(&tag).is_err() {
                return Err(ProtocolError::BadMac { seq }.into());
            }
        }
        self.recv_seq += 1;
        self.liveness.on_recv(now);
        let env = Envelope::decode(&frame).map_err(ProtocolError::Malformed)?;
        let blobs = match &env {
            Envelope::Call(c) | Envelope::Cast(c) => !c.blobs.is_empty(),
            Envelope::Reply(r) => !r.blobs.is_empty(),
            _ => false,
        };
        if blobs && self.peer.features & features::BLOBS == 0 {
            return Err(ProtocolError::Malformed(DecodeError::Invalid {
                what: "blobs (the handshake did not agree to them)",
            })
            .into());
        }
        Ok(Some(match env {
            e if e.is_handshake() => return Err(ProtocolError::LateHandshake.into()),
            Envelope::Call(c) => Event::Call(c),
            Envelope::Cast(c) => Event::Cast(c),
            Envelope::Reply(r) => {
                if self.pending.remove(&r.request) {
                    Event::Reply(r)
                } else if r.request != 0 && r.request <= self.next_request {
                    return Err(Incoming::Late);
                } else {
                    return Err(ProtocolError::UnknownRequest(r.request).into());
                }
            }
            Envelope::Release(v) => Event::Release(v),
            Envelope::Heartbeat { .. } => return Ok(None),
            Envelope::Goodbye(why) => return Err(Incoming::Goodbye(why)),
            Envelope::Acquire {
                request,
                incarnation,
                target,
            } => Event::Acquire {
                request,
                incarnation,
                target,
            },
            Envelope::Acquired { request, ok } => {
                if request == 0 || request > self.next_acquire {
                    return Err(ProtocolError::UnknownRequest(request).into());
                }
                Event::Acquired { request, ok }
            }
            Envelope::Unlend { token } => Event::Unlend { token },
            Envelope::Down {
                incarnation,
                target,
            } => Event::Down {
                incarnation,
                target,
            },
            _ => return Err(ProtocolError::LateHandshake.into()),
        }))
    }
}
