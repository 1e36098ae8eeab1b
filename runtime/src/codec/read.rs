//! The fast path of [`super::decode`]: CBOR decoded straight from the
//! slice it lies in.
//!
//! ciborium's deserializer reads through `ciborium_io::Read`: every head
//! goes through its generic decoder, and every field name and byte string
//! is copied into a scratch buffer before the visitor sees it. For the
//! small messages Courier carries, that is most of the cost of decoding
//! (1,558 instructions for a struct of an integer and 64 bytes, against
//! 568 here; callgrind, `BENCHMARKS.md`).
//!
//! This decoder makes the same calls on the visitor that ciborium makes,
//! for the same input, but borrows names and bytes from the slice. It only
//! knows the CBOR that ciborium's serializer writes for ordinary types:
//! definite lengths, no tags, the simple values false, true, null and
//! undefined, and floats. On anything else, and on any error at all, it
//! gives up (`None`) and the caller decodes again with ciborium, which
//! then gives the answer, value or error, it always gave. So for any input
//! the result is ciborium's; a property test holds the two to that.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// Nesting depth allowed, as in `ciborium::de::from_reader`.
const RECURSION_LIMIT: usize = 256;

/// ciborium's scratch size: byte and text strings up to this length are
/// visited as slices (`visit_bytes`, `visit_str`); longer ones are only
/// taken where ciborium takes them, as owned buffers.
const SCRATCH_LEN: usize = super::DECODE_SCRATCH_LEN;

/// Decodes `bytes` as a `T`, or `None` where ciborium must decide.
#[inline]
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let mut de = SliceDecoder {
        input: bytes,
        depth: RECURSION_LIMIT,
    };
    T::deserialize(&mut de).ok()
}

/// Why the fast path stopped; never shown to anyone.
#[derive(Debug)]
pub(super) struct GiveUp;

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("left to ciborium")
    }
}

impl std::error::Error for GiveUp {}

impl de::Error for GiveUp {
    #[cold]
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        GiveUp
    }
}

/// One CBOR head, as far as this decoder understands it.
#[derive(Clone, Copy)]
enum Head {
    Positive(u64),
    /// The value is `-1 - n`.
    Negative(u64),
    Bytes(usize),
    Text(usize),
    Array(usize),
    Map(usize),
    Bool(bool),
    /// null or undefined, which ciborium treats alike.
    Null,
    Float(f64),
}

struct SliceDecoder<'de> {
    input: &'de [u8],
    depth: usize,
}

type Result<T> = std::result::Result<T, GiveUp>;

impl<'de> SliceDecoder<'de> {
    /// Reads one head.
    #[inline(always)]
    fn head(&mut self) -> Result<Head> {
        let (&first, rest) = self.input.split_first().ok_or(GiveUp)?;
        let info = first & 0x1f;
        let (arg, rest): (u64, &'de [u8]) = match info {
            0..=23 => (u64::from(info), rest),
            24 => {
                let (&b, rest) = rest.split_first().ok_or(GiveUp)?;
                (u64::from(b), rest)
            }
            25 => {
                let (b, rest) = rest.split_first_chunk::<2>().ok_or(GiveUp)?;
                (u64::from(u16::from_be_bytes(*b)), rest)
            }
            26 => {
                let (b, rest) = rest.split_first_chunk::<4>().ok_or(GiveUp)?;
                (u64::from(u32::from_be_bytes(*b)), rest)
            }
            27 => {
                let (b, rest) = rest.split_first_chunk::<8>().ok_or(GiveUp)?;
                (u64::from_be_bytes(*b), rest)
            }
            // Reserved, or an indefinite length or break: ciborium's.
            _ => return Err(GiveUp),
        };
        let head = match first >> 5 {
            0 => Head::Positive(arg),
            1 => Head::Negative(arg),
            2 => Head::Bytes(self.length(arg, rest)?),
            3 => Head::Text(self.length(arg, rest)?),
            4 => Head::Array(usize::try_from(arg).map_err(|_| GiveUp)?),
            5 => Head::Map(usize::try_from(arg).map_err(|_| GiveUp)?),
            // Tags: ciborium's.
            6 => return Err(GiveUp),
            _ => match info {
                20 => Head::Bool(false),
                21 => Head::Bool(true),
                22 | 23 => Head::Null,
                25 => Head::Float(half::f16::from_bits(arg as u16).to_f64()),
                26 => Head::Float(f64::from(f32::from_bits(arg as u32))),
                27 => Head::Float(f64::from_bits(arg)),
                // Other simple values (and a simple value in a second
                // byte): ciborium's.
                _ => return Err(GiveUp),
            },
        };
        self.input = rest;
        Ok(head)
    }

    /// A byte or text string's length, checked against what is left.
    #[inline]
    fn length(&self, arg: u64, rest: &[u8]) -> Result<usize> {
        match usize::try_from(arg) {
            Ok(n) if n <= rest.len() => Ok(n),
            _ => Err(GiveUp),
        }
    }

    /// The head that comes next, left in place.
    #[inline]
    fn peek(&mut self) -> Result<Head> {
        let at = self.input;
        let head = self.head();
        self.input = at;
        head
    }

    /// The next `n` bytes (checked by `length` already).
    #[inline]
    fn take(&mut self, n: usize) -> &'de [u8] {
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        taken
    }

    #[inline]
    fn text(&mut self, n: usize) -> Result<&'de str> {
        std::str::from_utf8(self.take(n)).map_err(|_| GiveUp)
    }

    /// Runs `f` one level deeper.
    #[inline]
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.depth == 0 {
            return Err(GiveUp);
        }
        self.depth -= 1;
        let result = f(self);
        self.depth += 1;
        result
    }

    /// An integer for the signed visitors up to 64 bits.
    #[inline]
    fn signed(&mut self) -> Result<i64> {
        match self.head()? {
            Head::Positive(x) => i64::try_from(x).map_err(|_| GiveUp),
            Head::Negative(x) => i64::try_from(x).map(|x| x ^ !0).map_err(|_| GiveUp),
            _ => Err(GiveUp),
        }
    }

    #[inline]
    fn unsigned(&mut self) -> Result<u64> {
        match self.head()? {
            Head::Positive(x) => Ok(x),
            _ => Err(GiveUp),
        }
    }
}

impl<'de> de::Deserializer<'de> for &mut SliceDecoder<'de> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek()? {
            Head::Positive(_) => self.deserialize_u64(visitor),
            Head::Negative(x) if i64::try_from(x).is_ok() => self.deserialize_i64(visitor),
            Head::Negative(_) => self.deserialize_i128(visitor),
            Head::Bytes(n) if n <= SCRATCH_LEN => self.deserialize_bytes(visitor),
            Head::Bytes(_) => self.deserialize_byte_buf(visitor),
            Head::Text(n) if n <= SCRATCH_LEN => self.deserialize_str(visitor),
            Head::Text(_) => self.deserialize_string(visitor),
            Head::Array(_) => self.deserialize_seq(visitor),
            Head::Map(_) => self.deserialize_map(visitor),
            Head::Float(_) => self.deserialize_f64(visitor),
            Head::Bool(_) => self.deserialize_bool(visitor),
            Head::Null => self.deserialize_option(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Bool(b) => visitor.visit_bool(b),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Float(x) => visitor.visit_f64(x),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i64(self.signed()?)
    }

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Positive(x) => visitor.visit_i128(i128::from(x)),
            Head::Negative(x) => visitor.visit_i128(i128::from(x) ^ !0),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u64(self.unsigned()?)
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u128(u128::from(self.unsigned()?))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Text(n) if n <= 4 => {
                let mut chars = self.text(n)?.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => visitor.visit_char(c),
                    _ => Err(GiveUp),
                }
            }
            _ => Err(GiveUp),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Text(n) if n <= SCRATCH_LEN => visitor.visit_str(self.text(n)?),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Text(n) => visitor.visit_string(self.text(n)?.to_owned()),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Bytes(n) if n <= SCRATCH_LEN => visitor.visit_bytes(self.take(n)),
            Head::Array(n) => self.nested(|me| visitor.visit_seq(Items { de: me, left: n })),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Bytes(n) => visitor.visit_byte_buf(self.take(n).to_vec()),
            Head::Array(n) => self.nested(|me| visitor.visit_seq(Items { de: me, left: n })),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek()? {
            Head::Null => {
                self.head()?;
                visitor.visit_none()
            }
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Null => visitor.visit_unit(),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Array(n) => self.nested(|me| visitor.visit_seq(Items { de: me, left: n })),
            Head::Bytes(n) => visitor.visit_seq(ByteItems(self.take(n).iter())),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Map(n) => self.nested(|me| visitor.visit_map(Items { de: me, left: n })),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        // ciborium's tag types travel as this enum.
        if name == "@@TAG@@" {
            return Err(GiveUp);
        }
        match self.peek()? {
            Head::Map(1) => {
                self.head()?;
            }
            Head::Text(_) => {}
            _ => return Err(GiveUp),
        }
        self.nested(|me| visitor.visit_enum(Items { de: me, left: 0 }))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.head()? {
            Head::Text(n) if n <= SCRATCH_LEN => visitor.visit_str(self.text(n)?),
            Head::Bytes(n) if n <= SCRATCH_LEN => visitor.visit_bytes(self.take(n)),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_any(visitor)
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The items of an array or the entries of a map (`left` more), or an
/// enum's variant.
struct Items<'a, 'de> {
    de: &'a mut SliceDecoder<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = GiveUp;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = GiveUp;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::EnumAccess<'de> for Items<'_, 'de> {
    type Error = GiveUp;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let variant = seed.deserialize(&mut *self.de)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Items<'_, 'de> {
    type Error = GiveUp;

    // As ciborium: a unit variant is its name alone.
    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        seed.deserialize(&mut *self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value> {
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        de::Deserializer::deserialize_any(&mut *self.de, visitor)
    }
}

/// A byte string read as a sequence of `u8`, as ciborium allows.
struct ByteItems<'de>(std::slice::Iter<'de, u8>);

impl<'de> de::SeqAccess<'de> for ByteItems<'de> {
    type Error = GiveUp;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        match self.0.next() {
            Some(&b) => seed.deserialize(b.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

#[cfg(test)]
mod tests {
    //! The fast path must answer as ciborium does whenever it answers:
    //! random values, their encodings, and those encodings damaged, are
    //! decoded as several types both ways.

    use std::collections::BTreeMap;

    use ciborium::value::Value;
    use proptest::prelude::*;

    use super::super::strategies::{float, value};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::super::{decode_once, encode};

    /// Bytes read with `deserialize_bytes` (a slice visit).
    #[derive(Clone, Debug, PartialEq)]
    struct Slice(Vec<u8>);

    /// Bytes read with `deserialize_byte_buf` (an owned visit).
    #[derive(Clone, Debug, PartialEq)]
    struct Buf(Vec<u8>);

    struct BytesVisitor;

    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
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
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = a.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    impl Serialize for Slice {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }
    impl<'de> Deserialize<'de> for Slice {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_bytes(BytesVisitor).map(Slice)
        }
    }
    impl Serialize for Buf {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }
    impl<'de> Deserialize<'de> for Buf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_byte_buf(BytesVisitor).map(Buf)
        }
    }

    #[derive(Clone, Serialize, Deserialize, Debug, PartialEq)]
    enum Shape {
        Unit,
        Newtype(i64),
        Tuple(u8, String, Option<bool>),
        Struct { a: i16, b: Vec<Shape> },
    }

    #[derive(Clone, Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "kind")]
    enum Tagged {
        One { n: u32 },
        Two { s: String },
    }

    #[derive(Clone, Serialize, Deserialize, Debug, PartialEq)]
    #[serde(untagged)]
    enum Either {
        Num(i64),
        Text(String),
        List(Vec<Either>),
    }

    /// Most shapes serde has, in one struct.
    #[derive(Clone, Serialize, Deserialize, Debug, PartialEq)]
    struct Typed {
        id: u64,
        small: (u8, i8, u16, i32),
        wide: (u128, i128),
        floats: (f32, f64),
        c: char,
        name: String,
        slice: Slice,
        buf: Buf,
        seq: Vec<u8>,
        map: BTreeMap<String, i64>,
        opt: Option<Box<Typed>>,
        shapes: Vec<Shape>,
        tagged: Tagged,
        either: Either,
        unit: (),
    }

    /// A struct that knows fewer fields than `Typed`: the rest are skipped
    /// (`deserialize_ignored_any`).
    #[derive(Clone, Serialize, Deserialize, Debug, PartialEq)]
    struct Partial {
        id: u64,
        name: String,
    }

    /// Checks one input for one type: where the fast path answers, its
    /// value is ciborium's (compared by encoding, since NaN != NaN).
    /// Returns whether the fast path answered.
    fn agrees<T>(bytes: &[u8]) -> bool
    where
        T: serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
    {
        let slow = decode_once::<T>(bytes);
        match super::decode::<T>(bytes) {
            Some(fast) => {
                let slow = slow.unwrap_or_else(|e| {
                    panic!("fast path decoded {fast:?} where ciborium failed: {e}")
                });
                assert_eq!(
                    encode(&fast).unwrap(),
                    encode(&slow).unwrap(),
                    "{fast:?} against {slow:?}"
                );
                true
            }
            None => false,
        }
    }

    fn all_agree(bytes: &[u8]) {
        agrees::<Value>(bytes);
        agrees::<Typed>(bytes);
        agrees::<Partial>(bytes);
        agrees::<Shape>(bytes);
        agrees::<Either>(bytes);
        agrees::<Tagged>(bytes);
        agrees::<Vec<u64>>(bytes);
        agrees::<Option<(i8, u16, char)>>(bytes);
        agrees::<String>(bytes);
        agrees::<Slice>(bytes);
        agrees::<Buf>(bytes);
        agrees::<f32>(bytes);
        agrees::<i128>(bytes);
        agrees::<()>(bytes);
    }

    fn shape() -> impl Strategy<Value = Shape> {
        let leaf = prop_oneof![
            Just(Shape::Unit),
            any::<i64>().prop_map(Shape::Newtype),
            (any::<u8>(), ".{0,6}", any::<Option<bool>>())
                .prop_map(|(a, b, c)| Shape::Tuple(a, b, c)),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            (any::<i16>(), proptest::collection::vec(inner, 0..3))
                .prop_map(|(a, b)| Shape::Struct { a, b })
        })
    }

    fn typed() -> impl Strategy<Value = Typed> {
        (
            (
                any::<u64>(),
                any::<(u8, i8, u16, i32)>(),
                // Within CBOR's integers: wider ones are bignum tags,
                // left to ciborium (see `what_is_left_to_ciborium`).
                (any::<u64>(), -(1i128 << 64)..(1i128 << 64)).prop_map(|(u, i)| (u128::from(u), i)),
            ),
            (any::<f32>(), float(), any::<char>(), ".{0,10}"),
            (
                proptest::collection::vec(any::<u8>(), 0..70),
                proptest::collection::vec(any::<u8>(), 0..70),
                proptest::collection::vec(any::<u8>(), 0..10),
                proptest::collection::btree_map(".{0,4}", any::<i64>(), 0..4),
            ),
            (
                proptest::collection::vec(shape(), 0..3),
                any::<(bool, u32)>(),
                any::<i64>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((id, small, wide), (f, g, c, name), (s, b, seq, map), (shapes, t, e, nested))| {
                    let make = |opt| Typed {
                        id,
                        small,
                        wide,
                        floats: (f, g),
                        c,
                        name: name.clone(),
                        slice: Slice(s.clone()),
                        buf: Buf(b.clone()),
                        seq: seq.clone(),
                        map: map.clone(),
                        opt,
                        shapes: Vec::new(),
                        tagged: if t.0 {
                            Tagged::One { n: t.1 }
                        } else {
                            Tagged::Two { s: name.clone() }
                        },
                        either: if t.0 {
                            Either::Num(e)
                        } else {
                            Either::List(vec![Either::Text(name.clone()), Either::Num(e)])
                        },
                        unit: (),
                    };
                    let mut v = make(nested.then(|| Box::new(make(None))));
                    v.shapes = shapes;
                    v
                },
            )
    }

    /// Damage: a byte changed, or the end cut off.
    fn damaged(mut bytes: Vec<u8>, at: usize, to: u8, cut: bool) -> Vec<u8> {
        if bytes.is_empty() {
            return bytes;
        }
        let at = at % bytes.len();
        if cut {
            bytes.truncate(at);
        } else {
            bytes[at] = to;
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn values_decode_as_ciborium_decodes_them(v in value(), at: usize, to: u8, cut: bool) {
            let bytes = encode(&v).unwrap();
            all_agree(&bytes);
            all_agree(&damaged(bytes, at, to, cut));
        }

        #[test]
        fn typed_values_decode_as_ciborium_decodes_them(v in typed(), at: usize, to: u8, cut: bool) {
            let bytes = encode(&v).unwrap();
            // An ordinary struct is the fast path's to decode.
            prop_assert!(agrees::<Typed>(&bytes), "fast path gave up on {:?}", v);
            prop_assert!(agrees::<Partial>(&bytes));
            all_agree(&damaged(bytes, at, to, cut));
        }

        #[test]
        fn random_bytes_decode_as_ciborium_decodes_them(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            all_agree(&bytes);
        }
    }

    #[test]
    fn what_is_left_to_ciborium() {
        // Tags, indefinite lengths, and simple values other than the four.
        let tagged = encode(&Value::Tag(7, Box::new(Value::Integer(1.into())))).unwrap();
        assert!(!agrees::<Value>(&tagged));
        assert!(!agrees::<Vec<u8>>(&[0x9f, 0x01, 0xff]));
        assert!(!agrees::<Value>(&[0xf0]));
        // A bignum: ciborium writes u128 values past u64 as a tag.
        assert!(!agrees::<u128>(&encode(&(u128::MAX)).unwrap()));
        // Nesting past ciborium's limit.
        let deep: Vec<u8> = std::iter::repeat_n(0x81, 300).chain([0x01]).collect();
        assert!(!agrees::<Value>(&deep));
        assert!(decode_once::<Value>(&deep).is_err());
        // Within it, the fast path's.
        let nested: Vec<u8> = std::iter::repeat_n(0x81, 200).chain([0x01]).collect();
        assert!(agrees::<Value>(&nested));
        // Strings past ciborium's scratch are only read owned.
        let long = "x".repeat(super::SCRATCH_LEN + 1);
        let bytes = encode(&long).unwrap();
        assert!(agrees::<String>(&bytes));
        assert!(agrees::<Value>(&bytes));
        assert!(decode_once::<Slice>(&encode(&Buf(vec![1; 5000])).unwrap()).is_err());
        assert!(!agrees::<Slice>(&encode(&Buf(vec![1; 5000])).unwrap()));
        assert!(agrees::<Buf>(&encode(&Buf(vec![1; 5000])).unwrap()));
    }

    #[test]
    fn a_length_past_the_end_is_refused_without_allocating() {
        // A byte string claiming 2^62 bytes, and an array claiming as many
        // items: both give up at once.
        let mut bytes = vec![0x5b];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(!agrees::<Buf>(&bytes));
        bytes[0] = 0x9b;
        assert!(!agrees::<Vec<u64>>(&bytes));
        assert!(!agrees::<Value>(&bytes));
    }
}
