//! Length-prefixed framing for byte-stream links (TCP, Unix, fd).
//!
//! A frame on a stream is a 4-byte big-endian body length followed by the
//! body. The decoder takes input in pieces of any size (one byte at a time
//! works) and checks the announced length against its maximum *before* it
//! reserves room for the body, so a hostile length costs nothing.
//!
//! ```
//! use bytes::BytesMut;
//! use courier_runtime::frame::{encode_prefix, FrameDecoder};
//!
//! let mut wire = BytesMut::new();
//! wire.extend_from_slice(&encode_prefix(5, 1024).unwrap());
//! wire.extend_from_slice(b"hello");
//! let mut dec = FrameDecoder::new(1024);
//! let frame = dec.decode(&mut wire).unwrap().unwrap();
//! assert_eq!(&frame[..], b"hello");
//! ```

use bytes::{Buf, Bytes, BytesMut};

/// Bytes taken by the length prefix.
pub const PREFIX_LEN: usize = 4;

/// The default maximum body length of a frame after authentication: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The maximum body length of a frame before authentication completes.
pub const HANDSHAKE_MAX_FRAME: usize = 1024;

/// The largest maximum a decoder accepts: lengths travel as `u32`.
pub const ABSOLUTE_MAX_FRAME: usize = u32::MAX as usize;

/// A frame that cannot be accepted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced body length is over the limit in force.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

/// Encodes the prefix announcing a body of `len` bytes, refusing lengths
/// over `max`.
pub fn encode_prefix(len: usize, max: usize) -> Result<[u8; PREFIX_LEN], FrameError> {
    let max = max.min(ABSOLUTE_MAX_FRAME);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((len as u32).to_be_bytes())
}

/// Incremental decoder of length-prefixed frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.min(ABSOLUTE_MAX_FRAME),
        }
    }

    /// The limit in force.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Changes the limit (for example when authentication completes).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max.min(ABSOLUTE_MAX_FRAME);
    }

    /// Takes the next whole frame off the front of `buf`, if `buf` holds one.
    ///
    /// Returns `Ok(None)` when more bytes are needed; in that case it has
    /// reserved room in `buf` for the rest of the frame (never more than the
    /// limit). An error is final: the stream is no longer in sync.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let total = PREFIX_LEN + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(PREFIX_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

/// A decoder that owns its buffer, for callers that get bytes as slices.
#[derive(Debug, Clone)]
pub struct FrameReader {
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl FrameReader {
    /// A reader refusing bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            decoder: FrameDecoder::new(max),
            buf: BytesMut::new(),
        }
    }

    /// The decoder, to change its limit.
    pub fn decoder_mut(&mut self) -> &mut FrameDecoder {
        &mut self.decoder
    }

    /// Feeds bytes in; at most one frame's worth is buffered past what the
    /// caller hands in.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.decoder.decode(&mut self.buf)
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Appends one frame (prefix and body) to `out`.
pub fn write_frame(out: &mut BytesMut, body: &[u8], max: usize) -> Result<(), FrameError> {
    let prefix = encode_prefix(body.len(), max)?;
    out.reserve(PREFIX_LEN + body.len());
    out.extend_from_slice(&prefix);
    out.extend_from_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream_of(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for f in frames {
            write_frame(&mut out, f, 1 << 20).unwrap();
        }
        out.to_vec()
    }

    #[test]
    fn one_byte_at_a_time() {
        let frames = vec![b"".to_vec(), b"a".to_vec(), vec![7u8; 300]];
        let wire = stream_of(&frames);
        let mut r = FrameReader::new(1024);
        let mut got = Vec::new();
        for b in wire {
            r.push(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, frames);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn oversized_is_refused_before_the_body_arrives() {
        let mut r = FrameReader::new(16);
        r.push(&(1u32 << 31).to_be_bytes());
        assert_eq!(
            r.next_frame(),
            Err(FrameError::TooLarge {
                len: 1 << 31,
                max: 16
            })
        );
        // Nothing was reserved for the announced body.
        assert!(r.buf.capacity() < 1024);
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        assert!(encode_prefix(17, 16).is_err());
        assert!(encode_prefix(16, 16).is_ok());
    }

    proptest! {
        #[test]
        fn random_chunkings_give_the_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
            cuts in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let wire = stream_of(&frames);
            let mut r = FrameReader::new(1024);
            let mut got = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - pos);
                r.push(&wire[pos..pos + n]);
                pos += n;
                i += 1;
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), max in 0usize..512) {
            let mut r = FrameReader::new(max);
            r.push(&bytes);
            for _ in 0..bytes.len() + 1 {
                match r.next_frame() {
                    Ok(Some(f)) => prop_assert!(f.len() <= max),
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(r.buffered() <= bytes.len());
        }
    }
}
