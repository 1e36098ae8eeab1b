//! CBOR payloads (ciborium), with errors that name the type concerned.

use std::cell::Cell;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::RemoteError;

/// Encodes `value` as CBOR, appending to `out`: the bytes ciborium's
/// serializer writes, without its generic writer (see `codec/write.rs`).
#[inline]
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), RemoteError> {
    write::encode_into(value, out).map_err(|e| RemoteError::Codec {
        op: "encode",
        type_name: std::any::type_name::<T>().to_owned(),
        reason: e.0,
    })
}

/// Encodes `value` as CBOR.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, RemoteError> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// The scratch space ciborium decodes short strings and byte strings
/// through; the size `ciborium::from_reader` uses.
const DECODE_SCRATCH_LEN: usize = 4096;

std::thread_local! {
    /// One decode's scratch space, kept per thread: `ciborium::from_reader`
    /// zeroes a fresh 4 KiB array on every call, which costs more than
    /// decoding a small message. Taken while in use, so a decode nested in
    /// another gets its own.
    static DECODE_SCRATCH: Cell<Option<Box<[u8; DECODE_SCRATCH_LEN]>>> = const { Cell::new(None) };
}

mod read;
#[cfg(test)]
mod strategies;
mod write;

/// Decodes CBOR bytes as a `T`. Hostile input gives an error, never a
/// panic; nesting is bounded by ciborium's recursion limit (256, as in
/// `ciborium::from_reader`).
///
/// The common shapes are decoded straight from the slice (see
/// `codec/read.rs`); anything else, and every error, is decoded again by
/// ciborium, whose answer is the one returned. A `Deserialize` impl may
/// therefore run twice on one input: on input that fails, and on valid
/// input the fast path leaves to ciborium part-way (a tag, a bignum, an
/// indefinite length). Values whose decoding has side effects go through
/// [`decode_once`].
#[inline]
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RemoteError> {
    match read::decode(bytes) {
        Some(value) => Ok(value),
        None => decode_once(bytes),
    }
}

/// Decodes CBOR bytes as a `T` with ciborium alone, in one pass: for
/// values whose decoding has side effects (taking descriptors out of the
/// message they came with).
pub fn decode_once<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RemoteError> {
    let mut scratch = DECODE_SCRATCH
        .take()
        .unwrap_or_else(|| Box::new([0; DECODE_SCRATCH_LEN]));
    let result = ciborium::de::from_reader_with_buffer(bytes, &mut scratch[..]);
    DECODE_SCRATCH.set(Some(scratch));
    result.map_err(|e| RemoteError::Codec {
        op: "decode",
        type_name: std::any::type_name::<T>().to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
    struct Add {
        amount: u64,
        note: String,
        blob: Vec<u8>,
    }

    #[test]
    fn round_trip_and_typed_errors() {
        let v = Add {
            amount: 5,
            note: "hi".into(),
            blob: vec![1, 2, 3],
        };
        assert_eq!(decode::<Add>(&encode(&v).unwrap()).unwrap(), v);
        let e = decode::<Add>(b"\xff").unwrap_err();
        assert!(matches!(e, RemoteError::Codec { op: "decode", .. }), "{e}");
        assert!(e.to_string().contains("Add"), "{e}");
    }

    proptest! {
        #[test]
        fn round_trips(amount: u64, note in ".{0,40}", blob in proptest::collection::vec(any::<u8>(), 0..100)) {
            let v = Add { amount, note, blob };
            prop_assert_eq!(decode::<Add>(&encode(&v).unwrap()).unwrap(), v);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Add>(&bytes);
            let _ = decode::<ciborium::value::Value>(&bytes);
        }
    }
}
