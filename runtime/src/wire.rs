//! Envelopes: the frame bodies Courier exchanges, in a fixed binary layout.
//!
//! Every envelope starts with a one-byte kind. Handshake envelopes are small
//! fixed layouts (no CBOR is decoded before authentication). Application
//! envelopes have a fixed header that can be read without touching the
//! payload, so routing, permissions and quotas are checked before any user
//! type is deserialized; only the payload is CBOR. ARCHITECTURE.md draws each
//! layout.

use bytes::{BufMut, Bytes, BytesMut};

use crate::id::{validate_type_name, ActorId, Incarnation, LocalId, NodeId};

/// Protocol version this build speaks (the only one, so far).
pub const PROTOCOL_VERSION: u16 = 1;

/// Envelope kinds: the first byte of every frame body.
pub mod kind {
    /// Initiator's hello.
    pub const HELLO: u8 = 0x01;
    /// Acceptor's hello plus the negotiated version: the challenge.
    pub const CHALLENGE: u8 = 0x02;
    /// Initiator's proof.
    pub const RESPONSE: u8 = 0x03;
    /// Acceptor's proof: the handshake succeeded.
    pub const WELCOME: u8 = 0x04;
    /// Either side refuses the handshake.
    pub const REFUSAL: u8 = 0x05;
    /// Request expecting a reply.
    pub const CALL: u8 = 0x10;
    /// One-way message.
    pub const CAST: u8 = 0x11;
    /// Reply to a call.
    pub const REPLY: u8 = 0x12;
    /// Batched release of reference counts.
    pub const RELEASE: u8 = 0x13;
    /// Liveness probe (also carries an acknowledgement, for resumption).
    pub const HEARTBEAT: u8 = 0x14;
    /// Graceful close.
    pub const GOODBYE: u8 = 0x15;
    /// Third-party reference hand-off: ask the owner for a count.
    pub const ACQUIRE: u8 = 0x16;
    /// The owner's answer to an acquire.
    pub const ACQUIRED: u8 = 0x17;
    /// Tell a lender its loan is settled.
    pub const UNLEND: u8 = 0x18;
    /// An exported actor stopped: holders' references are dead.
    pub const DOWN: u8 = 0x19;
}

/// Feature bits negotiated in the hello (the intersection is in force).
pub mod features {
    /// Frames after the handshake carry an HMAC-SHA256 tag.
    pub const FRAME_MAC: u64 = 1 << 0;
    /// Reserved: session resumption with sequence numbers and acks.
    pub const RESUME: u64 = 1 << 1;
    /// Calls and replies may carry blobs beside their payload (see
    /// [`super::BLOB_LEN_SIZE`]).
    pub const BLOBS: u64 = 1 << 2;
    /// Every feature this build knows.
    pub const KNOWN: u64 = FRAME_MAC | BLOBS;
}

/// Bytes in a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Most listen addresses announced in a hello.
pub const MAX_LISTEN_ADDRS: usize = 4;
/// Longest listen address announced in a hello, in bytes.
pub const MAX_ADDR_LEN: usize = 160;
/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 32;
/// Longest reason text in a refusal or goodbye, in bytes.
pub const MAX_REASON_LEN: usize = 200;
/// Bytes of the fixed part of a call or cast header.
pub const CALL_HEADER_LEN: usize = 32;
/// Bytes of the fixed part of a reply header.
pub const REPLY_HEADER_LEN: usize = 16;
/// Bytes per entry of a call's or reply's blob table (a big-endian
/// length). Blobs are byte strings that travel beside the CBOR payload,
/// so that the receiver hands them out as slices of the frame instead of
/// copying them out of CBOR.
pub const BLOB_LEN_SIZE: usize = 8;
/// Most blobs in one message (the count is a 16-bit field).
pub const MAX_BLOBS: usize = u16::MAX as usize;
/// Bytes of one release entry.
pub const RELEASE_ENTRY_LEN: usize = 24;

/// An envelope that could not be decoded: the peer broke the protocol.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is empty.
    #[error("empty frame")]
    Empty,
    /// The first byte names no envelope kind.
    #[error("unknown envelope kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The body ends before the layout does.
    #[error("{what} is truncated")]
    Truncated {
        /// Which envelope or field.
        what: &'static str,
    },
    /// A field holds a value the layout forbids.
    #[error("{what} is invalid")]
    Invalid {
        /// Which field.
        what: &'static str,
    },
    /// Bytes are left over after the layout ends.
    #[error("{what} has {extra} trailing bytes")]
    Trailing {
        /// Which envelope.
        what: &'static str,
        /// How many bytes are left.
        extra: usize,
    },
}

/// A bounds-checked reader over a frame body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated { what: self.what })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn short_str(&mut self, max: usize, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        if len > max {
            return Err(DecodeError::Invalid { what: field });
        }
        let b = self.take(len)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Invalid { what: field })?;
        Ok(s.to_owned())
    }
    fn rest(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.rest() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

fn put_short_str(out: &mut BytesMut, s: &str, max: usize) {
    let b = &s.as_bytes()[..s.len().min(max)];
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

/// The fields of a hello (initiator) or challenge (acceptor).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Hello {
    /// Lowest protocol version spoken (the chosen one, in a challenge).
    pub version_min: u16,
    /// Highest protocol version spoken (the chosen one, in a challenge).
    pub version_max: u16,
    /// Feature bits offered (agreed, in a challenge).
    pub features: u64,
    /// The sender's node id.
    pub node: NodeId,
    /// The sender's incarnation.
    pub incarnation: Incarnation,
    /// Which shared key the sender proves with.
    pub key_id: String,
    /// Fresh random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// Addresses the sender listens on, for peers to reconnect or hand off.
    pub listen: Vec<String>,
}

impl Hello {
    /// Encodes as `kind` (HELLO or CHALLENGE). Over-long fields are cut to
    /// their limits; the handshake validates its own config before this.
    pub fn encode(&self, kind: u8, out: &mut BytesMut) {
        out.put_u8(kind);
        out.put_u16(self.version_min);
        out.put_u16(self.version_max);
        out.put_u64(self.features);
        out.put_slice(&self.node.0);
        out.put_u64(self.incarnation.0);
        put_short_str(out, &self.key_id, MAX_KEY_ID_LEN);
        out.put_slice(&self.nonce);
        let n = self.listen.len().min(MAX_LISTEN_ADDRS);
        out.put_u8(n as u8);
        for a in &self.listen[..n] {
            put_short_str(out, a, MAX_ADDR_LEN);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version_min = r.u16()?;
        let version_max = r.u16()?;
        if version_min > version_max {
            return Err(DecodeError::Invalid {
                what: "version range",
            });
        }
        let features = r.u64()?;
        let node = NodeId(r.array()?);
        let incarnation = Incarnation(r.u64()?);
        let key_id = r.short_str(MAX_KEY_ID_LEN, "key id")?;
        let nonce = r.array()?;
        let n = r.u8()? as usize;
        if n > MAX_LISTEN_ADDRS {
            return Err(DecodeError::Invalid {
                what: "listen address count",
            });
        }
        let mut listen = Vec::with_capacity(n);
        for _ in 0..n {
            listen.push(r.short_str(MAX_ADDR_LEN, "listen address")?);
        }
        r.finish()?;
        Ok(Self {
            version_min,
            version_max,
            features,
            node,
            incarnation,
            key_id,
            nonce,
            listen,
        })
    }
}

/// Why a handshake was refused, as sent in a refusal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum RefusalCode {
    /// No protocol version in common.
    Version = 1,
    /// The proof did not verify, or the key id is unknown.
    Authentication = 2,
    /// The handshake broke the protocol.
    Protocol = 3,
    /// The node is shutting down or over its connection limits.
    Busy = 4,
    /// The node connected to itself.
    SelfConnect = 5,
}

impl RefusalCode {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Version,
            2 => Self::Authentication,
            3 => Self::Protocol,
            4 => Self::Busy,
            5 => Self::SelfConnect,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "refusal code",
                })
            }
        })
    }
}

/// A reference carried by an application envelope.
///
/// References travel in the header, not inside the CBOR payload: the payload
/// names them by index into this list. That way the receiver counts every
/// reference it was given even when the payload then fails to decode.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WireRef {
    /// The actor referred to.
    pub actor: ActorId,
    /// Non-zero when the sender is not the owner: the sender's loan token,
    /// to be settled with an unlend once the receiver acquired its own count.
    pub lend_token: u64,
    /// For a third-party reference: an address of the owner (empty otherwise).
    pub owner_addr: String,
}

/// Bytes of the fixed part of one wire reference.
pub const WIRE_REF_FIXED_LEN: usize = 16 + 8 + 8 + 8 + 1;

impl WireRef {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&self.actor.node.0);
        out.put_u64(self.actor.incarnation.0);
        put_local(out, self.actor.local);
        out.put_u64(self.lend_token);
        put_short_str(out, &self.owner_addr, MAX_ADDR_LEN);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let node = NodeId(r.array()?);
        let incarnation = Incarnation(r.u64()?);
        let local = get_local(r)?;
        let lend_token = r.u64()?;
        let owner_addr = r.short_str(MAX_ADDR_LEN, "owner address")?;
        Ok(Self {
            actor: ActorId {
                node,
                incarnation,
                local,
            },
            lend_token,
            owner_addr,
        })
    }
}

fn put_local(out: &mut BytesMut, l: LocalId) {
    out.put_u32(l.index);
    out.put_u32(l.generation);
}

fn get_local(r: &mut Reader<'_>) -> Result<LocalId, DecodeError> {
    Ok(LocalId {
        index: r.u32()?,
        generation: r.u32()?,
    })
}

/// The fixed header of a call or cast: everything needed to route, authorize
/// and account for the message without decoding its payload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CallHeader {
    /// Request id (0 for a cast).
    pub request: u64,
    /// Incarnation the target was minted under.
    pub incarnation: Incarnation,
    /// The target actor on the receiving node.
    pub target: LocalId,
    /// How many file descriptors travel with the frame.
    pub fds: u8,
}

/// A decoded call or cast. `payload` shares the frame's buffer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Call {
    /// The fixed header.
    pub header: CallHeader,
    /// The message type's wire name (validated printable ASCII).
    pub type_name: Bytes,
    /// References carried, indexed from the payload.
    pub refs: Vec<WireRef>,
    /// The CBOR payload.
    pub payload: Bytes,
    /// Byte blobs carried beside the payload, indexed from it (see
    /// [`BLOB_LEN_SIZE`]); each shares the frame's buffer.
    pub blobs: Vec<Bytes>,
}

impl Call {
    /// The message type's wire name.
    pub fn type_name(&self) -> &str {
        // Validated as printable ASCII when decoded.
        std::str::from_utf8(&self.type_name).unwrap_or("?")
    }
}

/// What a reply carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum ReplyStatus {
    /// The handler's reply value (CBOR).
    Ok = 0,
    /// The handler failed: a CBOR [`crate::error::RemoteFailure`].
    Failed = 1,
    /// No actor with that id lives on the node.
    UnknownActor = 2,
    /// The actor does not handle that message type.
    UnknownMessage = 3,
    /// The actor's mailbox is full.
    MailboxFull = 4,
    /// The payload could not be decoded as the named type (text payload).
    BadPayload = 5,
    /// The message, or its reply, was over a size limit.
    TooLarge = 6,
    /// The peer may not send that message to that actor, or is over a quota.
    Refused = 7,
    /// The actor stopped before answering.
    ActorStopped = 8,
}

impl ReplyStatus {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::Failed,
            2 => Self::UnknownActor,
            3 => Self::UnknownMessage,
            4 => Self::MailboxFull,
            5 => Self::BadPayload,
            6 => Self::TooLarge,
            7 => Self::Refused,
            8 => Self::ActorStopped,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "reply status",
                })
            }
        })
    }
}

/// A decoded reply.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Reply {
    /// The request answered.
    pub request: u64,
    /// What the payload holds.
    pub status: ReplyStatus,
    /// File descriptors travelling with the frame.
    pub fds: u8,
    /// References carried, indexed from the payload.
    pub refs: Vec<WireRef>,
    /// The payload (see [`ReplyStatus`]).
    pub payload: Bytes,
    /// Byte blobs carried beside the payload, as in [`Call::blobs`].
    pub blobs: Vec<Bytes>,
}

/// One entry of a release: `count` references to `target` are dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReleaseEntry {
    /// Incarnation the target was minted under.
    pub incarnation: Incarnation,
    /// The released actor on the receiving node.
    pub target: LocalId,
    /// How many received references this releases.
    pub count: u64,
}

/// A decoded envelope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Envelope {
    /// Initiator's hello.
    Hello(Hello),
    /// Acceptor's challenge.
    Challenge(Hello),
    /// Initiator's proof.
    Response([u8; TAG_LEN]),
    /// Acceptor's proof.
    Welcome([u8; TAG_LEN]),
    /// Handshake refused.
    Refusal(RefusalCode, String),
    /// A call.
    Call(Call),
    /// A one-way message (request id 0).
    Cast(Call),
    /// A reply.
    Reply(Reply),
    /// Released reference counts.
    Release(Vec<ReleaseEntry>),
    /// Liveness probe; `ack` counts frames received (reserved for resumption).
    Heartbeat {
        /// Application frames the sender has received so far.
        ack: u64,
    },
    /// Graceful close with a reason.
    Goodbye(String),
    /// Ask the owner for a count on `target` (third-party hand-off).
    Acquire {
        /// Correlates the answer.
        request: u64,
        /// Incarnation the target was minted under.
        incarnation: Incarnation,
        /// The actor on the owner.
        target: LocalId,
    },
    /// The owner's answer: `ok` means a count was added for the asker.
    Acquired {
        /// The acquire answered.
        request: u64,
        /// Whether the actor was still there.
        ok: bool,
    },
    /// Settles a loan made when a reference was passed on.
    Unlend {
        /// The loan token from the wire reference.
        token: u64,
    },
    /// An actor of the sender's that the receiver held has stopped.
    Down {
        /// Incarnation of the actor.
        incarnation: Incarnation,
        /// The actor on the sender.
        target: LocalId,
    },
}

impl Envelope {
    /// Whether this kind belongs to the handshake.
    pub fn is_handshake(&self) -> bool {
        matches!(
            self,
            Self::Hello(_)
                | Self::Challenge(_)
                | Self::Response(_)
                | Self::Welcome(_)
                | Self::Refusal(..)
        )
    }

    /// Decodes a frame body. Never panics; any malformation is an error.
    pub fn decode(frame: &Bytes) -> Result<Self, DecodeError> {
        let Some(&k) = frame.first() else {
            return Err(DecodeError::Empty);
        };
        let body = &frame[1..];
        match k {
            kind::HELLO => Ok(Self::Hello(Hello::decode(&mut Reader::new(body, "hello"))?)),
            kind::CHALLENGE => {
                let h = Hello::decode(&mut Reader::new(body, "challenge"))?;
                if h.version_min != h.version_max {
                    return Err(DecodeError::Invalid {
                        what: "challenge version",
                    });
                }
                Ok(Self::Challenge(h))
            }
            kind::RESPONSE | kind::WELCOME => {
                let mut r = Reader::new(body, "proof");
                let tag = r.array()?;
                r.finish()?;
                Ok(if k == kind::RESPONSE {
                    Self::Response(tag)
                } else {
                    Self::Welcome(tag)
                })
            }
            kind::REFUSAL => {
                let mut r = Reader::new(body, "refusal");
                let code = RefusalCode::from_u8(r.u8()?)?;
                let text = r.short_str(MAX_REASON_LEN, "refusal reason")?;
                r.finish()?;
                Ok(Self::Refusal(code, text))
            }
            kind::CALL | kind::CAST => {
                let call = decode_call(frame)?;
                if k == kind::CALL {
                    // A call's request id is what its reply names; 0 is the
                    // cast's. (Found by the envelope fuzz target: a CALL with
                    // id 0 decoded, then re-encoded as a CAST.)
                    if call.header.request == 0 {
                        return Err(DecodeError::Invalid {
                            what: "call request id",
                        });
                    }
                    Ok(Self::Call(call))
                } else if call.header.request != 0 {
                    Err(DecodeError::Invalid {
                        what: "cast request id",
                    })
                } else {
                    Ok(Self::Cast(call))
                }
            }
            kind::REPLY => decode_reply(frame).map(Self::Reply),
            kind::RELEASE => {
                let mut r = Reader::new(body, "release");
                let n = r.u32()? as usize;
                if n.checked_mul(RELEASE_ENTRY_LEN) != Some(r.rest()) {
                    return Err(DecodeError::Invalid {
                        what: "release entry count",
                    });
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let incarnation = Incarnation(r.u64()?);
                    let target = get_local(&mut r)?;
                    let count = r.u64()?;
                    if count == 0 {
                        return Err(DecodeError::Invalid {
                            what: "release count",
                        });
                    }
                    v.push(ReleaseEntry {
                        incarnation,
                        target,
                        count,
                    });
                }
                Ok(Self::Release(v))
            }
            kind::HEARTBEAT => {
                let mut r = Reader::new(body, "heartbeat");
                let ack = r.u64()?;
                r.finish()?;
                Ok(Self::Heartbeat { ack })
            }
            kind::GOODBYE => {
                let mut r = Reader::new(body, "goodbye");
                let text = r.short_str(MAX_REASON_LEN, "goodbye reason")?;
                r.finish()?;
                Ok(Self::Goodbye(text))
            }
            kind::ACQUIRE => {
                let mut r = Reader::new(body, "acquire");
                let request = r.u64()?;
                let incarnation = Incarnation(r.u64()?);
                let target = get_local(&mut r)?;
                r.finish()?;
                Ok(Self::Acquire {
                    request,
                    incarnation,
                    target,
                })
            }
            kind::ACQUIRED => {
                let mut r = Reader::new(body, "acquired");
                let request = r.u64()?;
                let ok = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid { what: "acquired" }),
                };
                r.finish()?;
                Ok(Self::Acquired { request, ok })
            }
            kind::UNLEND => {
                let mut r = Reader::new(body, "unlend");
                let token = r.u64()?;
                r.finish()?;
                Ok(Self::Unlend { token })
            }
            kind::DOWN => {
                let mut r = Reader::new(body, "down");
                let incarnation = Incarnation(r.u64()?);
                let target = get_local(&mut r)?;
                r.finish()?;
                Ok(Self::Down {
                    incarnation,
                    target,
                })
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

fn decode_refs(r: &mut Reader<'_>, n: usize) -> Result<Vec<WireRef>, DecodeError> {
    // Each reference takes at least its fixed part: refuse a count the body
    // cannot hold before reserving room for it.
    if n.saturating_mul(WIRE_REF_FIXED_LEN) > r.rest() {
        return Err(DecodeError::Truncated { what: "references" });
    }
    let mut refs = Vec::with_capacity(n);
    for _ in 0..n {
        refs.push(WireRef::decode(r)?);
    }
    Ok(refs)
}

/// Big-endian fields of a fixed header already checked long enough.
fn be16(h: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([h[at], h[at + 1]])
}

fn be32(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn be64(h: &[u8], at: usize) -> u64 {
    (u64::from(be32(h, at)) << 32) | u64::from(be32(h, at + 4))
}

/// A fixed header of `N` bytes at the frame's start, or `Truncated`.
fn fixed_head<'a, const N: usize>(
    frame: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8; N], DecodeError> {
    frame
        .first_chunk::<N>()
        .ok_or(DecodeError::Truncated { what })
}

/// What a call's and a reply's fixed headers share (the layouts
/// `encode_call_head` and `encode_reply_head` write): no flags, then the
/// counts of descriptors, references and blobs, and the request id.
fn common_head(h: &[u8], flags: &'static str) -> Result<(u8, usize, usize, u64), DecodeError> {
    if h[1] != 0 {
        return Err(DecodeError::Invalid { what: flags });
    }
    Ok((
        h[3],
        usize::from(be16(h, 4)),
        usize::from(be16(h, 6)),
        be64(h, 8),
    ))
}

fn decode_call(frame: &Bytes) -> Result<Call, DecodeError> {
    // The fixed header read in place with one bounds check: through
    // `Reader` (a copy, field by field or whole) costs more per frame.
    let h = fixed_head::<CALL_HEADER_LEN>(frame, "call header")?;
    let name_len = usize::from(h[2]);
    let (fds, n_refs, n_blobs, request) = common_head(h, "call flags")?;
    let incarnation = Incarnation(be64(h, 16));
    let target = LocalId {
        index: be32(h, 24),
        generation: be32(h, 28),
    };
    let mut r = Reader::new(frame, "call header");
    r.pos = CALL_HEADER_LEN;
    let name_start = r.pos;
    let name = r.take(name_len)?;
    validate_type_name(name).map_err(|_| DecodeError::Invalid {
        what: "message type name",
    })?;
    let type_name = frame.slice(name_start..name_start + name_len);
    let refs = decode_refs(&mut r, n_refs)?;
    let (payload, blobs) = decode_blobs(frame, &mut r, n_blobs)?;
    Ok(Call {
        header: CallHeader {
            request,
            incarnation,
            target,
            fds,
        },
        type_name,
        refs,
        payload,
        blobs,
    })
}

fn decode_reply(frame: &Bytes) -> Result<Reply, DecodeError> {
    // One bounds check for the fixed header, as in `decode_call`.
    let h = fixed_head::<REPLY_HEADER_LEN>(frame, "reply header")?;
    let status = ReplyStatus::from_u8(h[2])?;
    let (fds, n_refs, n_blobs, request) = common_head(h, "reply flags")?;
    let mut r = Reader::new(frame, "reply header");
    r.pos = REPLY_HEADER_LEN;
    let refs = decode_refs(&mut r, n_refs)?;
    let (payload, blobs) = decode_blobs(frame, &mut r, n_blobs)?;
    Ok(Reply {
        request,
        status,
        fds,
        refs,
        payload,
        blobs,
    })
}

/// Reads the blob table (`n` lengths) at `r` and splits the rest of the
/// frame into the payload and, at its end, the blobs, without copying.
fn decode_blobs(
    frame: &Bytes,
    r: &mut Reader<'_>,
    n: usize,
) -> Result<(Bytes, Vec<Bytes>), DecodeError> {
    if n == 0 {
        return Ok((frame.slice(r.pos..), Vec::new()));
    }
    // Every length is read before anything is allocated for them: a count
    // the frame cannot hold fails here.
    let table = r.take(n * BLOB_LEN_SIZE)?;
    let mut total = 0usize;
    for len in table.chunks_exact(BLOB_LEN_SIZE) {
        let len = u64::from_be_bytes(len.try_into().expect("8 bytes"));
        total = usize::try_from(len)
            .ok()
            .and_then(|len| total.checked_add(len))
            .filter(|&t| t <= frame.len() - r.pos)
            .ok_or(DecodeError::Invalid {
                what: "blob lengths (longer than the frame)",
            })?;
    }
    let mut at = frame.len() - total;
    let payload = frame.slice(r.pos..at);
    let blobs = table
        .chunks_exact(BLOB_LEN_SIZE)
        .map(|len| {
            let len = u64::from_be_bytes(len.try_into().expect("8 bytes")) as usize;
            at += len;
            frame.slice(at - len..at)
        })
        .collect();
    Ok((payload, blobs))
}

/// Writes the blob table of a call or reply: each blob's length. The blobs
/// themselves follow the payload, in order, at the frame's end.
fn encode_blob_table(out: &mut BytesMut, blobs: &[Bytes]) {
    for b in blobs {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    }
}

/// The request id to put in a call frame built ahead of
/// [`crate::session::Session::send_call_frame`], which assigns the real one.
pub const REQUEST_TO_ASSIGN: u64 = u64::MAX;

/// Writes a call (`request != 0`) or cast (`request == 0`) envelope.
pub fn encode_call(
    out: &mut BytesMut,
    header: &CallHeader,
    type_name: &str,
    refs: &[WireRef],
    payload: &[u8],
) {
    out.reserve(CALL_HEADER_LEN + type_name.len() + refs.len() * 48 + payload.len());
    encode_call_head(out, header, type_name, refs, &[]);
    out.put_slice(payload);
}

/// Writes everything of a call or cast envelope but its payload, which
/// follows at once: [`encode_call`] without the payload, for a caller that
/// has the payload in place already. Without references the head is
/// `CALL_HEADER_LEN + type_name.len()` bytes, and each blob adds
/// [`BLOB_LEN_SIZE`]; the caller appends the blobs after the payload.
pub fn encode_call_head(
    out: &mut BytesMut,
    header: &CallHeader,
    type_name: &str,
    refs: &[WireRef],
    blobs: &[Bytes],
) {
    // Built on the stack and appended once: `BytesMut`'s `put_u8` and
    // friends each call `memcpy`, which costs more than the whole header.
    let mut h = [0u8; CALL_HEADER_LEN];
    h[0] = if header.request == 0 {
        kind::CAST
    } else {
        kind::CALL
    };
    h[2] = type_name.len() as u8;
    h[3] = header.fds;
    h[4..6].copy_from_slice(&(refs.len() as u16).to_be_bytes());
    h[6..8].copy_from_slice(&(blobs.len() as u16).to_be_bytes());
    h[8..16].copy_from_slice(&header.request.to_be_bytes());
    h[16..24].copy_from_slice(&header.incarnation.0.to_be_bytes());
    h[24..28].copy_from_slice(&header.target.index.to_be_bytes());
    h[28..32].copy_from_slice(&header.target.generation.to_be_bytes());
    out.reserve(CALL_HEADER_LEN + type_name.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(type_name.as_bytes());
    for r in refs {
        r.encode(out);
    }
    encode_blob_table(out, blobs);
}

/// Writes a reply envelope.
pub fn encode_reply(
    out: &mut BytesMut,
    request: u64,
    status: ReplyStatus,
    fds: u8,
    refs: &[WireRef],
    payload: &[u8],
) {
    out.reserve(REPLY_HEADER_LEN + refs.len() * 48 + payload.len());
    encode_reply_head(out, request, status, fds, refs, &[]);
    out.put_slice(payload);
}

/// Writes everything of a reply envelope but its payload: see
/// [`encode_call_head`]. Without references the head is
/// `REPLY_HEADER_LEN` bytes, and each blob adds [`BLOB_LEN_SIZE`].
pub fn encode_reply_head(
    out: &mut BytesMut,
    request: u64,
    status: ReplyStatus,
    fds: u8,
    refs: &[WireRef],
    blobs: &[Bytes],
) {
    let mut h = [0u8; REPLY_HEADER_LEN];
    h[0] = kind::REPLY;
    h[2] = status as u8;
    h[3] = fds;
    h[4..6].copy_from_slice(&(refs.len() as u16).to_be_bytes());
    h[6..8].copy_from_slice(&(blobs.len() as u16).to_be_bytes());
    h[8..16].copy_from_slice(&request.to_be_bytes());
    out.extend_from_slice(&h);
    for r in refs {
        r.encode(out);
    }
    encode_blob_table(out, blobs);
}

/// The request id of a reply frame (see [`encode_reply_head`]), if `frame`
/// is long enough to hold one.
pub fn reply_request(frame: &[u8]) -> Option<u64> {
    let id = frame.get(8..16)?;
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

/// Writes a release envelope.
pub fn encode_release(out: &mut BytesMut, entries: &[ReleaseEntry]) {
    out.put_u8(kind::RELEASE);
    out.put_u32(entries.len() as u32);
    for e in entries {
        out.put_u64(e.incarnation.0);
        put_local(out, e.target);
        out.put_u64(e.count);
    }
}

/// Writes any envelope that has no payload of its own (everything but calls,
/// casts and replies, which have their own encoders for speed).
pub fn encode_control(out: &mut BytesMut, env: &Envelope) {
    match env {
        Envelope::Hello(h) => h.encode(kind::HELLO, out),
        Envelope::Challenge(h) => h.encode(kind::CHALLENGE, out),
        Envelope::Response(t) => {
            out.put_u8(kind::RESPONSE);
            out.put_slice(t);
        }
        Envelope::Welcome(t) => {
            out.put_u8(kind::WELCOME);
            out.put_slice(t);
        }
        Envelope::Refusal(code, text) => {
            out.put_u8(kind::REFUSAL);
            out.put_u8(*code as u8);
            put_short_str(out, text, MAX_REASON_LEN);
        }
        Envelope::Call(c) | Envelope::Cast(c) => {
            encode_call_head(out, &c.header, c.type_name(), &c.refs, &c.blobs);
            out.put_slice(&c.payload);
            for b in &c.blobs {
                out.put_slice(b);
            }
        }
        Envelope::Reply(r) => {
            encode_reply_head(out, r.request, r.status, r.fds, &r.refs, &r.blobs);
            out.put_slice(&r.payload);
            for b in &r.blobs {
                out.put_slice(b);
            }
        }
        Envelope::Release(v) => encode_release(out, v),
        Envelope::Heartbeat { ack } => {
            out.put_u8(kind::HEARTBEAT);
            out.put_u64(*ack);
        }
        Envelope::Goodbye(text) => {
            out.put_u8(kind::GOODBYE);
            put_short_str(out, text, MAX_REASON_LEN);
        }
        Envelope::Acquire {
            request,
            incarnation,
            target,
        } => {
            out.put_u8(kind::ACQUIRE);
            out.put_u64(*request);
            out.put_u64(incarnation.0);
            put_local(out, *target);
        }
        Envelope::Acquired { request, ok } => {
            out.put_u8(kind::ACQUIRED);
            out.put_u64(*request);
            out.put_u8(u8::from(*ok));
        }
        Envelope::Unlend { token } => {
            out.put_u8(kind::UNLEND);
            out.put_u64(*token);
        }
        Envelope::Down {
            incarnation,
            target,
        } => {
            out.put_u8(kind::DOWN);
            out.put_u64(incarnation.0);
            put_local(out, *target);
        }
    }
}

/// Encodes any envelope into a fresh buffer.
pub fn encode(env: &Envelope) -> Bytes {
    let mut out = BytesMut::new();
    encode_control(&mut out, env);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn actor(i: u32) -> ActorId {
        ActorId {
            node: NodeId([i as u8; 16]),
            incarnation: Incarnation(9),
            local: LocalId {
                index: i,
                generation: 2,
            },
        }
    }

    fn samples() -> Vec<Envelope> {
        let hello = Hello {
            version_min: 1,
            version_max: 1,
            features: 1,
            node: NodeId([1; 16]),
            incarnation: Incarnation(7),
            key_id: "default".into(),
            nonce: [3; NONCE_LEN],
            listen: vec!["tcp://127.0.0.1:7000".into()],
        };
        let call = Call {
            header: CallHeader {
                request: 5,
                incarnation: Incarnation(9),
                target: LocalId {
                    index: 4,
                    generation: 1,
                },
                fds: 2,
            },
            type_name: Bytes::from_static(b"counter.add"),
            refs: vec![
                WireRef {
                    actor: actor(1),
                    lend_token: 0,
                    owner_addr: String::new(),
                },
                WireRef {
                    actor: actor(2),
                    lend_token: 77,
                    owner_addr: "unix:///tmp/a.sock".into(),
                },
            ],
            payload: Bytes::from_static(b"\x82\x01\x02"),
            blobs: vec![],
        };
        let mut cast = call.clone();
        cast.header.request = 0;
        let mut with_blobs = call.clone();
        with_blobs.blobs = vec![
            Bytes::from_static(b"first blob"),
            Bytes::new(),
            Bytes::from_static(b"third"),
        ];
        vec![
            Envelope::Hello(hello.clone()),
            Envelope::Challenge(hello),
            Envelope::Response([1; TAG_LEN]),
            Envelope::Welcome([2; TAG_LEN]),
            Envelope::Refusal(RefusalCode::Version, "no common version".into()),
            Envelope::Call(call),
            Envelope::Cast(cast),
            Envelope::Call(with_blobs),
            Envelope::Reply(Reply {
                request: 5,
                status: ReplyStatus::Failed,
                fds: 0,
                refs: vec![],
                payload: Bytes::from_static(b"\xa0"),
                blobs: vec![],
            }),
            Envelope::Reply(Reply {
                request: 6,
                status: ReplyStatus::Ok,
                fds: 0,
                refs: vec![],
                payload: Bytes::from_static(b"\x00"),
                blobs: vec![Bytes::from_static(b"reply blob")],
            }),
            Envelope::Release(vec![ReleaseEntry {
                incarnation: Incarnation(9),
                target: LocalId {
                    index: 1,
                    generation: 0,
                },
                count: 3,
            }]),
            Envelope::Heartbeat { ack: 42 },
            Envelope::Goodbye("shutting down".into()),
            Envelope::Acquire {
                request: 1,
                incarnation: Incarnation(9),
                target: LocalId {
                    index: 1,
                    generation: 0,
                },
            },
            Envelope::Acquired {
                request: 1,
                ok: true,
            },
            Envelope::Unlend { token: 77 },
            Envelope::Down {
                incarnation: Incarnation(9),
                target: LocalId {
                    index: 1,
                    generation: 0,
                },
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for env in samples() {
            let bytes = encode(&env);
            assert_eq!(Envelope::decode(&bytes).unwrap(), env, "{env:?}");
        }
    }

    #[test]
    fn blob_lengths_beyond_the_frame_are_refused() {
        let header = CallHeader {
            request: 0,
            incarnation: Incarnation(1),
            target: LocalId::ROOT,
            fds: 0,
        };
        let blob = Bytes::from_static(b"0123456789");
        let mut out = BytesMut::new();
        encode_call_head(&mut out, &header, "x.y", &[], std::slice::from_ref(&blob));
        out.put_slice(b"\x01");
        out.put_slice(&blob);
        let good = out.clone().freeze();
        let Envelope::Cast(c) = Envelope::decode(&good).unwrap() else {
            panic!("a cast")
        };
        assert_eq!(c.payload.as_ref(), b"\x01");
        assert_eq!(c.blobs, vec![blob.clone()]);
        // Blobs are found from the frame's end: one byte less shifts the
        // blob into the payload's place (a MAC catches that, as it catches
        // a cut payload); two bytes less and the lengths overrun the frame.
        let short = good.slice(..good.len() - 1);
        let Envelope::Cast(c) = Envelope::decode(&short).unwrap() else {
            panic!("a cast")
        };
        assert!(c.payload.is_empty() && c.blobs[0].len() == 10, "{c:?}");
        let shorter = good.slice(..good.len() - 2);
        assert!(Envelope::decode(&shorter).is_err());
        // A length that overflows when summed.
        let mut huge = BytesMut::new();
        encode_call_head(
            &mut huge,
            &header,
            "x.y",
            &[],
            &[Bytes::from_static(b"a"), Bytes::from_static(b"b")],
        );
        let table = huge.len() - 2 * BLOB_LEN_SIZE;
        huge[table..table + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        huge.put_slice(b"ab");
        let e = Envelope::decode(&huge.freeze()).unwrap_err();
        assert!(e.to_string().contains("blob lengths"), "{e}");
        // A count whose table the frame cannot hold.
        let mut many = BytesMut::new();
        encode_call_head(&mut many, &header, "x.y", &[], &[]);
        many[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(Envelope::decode(&many.freeze()).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for env in samples() {
            let bytes = encode(&env);
            // Calls and replies end in a payload of any length, so only cuts
            // inside their headers are errors.
            let fixed = match &env {
                // (Blobs are found from the frame's end, so a cut there
                // shifts them into the payload: the MAC, when on, is what
                // catches that, as for a cut payload.)
                Envelope::Call(c) | Envelope::Cast(c) => {
                    bytes.len() - c.payload.len() - c.blobs.iter().map(Bytes::len).sum::<usize>()
                }
                Envelope::Reply(r) => {
                    bytes.len() - r.payload.len() - r.blobs.iter().map(Bytes::len).sum::<usize>()
                }
                _ => bytes.len(),
            };
            for cut in 0..fixed {
                assert!(
                    Envelope::decode(&bytes.slice(..cut)).is_err(),
                    "{env:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn header_is_read_without_the_payload() {
        let mut out = BytesMut::new();
        let header = CallHeader {
            request: 1,
            incarnation: Incarnation(1),
            target: LocalId::ROOT,
            fds: 0,
        };
        // The payload is not CBOR at all: the header still decodes.
        encode_call(&mut out, &header, "x.y", &[], b"\xff\xff not cbor");
        let Envelope::Call(c) = Envelope::decode(&out.freeze()).unwrap() else {
            panic!("not a call")
        };
        assert_eq!(c.header, header);
        assert_eq!(c.type_name(), "x.y");
    }

    #[test]
    fn a_huge_reference_count_is_refused_without_allocating() {
        let mut out = BytesMut::new();
        let header = CallHeader {
            request: 1,
            incarnation: Incarnation(1),
            target: LocalId::ROOT,
            fds: 0,
        };
        encode_call(&mut out, &header, "x.y", &[], b"");
        out[4] = 0xff;
        out[5] = 0xff;
        assert_eq!(
            Envelope::decode(&out.freeze()),
            Err(DecodeError::Truncated { what: "references" })
        );
    }

    /// Fuzz regression (envelope target): a CALL carrying request id 0
    /// was taken as a call, though id 0 means a cast (no reply expected).
    #[test]
    fn a_call_with_request_id_zero_is_refused() {
        let mut out = BytesMut::new();
        let header = CallHeader {
            request: 0,
            incarnation: Incarnation(1),
            target: LocalId::ROOT,
            fds: 0,
        };
        encode_call(&mut out, &header, "x.y", &[], b"\x01");
        assert_eq!(out[0], kind::CAST);
        out[0] = kind::CALL;
        assert_eq!(
            Envelope::decode(&out.freeze()),
            Err(DecodeError::Invalid {
                what: "call request id"
            })
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&Bytes::from(bytes));
        }

        #[test]
        fn random_bytes_after_a_valid_kind_never_panic(k in 0u8..0x20, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut v = vec![k];
            v.extend(bytes);
            let _ = Envelope::decode(&Bytes::from(v));
        }
    }
}
