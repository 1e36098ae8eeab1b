//! Identities: nodes, incarnations, actors and message type names.

use std::fmt;

/// A node's stable identity: the same across restarts of the process.
///
/// It is configured, or generated once and persisted beside the cookie. Two
/// processes must never share a `NodeId` at the same time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Builds a node id from 16 bytes (for example from a random source).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's bytes as they travel on the wire.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Display for NodeId {
    /// The first eight bytes in hex: enough to tell nodes apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A number fresh at every start of a node (Erlang's creation, Akka's UID).
///
/// A reference minted under one incarnation is dead under any other: after a
/// restart the node's actors are new actors, even where their local ids match.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// An exported actor's id within one node incarnation: a slot index plus the
/// generation of that slot, so a freed and reused slot never aliases the
/// actor that held it before.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct LocalId {
    /// Slot in the node's export table.
    pub index: u32,
    /// How many times the slot had been freed when this actor took it.
    pub generation: u32,
}

impl LocalId {
    /// The node's root actor (the name registry); always present, never freed.
    pub const ROOT: LocalId = LocalId {
        index: 0,
        generation: 0,
    };
}

impl fmt::Display for LocalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.index, self.generation)
    }
}

/// The full, location-independent id of an exported actor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ActorId {
    /// The node that owns the actor.
    pub node: NodeId,
    /// The node's incarnation that exported it.
    pub incarnation: Incarnation,
    /// The actor's slot and generation on that node.
    pub local: LocalId,
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.node, self.incarnation, self.local)
    }
}

/// The longest message type name, in bytes (it travels with a one-byte length).
pub const MAX_TYPE_NAME: usize = 255;

/// A remote message type's stable wire name, such as `"counter.add"`.
///
/// Names are 1 to 255 bytes of printable ASCII without spaces; they identify a
/// message type across builds and languages, unlike Rust type names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MessageType(&'static str);

impl MessageType {
    /// Checks a wire name and wraps it.
    pub const fn new(name: &'static str) -> Result<Self, InvalidTypeName> {
        match validate_type_name(name.as_bytes()) {
            Ok(()) => Ok(Self(name)),
            Err(e) => Err(e),
        }
    }

    /// The wire name.
    pub const fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A message type name that cannot be used on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum InvalidTypeName {
    /// The name is empty.
    #[error("message type name is empty")]
    Empty,
    /// The name is longer than [`MAX_TYPE_NAME`] bytes.
    #[error("message type name is longer than 255 bytes")]
    TooLong,
    /// The name holds a byte that is not printable ASCII, or a space.
    #[error("message type name holds a byte that is not printable ASCII (or is a space)")]
    BadByte,
}

/// Checks that `name` is a valid wire name (see [`MessageType`]).
pub const fn validate_type_name(name: &[u8]) -> Result<(), InvalidTypeName> {
    if name.is_empty() {
        return Err(InvalidTypeName::Empty);
    }
    if name.len() > MAX_TYPE_NAME {
        return Err(InvalidTypeName::TooLong);
    }
    let mut i = 0;
    while i < name.len() {
        let b = name[i];
        if b <= b' ' || b >= 0x7f {
            return Err(InvalidTypeName::BadByte);
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_checked() {
        assert!(MessageType::new("counter.add").is_ok());
        assert_eq!(MessageType::new(""), Err(InvalidTypeName::Empty));
        assert_eq!(MessageType::new("a b"), Err(InvalidTypeName::BadByte));
        assert_eq!(MessageType::new("é"), Err(InvalidTypeName::BadByte));
        let long: &'static str = Box::leak("x".repeat(256).into_boxed_str());
        assert_eq!(MessageType::new(long), Err(InvalidTypeName::TooLong));
    }

    #[test]
    fn ids_display_compactly() {
        let id = ActorId {
            node: NodeId([0xab; 16]),
            incarnation: Incarnation(0x2a),
            local: LocalId {
                index: 3,
                generation: 1,
            },
        };
        assert_eq!(id.to_string(), "abababababababab/2a/3.1");
    }
}

/// Hashes request ids, which this node assigns itself in sequence: one
/// multiplication where SipHash costs about a hundred instructions. A peer
/// can only look ids up (a reply's request id), never insert one, so it
/// cannot choose colliding keys.
#[derive(Default, Clone, Copy)]
pub struct RequestIdHasher(u64);

impl std::hash::Hasher for RequestIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by request ids (see [`RequestIdHasher`]).
pub type RequestIdMap<V> =
    std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<RequestIdHasher>>;

/// A set of request ids (see [`RequestIdHasher`]).
pub type RequestIdSet =
    std::collections::HashSet<u64, std::hash::BuildHasherDefault<RequestIdHasher>>;
