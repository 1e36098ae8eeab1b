//! Carrying references and descriptors through serde.
//!
//! A [`RemoteAddr`](crate::RemoteAddr) or an [`Fd`] inside a message does not
//! serialize its contents into the CBOR payload. While Courier encodes a
//! message it keeps a per-thread list; each reference or descriptor is
//! appended there and the payload holds only its index. The list travels in
//! the envelope header (references) or beside the frame (descriptors), so
//! the receiver accounts for every reference before the payload is decoded.
//! Decoding reverses this with the list the frame brought.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;

use courier_runtime::codec;
use courier_runtime::error::{DeadReason, RemoteError};
use courier_runtime::id::ActorId;
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::export::ExportedAny;
use crate::remote::Imported;

/// A reference leaving this node inside a message.
#[derive(Clone)]
pub(crate) enum OutRef {
    /// An actor exported by this node.
    Local(ActorId),
    /// An actor of another node, held here.
    Imported(Arc<Imported>),
    /// A reference already dead: it is sent as dead.
    Dead(ActorId),
}

/// A reference that arrived, resolved against this node's tables.
#[derive(Clone)]
pub(crate) enum Resolved {
    Local(
        Arc<dyn ExportedAny>,
        std::sync::Weak<crate::node::NodeShared>,
    ),
    Remote(Arc<Imported>),
    Dead(ActorId, DeadReason),
}

/// What the message being encoded holds besides its payload. It stays in
/// place between messages (`active` says whether one is being encoded),
/// so a message carrying none of these costs no more than two looks at it.
struct OutCtx {
    active: bool,
    refs: Vec<OutRef>,
    fds: Vec<OwnedFd>,
    /// False when the link's peer takes no blobs: [`Blob`]s are encoded
    /// into the payload then.
    blobs_ok: bool,
    blobs: Vec<Bytes>,
}

impl OutCtx {
    const fn new(active: bool, blobs_ok: bool) -> Self {
        Self {
            active,
            refs: Vec::new(),
            fds: Vec::new(),
            blobs_ok,
            blobs: Vec::new(),
        }
    }
}

struct InCtx {
    refs: Vec<Resolved>,
    fds: Vec<Option<OwnedFd>>,
    blobs: Vec<Bytes>,
}

/// Runs `f` on the context of the message being decoded: `None` outside
/// one. A message that came with no references, descriptors or blobs
/// (most) is decoded with no context set up, only `IN_BARE`; it sees an
/// empty one, so an index in it fails as out of range, as with any other.
fn with_in<R>(f: impl FnOnce(Option<&mut InCtx>) -> R) -> R {
    IN.with_borrow_mut(|c| match c.as_mut() {
        Some(ctx) => f(Some(ctx)),
        None if IN_BARE.get() => f(Some(&mut InCtx {
            refs: Vec::new(),
            fds: Vec::new(),
            blobs: Vec::new(),
        })),
        None => f(None),
    })
}

/// Restores `IN_BARE` when a bare decode ends, however it ends.
struct BareDecode(bool);

impl Drop for BareDecode {
    fn drop(&mut self) {
        IN_BARE.set(self.0);
    }
}

thread_local! {
    static OUT: RefCell<OutCtx> = const { RefCell::new(OutCtx::new(false, false)) };
    static IN: RefCell<Option<InCtx>> = const { RefCell::new(None) };
    /// Set while a message with nothing beside its payload is decoded (see
    /// [`with_in`]).
    static IN_BARE: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    /// Reused for encoding, so a payload is written into warm memory once
    /// and copied once, into its frame.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The largest scratch buffer kept between messages.
const SCRATCH_KEEP: usize = 4 << 20;

/// From this payload size on, the scratch buffer itself becomes the frame
/// (see [`hand_over`]) instead of being copied into one.
const HANDOVER_MIN: usize = 64 * 1024;

/// What [`encode_with`] found in a value besides its payload.
pub(crate) struct Found {
    pub refs: Vec<OutRef>,
    pub fds: Vec<OwnedFd>,
    /// [`Blob`]s, to follow the payload (see [`into_frame`]).
    pub blobs: Vec<Bytes>,
}

/// Encodes `value` into a per-thread scratch buffer, after `room` bytes
/// left for the envelope's head, and hands the buffer, with the
/// references, descriptors and blobs found in the value, to `build`. The
/// payload is `buf[room..]`; `build` copies it into a frame or takes the
/// buffer with [`hand_over`]. `blobs_ok` says whether the peer takes
/// blobs beside the payload.
pub(crate) fn encode_with<T: Serialize, R>(
    value: &T,
    room: usize,
    blobs_ok: bool,
    build: impl FnOnce(&mut Vec<u8>, Found) -> Result<R, RemoteError>,
) -> Result<R, RemoteError> {
    // An encode inside another's (a `Serialize` that encodes a message)
    // puts the outer one's aside.
    let outer = OUT.with_borrow_mut(|c| {
        if c.active {
            Some(std::mem::replace(c, OutCtx::new(true, blobs_ok)))
        } else {
            c.active = true;
            c.blobs_ok = blobs_ok;
            None
        }
    });
    let mut buf = SCRATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
    buf.clear();
    buf.resize(room, 0);
    let result = codec::encode_into(value, &mut buf);
    let found = OUT.with_borrow_mut(|c| {
        let found = Found {
            refs: std::mem::take(&mut c.refs),
            fds: std::mem::take(&mut c.fds),
            blobs: std::mem::take(&mut c.blobs),
        };
        match outer {
            Some(outer) => *c = outer,
            None => c.active = false,
        }
        found
    });
    let out = match result {
        Ok(()) => build(&mut buf, found),
        Err(e) => Err(e),
    };
    if buf.capacity() <= SCRATCH_KEEP {
        SCRATCH.with(|b| *b.borrow_mut() = buf);
    }
    out
}

/// Encodes `value` into `buf` (a link's send buffer, see
/// `Link::begin_frame`) after its envelope's head, which `write_head`
/// appends. True when done; false, with `buf` as it was, when the value
/// carries references, descriptors or blobs, which this path does not take
/// (the caller builds the frame the usual way, encoding the value again).
pub(crate) fn encode_in_place<T: Serialize>(
    value: &T,
    buf: &mut bytes::BytesMut,
    blobs_ok: bool,
    discard: impl FnOnce(&[OutRef]),
    write_head: impl FnOnce(&mut bytes::BytesMut),
) -> Result<bool, RemoteError> {
    // Through the scratch buffer, then one copy: ciborium writes a few
    // bytes at a time, which costs twice as much into a `BytesMut` as into
    // a `Vec`.
    encode_with(value, 0, blobs_ok, |payload, found| {
        if !found.refs.is_empty() || !found.fds.is_empty() || !found.blobs.is_empty() {
            if !found.refs.is_empty() {
                discard(&found.refs);
            }
            return Ok(false);
        }
        write_head(buf);
        buf.extend_from_slice(payload);
        Ok(true)
    })
}

thread_local! {
    /// Room that small frames are carved from (see [`frame_buf`]).
    static FRAME_ARENA: RefCell<bytes::BytesMut> = RefCell::new(bytes::BytesMut::new());
}

/// Frames up to this size come from the per-thread arena.
const ARENA_FRAME_MAX: usize = 4096;
/// Size of one arena block.
const ARENA_BLOCK: usize = 64 * 1024;

/// An empty buffer with room for exactly `cap` bytes, for one frame. Small
/// frames are carved from a per-thread 64 KiB block that they share (a
/// reference count instead of a `malloc` and `free` per message); the block
/// is freed when its last frame is.
fn frame_buf(cap: usize) -> bytes::BytesMut {
    if cap > ARENA_FRAME_MAX {
        return bytes::BytesMut::with_capacity(cap);
    }
    FRAME_ARENA.with_borrow_mut(|arena| {
        if arena.capacity() < cap {
            // Takes the block back when every frame carved from it is
            // gone (the usual case: frames are freed once written), else
            // allocates a new one. Reusing it matters more than it seems:
            // each large allocation makes glibc consolidate the small
            // chunks freed since, thousands of them under a flood.
            arena.reserve(ARENA_BLOCK);
        }
        let rest = arena.split_off(cap);
        std::mem::replace(arena, rest)
    })
}

/// Makes the frame of an encoded message. `buf` is what [`encode_with`]
/// handed over: `room` bytes of room, then the payload. `head_max` bounds
/// the envelope's head, which `write_head` writes (everything before the
/// payload); `blobs` follow the payload; `tag_room` is kept for a MAC. A
/// large message is built in the scratch buffer, which becomes the frame
/// ([`hand_over`]); a small one is copied once, after its head, into a
/// buffer of its size.
pub(crate) fn into_frame(
    buf: &mut Vec<u8>,
    room: usize,
    head_max: usize,
    tag_room: usize,
    blobs: &[Bytes],
    write_head: impl FnOnce(&mut bytes::BytesMut),
) -> bytes::BytesMut {
    let payload_len = buf.len() - room;
    let blobs_len: usize = blobs.iter().map(Bytes::len).sum();
    if payload_len + blobs_len >= HANDOVER_MIN {
        let mut head = bytes::BytesMut::with_capacity(head_max);
        write_head(&mut head);
        if head.len() == room {
            buf[..room].copy_from_slice(&head);
        } else {
            // References or blobs made the head longer than the room left
            // for it: move the payload (small, when blobs carry the bulk).
            buf.splice(..room, head.iter().copied());
        }
        buf.reserve(blobs_len + courier_runtime::wire::TAG_LEN);
        for b in blobs {
            buf.extend_from_slice(b);
        }
        hand_over(buf)
    } else {
        let mut frame = frame_buf(head_max + payload_len + blobs_len + tag_room);
        write_head(&mut frame);
        frame.extend_from_slice(&buf[room..]);
        for b in blobs {
            frame.extend_from_slice(b);
        }
        frame
    }
}

/// Makes the scratch buffer `buf` (a large frame, built in place) the
/// frame itself, with space for a MAC tag, leaving an empty one of the
/// same capacity behind. Saves copying a large payload once more.
fn hand_over(buf: &mut Vec<u8>) -> bytes::BytesMut {
    buf.reserve(courier_runtime::wire::TAG_LEN);
    let keep = buf.capacity().min(SCRATCH_KEEP);
    // Unique, so the conversion back to a mutable buffer copies nothing.
    bytes::BytesMut::from(bytes::Bytes::from(std::mem::replace(
        buf,
        Vec::with_capacity(keep),
    )))
}

/// Decodes `bytes` with the references and descriptors that came with it.
/// Descriptors the value does not take are closed when this returns.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    refs: Vec<Resolved>,
    fds: Vec<OwnedFd>,
    blobs: Vec<Bytes>,
) -> Result<T, RemoteError> {
    // The usual message carries none of these: no context to set up
    // unless one is set already (a decode inside another's), which must
    // not show through.
    if refs.is_empty() && fds.is_empty() && blobs.is_empty() && IN.with_borrow(Option::is_none) {
        let _bare = BareDecode(IN_BARE.replace(true));
        return codec::decode(bytes);
    }
    // Decoding takes descriptors out of the context, which a second pass
    // (the fast decoder's fallback) would find gone: one pass for those.
    let once = !fds.is_empty();
    let saved = IN.with(|c| {
        c.borrow_mut().replace(InCtx {
            refs,
            fds: fds.into_iter().map(Some).collect(),
            blobs,
        })
    });
    let result = if once {
        codec::decode_once(bytes)
    } else {
        codec::decode(bytes)
    };
    let leftover = IN.with(|c| std::mem::replace(&mut *c.borrow_mut(), saved));
    drop(leftover);
    result
}

/// Appends a reference to the message being encoded; returns its index.
pub(crate) fn push_ref<S: Serializer>(r: OutRef) -> Result<u32, S::Error> {
    OUT.with_borrow_mut(|ctx| {
        if !ctx.active {
            return Err(S::Error::custom(
                "a RemoteAddr can only be serialized by Courier, inside a message it sends",
            ));
        }
        ctx.refs.push(r);
        Ok((ctx.refs.len() - 1) as u32)
    })
}

/// Takes the reference at `index` from the message being decoded.
pub(crate) fn take_ref<'de, D: Deserializer<'de>>(index: u32) -> Result<Resolved, D::Error> {
    with_in(|ctx| match ctx {
        Some(ctx) => ctx.refs.get(index as usize).cloned().ok_or_else(|| {
            D::Error::custom(format!(
                "reference index {index} is out of range ({} references came with the message)",
                ctx.refs.len()
            ))
        }),
        None => Err(D::Error::custom(
            "a RemoteAddr can only be deserialized by Courier, from a message it received",
        )),
    })
}

/// An open file descriptor inside a message.
///
/// It travels on links that can carry descriptors (`unix://`, `fd://`) and
/// arrives as an owned, close-on-exec descriptor. Sending a message holding
/// one over a link that cannot carry it fails with
/// [`RemoteError::TransportCannot`] before anything is written. Sending
/// duplicates the descriptor; the message's own copy closes when the
/// message is dropped.
#[derive(Debug)]
pub struct Fd(pub OwnedFd);

impl Fd {
    /// Takes the descriptor out.
    pub fn into_inner(self) -> OwnedFd {
        self.0
    }
}

impl From<OwnedFd> for Fd {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl Serialize for Fd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let dup = rustix::io::fcntl_dupfd_cloexec(self.0.as_fd(), 0)
            .map_err(|e| S::Error::custom(format!("could not duplicate descriptor: {e}")))?;
        let index = OUT.with_borrow_mut(|ctx| {
            if !ctx.active {
                return Err(S::Error::custom(
                    "an Fd can only be serialized by Courier, inside a message it sends",
                ));
            }
            ctx.fds.push(dup);
            Ok((ctx.fds.len() - 1) as u32)
        })?;
        s.serialize_newtype_struct("courier.fd", &index)
    }
}

impl<'de> Deserialize<'de> for Fd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let index = u32::deserialize(d)?;
        with_in(|ctx| match ctx {
            Some(ctx) => ctx
                .fds
                .get_mut(index as usize)
                .and_then(Option::take)
                .map(Fd)
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "descriptor {index} did not come with the message (or was taken twice)"
                    ))
                }),
            None => Err(D::Error::custom(
                "an Fd can only be deserialized by Courier, from a message it received",
            )),
        })
    }
}

/// Bytes that travel beside a message's CBOR payload rather than inside
/// it: the receiver gets them as a slice of the frame it read, with no
/// copy, where a `Vec<u8>` or `bytes::Bytes` field is copied out of the
/// CBOR (twice, by ciborium). Use it for bulk data: file contents, images,
/// large buffers. A message may hold several, anywhere in its structure.
///
/// Outside Courier (serialized to JSON, say), and to a peer that does not
/// take blobs, a `Blob` is an ordinary byte string. A received blob of 16
/// KiB or more shares the buffer its frame was read into (smaller ones are
/// copied): keeping it keeps that buffer, which may be larger than the
/// blob; keep a copy (`Blob::from(blob.to_vec())`) of a part you keep for
/// long.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Blob(Bytes);

impl Blob {
    /// A blob of `bytes` (no copy for `Bytes`, `Vec<u8>` or `&'static [u8]`).
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self(bytes.into())
    }

    /// The bytes, as a cheaply clonable `Bytes`.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for Blob {
    fn from(b: Bytes) -> Self {
        Self(b)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Self(v.into())
    }
}

impl From<&'static [u8]> for Blob {
    fn from(s: &'static [u8]) -> Self {
        Self(Bytes::from_static(s))
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Beside the payload when Courier encodes a message for a peer
        // that takes blobs: the payload holds the blob's index.
        let index = OUT.with_borrow_mut(|c| {
            if !c.active || !c.blobs_ok {
                return None;
            }
            // Checked before adding: the count must fit its 16-bit field
            // even if a caller's `Serialize` swallowed this error.
            if c.blobs.len() >= courier_runtime::wire::MAX_BLOBS {
                return Some(None);
            }
            c.blobs.push(self.0.clone());
            Some(Some((c.blobs.len() - 1) as u64))
        });
        match index {
            Some(Some(i)) => s.serialize_u64(i),
            Some(None) => Err(S::Error::custom(format!(
                "a message holds more than {} blobs",
                courier_runtime::wire::MAX_BLOBS
            ))),
            None => s.serialize_bytes(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Inside a message Courier decodes, the value is an index or (from
        // a peer without blobs) a byte string; elsewhere a byte string, so
        // formats that are not self-describing work too.
        if with_in(|ctx| ctx.is_some()) {
            d.deserialize_any(BlobVisitor)
        } else {
            d.deserialize_byte_buf(BlobVisitor)
        }
    }
}

struct BlobVisitor;

/// Received blobs from this size on are slices of the frame; smaller ones
/// are copied (see `BlobVisitor::visit_u64`).
const BLOB_SHARE_MIN: usize = 16 * 1024;

impl<'de> serde::de::Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string, or the index of a blob that came with the message")
    }

    fn visit_u64<E: serde::de::Error>(self, index: u64) -> Result<Blob, E> {
        with_in(|ctx| match ctx {
            Some(ctx) => usize::try_from(index)
                .ok()
                .and_then(|i| ctx.blobs.get(i))
                .map(|b| {
                    // A received blob shares the buffer the frame was read
                    // into, which may hold other frames too: a small one
                    // is copied, so keeping it keeps no more than itself.
                    if b.len() <= BLOB_SHARE_MIN {
                        Blob(Bytes::copy_from_slice(b))
                    } else {
                        Blob(b.clone())
                    }
                })
                .ok_or_else(|| {
                    E::custom(format!(
                        "blob index {index} is out of range ({} blobs came with the message)",
                        ctx.blobs.len()
                    ))
                }),
            None => Err(E::custom(
                "a blob index can only be decoded by Courier, from a message it received",
            )),
        })
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob(Bytes::from(v)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        // Formats without byte strings write bytes as a sequence of numbers.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Blob(Bytes::from(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Doc {
        name: String,
        body: Blob,
    }

    fn doc() -> Doc {
        Doc {
            name: "a".into(),
            body: Blob::from(vec![9u8; 10_000]),
        }
    }

    #[test]
    fn outside_courier_a_blob_is_a_byte_string() {
        let bytes = codec::encode(&doc()).unwrap();
        // The 10,000 bytes are in the CBOR, as a byte string.
        assert!(bytes.len() > 10_000);
        assert_eq!(codec::decode::<Doc>(&bytes).unwrap(), doc());
        // Outside Courier only a byte string is a blob.
        let index = codec::encode(&0u64).unwrap();
        let e = codec::decode::<Blob>(&index).unwrap_err();
        assert!(e.to_string().contains("expected byte buffer"), "{e}");
    }

    #[test]
    fn blobs_go_beside_the_payload_only_when_the_peer_takes_them() {
        let (payload, blobs) =
            encode_with(&doc(), 0, true, |buf, found| Ok((buf.clone(), found.blobs))).unwrap();
        assert!(payload.len() < 100, "the payload holds only an index");
        assert_eq!(blobs.len(), 1);
        let back: Doc = decode(&payload, vec![], vec![], blobs).unwrap();
        assert_eq!(back, doc());
        // An index past the blobs that came is a clear error.
        let e = decode::<Doc>(&payload, vec![], vec![], vec![]).unwrap_err();
        assert!(
            e.to_string().contains("blob index 0 is out of range"),
            "{e}"
        );

        let (payload, blobs) = encode_with(&doc(), 0, false, |buf, found| {
            Ok((buf.clone(), found.blobs))
        })
        .unwrap();
        assert!(blobs.is_empty());
        assert!(payload.len() > 10_000, "inline, as a byte string");
        let back: Doc = decode(&payload, vec![], vec![], vec![]).unwrap();
        assert_eq!(back, doc());
    }
}
