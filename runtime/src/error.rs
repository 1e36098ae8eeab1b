//! The errors callers see, and the errors each layer of the core reports.
//!
//! [`RemoteError`] is the one enum an application matches on. Every message
//! says what happened and what to do about it. The other enums keep blame
//! visible: the peer broke the protocol, the peer is incompatible, the caller
//! misused the API, or the link failed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::FrameError;
use crate::id::{ActorId, NodeId};
use crate::wire::{DecodeError, RefusalCode};

/// Why a reference is dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// The actor stopped or was unexported; its node is still there.
    ActorStopped,
    /// The connection to the actor's node was lost.
    NodeUnreachable,
    /// The reference was minted by an earlier incarnation of the node.
    OldIncarnation,
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ActorStopped => "the actor stopped",
            Self::NodeUnreachable => "its node is unreachable",
            Self::OldIncarnation => "its node restarted since the reference was made",
        })
    }
}

/// A failure inside a remote handler, carried back to the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFailure {
    /// The Rust type name of the handler's error (or "panic").
    pub type_name: String,
    /// The error's message (its `Display`).
    pub message: String,
    /// The error chain or backtrace, only when the exporter opts in.
    pub backtrace: Option<String>,
}

impl fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

/// What went wrong with a remote call, as the caller sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The reference can no longer reach its actor.
    #[error(
        "reference to {actor} is dead: {reason}; look the actor up again for a fresh reference"
    )]
    DeadReference {
        /// The actor referred to.
        actor: ActorId,
        /// Why it is dead.
        reason: DeadReason,
    },
    /// The connection carrying the call ended before the reply came.
    #[error("connection to node {peer} was lost before the reply came ({reason}); the call may or may not have run")]
    ConnectionLost {
        /// The peer.
        peer: NodeId,
        /// What ended the connection.
        reason: String,
    },
    /// No reply within the time allowed.
    #[error("no reply within {after:?}; the call may still run on the remote node")]
    Timeout {
        /// The time allowed.
        after: Duration,
    },
    /// No connection could be made.
    #[error("could not reach {address}: {reason}")]
    Unreachable {
        /// The address tried.
        address: String,
        /// Why it failed.
        reason: String,
    },
    /// The handshake failed: wrong key, unpinned certificate, or a refusal.
    #[error(
        "authentication with {peer} failed: {reason}; check that both nodes use the same cookie"
    )]
    Authentication {
        /// The address or node.
        peer: String,
        /// What failed.
        reason: String,
    },
    /// The peer broke the protocol (or speaks an incompatible version).
    #[error("protocol error with {peer}: {reason}")]
    Protocol {
        /// The address or node.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// The node has no actor with that id (or name).
    #[error("node {node} has no actor {what}")]
    UnknownActor {
        /// The node asked.
        node: NodeId,
        /// The id or name asked for.
        what: String,
    },
    /// The actor does not handle that message type remotely.
    #[error("actor {actor} does not handle message type {message_type:?}; export it with that message type")]
    UnknownMessage {
        /// The actor.
        actor: ActorId,
        /// The message type's wire name.
        message_type: String,
    },
    /// The actor's mailbox is full; retry later or slow down.
    #[error("the mailbox of actor {actor} is full; retry later or send less")]
    MailboxFull {
        /// The actor.
        actor: ActorId,
    },
    /// The message or reply is over a size limit.
    #[error("message of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The peer holds too many references from this node, or too many calls
    /// are pending.
    #[error("limit reached: {what} (limit {max})")]
    LimitReached {
        /// Which limit.
        what: &'static str,
        /// Its value.
        max: u64,
    },
    /// The link cannot do what the message needs (descriptors over TCP).
    #[error("the {transport} transport cannot {what}; nothing was sent")]
    TransportCannot {
        /// The transport's scheme.
        transport: String,
        /// What it cannot do.
        what: String,
    },
    /// The message or reply could not be encoded or decoded.
    #[error("could not {op} {type_name}: {reason}")]
    Codec {
        /// "encode" or "decode".
        op: &'static str,
        /// The type concerned.
        type_name: String,
        /// What ciborium said.
        reason: String,
    },
    /// The remote handler failed.
    #[error("the remote handler failed: {0}")]
    Remote(RemoteFailure),
}

/// Why a handshake failed. Each is final: the session is closed and no
/// further frame is processed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// No protocol version in common.
    #[error("no common protocol version: we speak {ours:?}, the peer {theirs:?}")]
    Version {
        /// Our range.
        ours: (u16, u16),
        /// Theirs.
        theirs: (u16, u16),
    },
    /// A proof did not verify, or the key id is unknown.
    #[error("authentication failed: {0}")]
    Authentication(&'static str),
    /// The peer refused us.
    #[error("the peer refused the handshake ({code:?}): {reason}")]
    Refused {
        /// Its code.
        code: RefusalCode,
        /// Its words.
        reason: String,
    },
    /// A handshake frame over the pre-authentication limit.
    #[error(transparent)]
    FrameTooLarge(#[from] FrameError),
    /// A handshake frame that does not decode.
    #[error("malformed handshake frame: {0}")]
    Malformed(#[from] DecodeError),
    /// A frame of the wrong kind for this step (an application frame before
    /// authentication is always fatal).
    #[error("unexpected {got} frame while waiting for {expected}")]
    Unexpected {
        /// What the state machine waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The handshake did not finish before its deadline.
    #[error("the handshake did not finish in time")]
    Timeout,
    /// The peer has our own node id.
    #[error("the peer has this node's own id (connected to itself?)")]
    SelfConnect,
    /// The link ended during the handshake.
    #[error("the connection closed during the handshake")]
    Closed,
    /// Our own configuration is unusable.
    #[error("bad handshake configuration: {0}")]
    Config(&'static str),
    /// This node dropped the handshake to make room: too many connections
    /// were in the handshake at once.
    #[error("too many connections are in the handshake on this node; try again")]
    Busy,
}

impl HandshakeError {
    /// The refusal code to tell the peer, if this failure is theirs.
    pub fn refusal_code(&self) -> Option<RefusalCode> {
        Some(match self {
            Self::Version { .. } => RefusalCode::Version,
            Self::Authentication(_) => RefusalCode::Authentication,
            Self::SelfConnect => RefusalCode::SelfConnect,
            Self::Busy => RefusalCode::Busy,
            Self::FrameTooLarge(_) | Self::Malformed(_) | Self::Unexpected { .. } => {
                RefusalCode::Protocol
            }
            Self::Refused { .. } | Self::Timeout | Self::Closed | Self::Config(_) => return None,
        })
    }

    /// Whether the failure means the key (cookie) is wrong.
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            Self::Authentication(_)
                | Self::Refused {
                    code: RefusalCode::Authentication,
                    ..
                }
        )
    }
}

/// The peer broke the protocol after authentication.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame over the limit.
    #[error(transparent)]
    FrameTooLarge(#[from] FrameError),
    /// A frame that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    /// A frame's MAC did not verify: altered or injected.
    #[error("frame {seq} failed its integrity check (altered or injected)")]
    BadMac {
        /// The frame's sequence number.
        seq: u64,
    },
    /// A handshake frame after authentication.
    #[error("unexpected handshake frame after authentication")]
    LateHandshake,
    /// A reply to a request never made.
    #[error("reply to request {0}, which was never made")]
    UnknownRequest(u64),
    /// A reference-counting message that does not fit the tables.
    #[error("reference protocol: {0}")]
    Refs(#[from] RefError),
}

/// A reference-table operation that cannot be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefError {
    /// No export has that id (never exported, or freed).
    #[error("no exported actor {0}")]
    Unknown(String),
    /// The id's generation or incarnation is not the live one.
    #[error("actor {0} no longer exists (stale id)")]
    Stale(String),
    /// A release of more counts than the peer was given.
    #[error("peer released {released} references to {actor} but holds {held}")]
    OverRelease {
        /// The actor.
        actor: String,
        /// Counts released.
        released: u64,
        /// Counts held.
        held: u64,
    },
    /// The peer holds as many distinct references as it may.
    #[error("peer {peer} already holds {max} references from this node")]
    TooManyRefs {
        /// The peer.
        peer: NodeId,
        /// The cap.
        max: u64,
    },
    /// An unlend or acquire answer with an unknown token or request.
    #[error("unknown loan or acquire {0}")]
    UnknownToken(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Incarnation, LocalId};

    #[test]
    fn messages_say_what_to_do() {
        let e = RemoteError::DeadReference {
            actor: ActorId {
                node: NodeId([1; 16]),
                incarnation: Incarnation(1),
                local: LocalId {
                    index: 1,
                    generation: 0,
                },
            },
            reason: DeadReason::NodeUnreachable,
        };
        let s = e.to_string();
        assert!(
            s.contains("unreachable") && s.contains("look the actor up again"),
            "{s}"
        );
        assert!(HandshakeError::Authentication("bad proof").is_authentication());
    }
}
