//! The encoder behind [`super::encode_into`]: CBOR written straight into
//! a `Vec<u8>`.
//!
//! It writes, byte for byte, what ciborium's serializer writes (a property
//! test holds the two to that, tags and big integers included): the
//! shortest head for every integer and length, floats in the shortest of
//! half, single and double precision that keeps the value, unit and `None`
//! as null, enums as a variant name or a one-entry map, and ciborium's tag
//! types (`ciborium::tag`, `Value::Tag`) as tags. What it saves is
//! ciborium's generic writer and its `Header`/`Title` steps: 188
//! instructions against 414 for a struct of an integer and 64 bytes
//! (callgrind, `BENCHMARKS.md`).

use serde::ser::{self, Impossible, Serialize};

/// Appends the CBOR encoding of `value` to `out`.
#[inline]
pub(super) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> std::result::Result<(), Refused> {
    value.serialize(&mut VecEncoder { out })
}

/// A value's `Serialize` refused (`serde::ser::Error::custom`); writing to
/// a `Vec` cannot fail otherwise.
#[derive(Debug)]
pub(super) struct Refused(pub(super) String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl ser::Error for Refused {
    #[cold]
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Refused(msg.to_string())
    }
}

type Result<T = ()> = std::result::Result<T, Refused>;

const POSITIVE: u8 = 0;
const NEGATIVE: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;
const FALSE: u8 = 0xf4;
const TRUE: u8 = 0xf5;
const NULL: u8 = 0xf6;
const INDEFINITE_ARRAY: u8 = 0x9f;
const INDEFINITE_MAP: u8 = 0xbf;
const BREAK: u8 = 0xff;
/// Bignum tags (RFC 8949, 3.4.3).
const BIGPOS: u64 = 2;
const BIGNEG: u64 = 3;
/// The names ciborium's tag types serialize under.
const TAG_ENUM: &str = "@@TAG@@";
const TAGGED: &str = "@@TAGGED@@";
const UNTAGGED: &str = "@@UNTAGGED@@";

struct VecEncoder<'a> {
    out: &'a mut Vec<u8>,
}

impl VecEncoder<'_> {
    /// A head: `major` with `arg` in the fewest bytes.
    #[inline]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.out.push(m | arg as u8);
        } else if arg <= u64::from(u8::MAX) {
            self.out.extend_from_slice(&[m | 24, arg as u8]);
        } else if arg <= u64::from(u16::MAX) {
            self.out.push(m | 25);
            self.out.extend_from_slice(&(arg as u16).to_be_bytes());
        } else if arg <= u64::from(u32::MAX) {
            self.out.push(m | 26);
            self.out.extend_from_slice(&(arg as u32).to_be_bytes());
        } else {
            self.out.push(m | 27);
            self.out.extend_from_slice(&arg.to_be_bytes());
        }
    }

    #[inline]
    fn text(&mut self, s: &str) {
        self.head(TEXT, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A bignum: `tag`, then the magnitude's bytes without leading zeros.
    fn bignum(&mut self, tag: u64, raw: u128) {
        let bytes = raw.to_be_bytes();
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        self.head(TAG, tag);
        self.head(BYTES, (bytes.len() - first) as u64);
        self.out.extend_from_slice(&bytes[first..]);
    }
}

fn collection<'a, 'b>(enc: &'a mut VecEncoder<'b>, ending: bool) -> Collection<'a, 'b> {
    Collection {
        enc,
        ending,
        tag: false,
    }
}

impl<'a, 'b> ser::Serializer for &'a mut VecEncoder<'b> {
    type Ok = ();
    type Error = Refused;
    type SerializeSeq = Collection<'a, 'b>;
    type SerializeTuple = Collection<'a, 'b>;
    type SerializeTupleStruct = Collection<'a, 'b>;
    type SerializeTupleVariant = Collection<'a, 'b>;
    type SerializeMap = Collection<'a, 'b>;
    type SerializeStruct = Collection<'a, 'b>;
    type SerializeStructVariant = Collection<'a, 'b>;

    fn serialize_bool(self, v: bool) -> Result {
        self.out.push(if v { TRUE } else { FALSE });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result {
        self.serialize_i64(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result {
        self.serialize_i64(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result {
        if v < 0 {
            self.head(NEGATIVE, (v ^ !0) as u64);
        } else {
            self.head(POSITIVE, v as u64);
        }
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result {
        let (negative, raw) = if v < 0 {
            (true, (v ^ !0) as u128)
        } else {
            (false, v as u128)
        };
        match (negative, u64::try_from(raw)) {
            (false, Ok(x)) => self.head(POSITIVE, x),
            (true, Ok(x)) => self.head(NEGATIVE, x),
            (false, Err(_)) => self.bignum(BIGPOS, raw),
            (true, Err(_)) => self.bignum(BIGNEG, raw),
        }
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result {
        self.serialize_u64(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result {
        self.serialize_u64(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result {
        self.serialize_u64(v.into())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result {
        self.head(POSITIVE, v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result {
        match u64::try_from(v) {
            Ok(x) => self.head(POSITIVE, x),
            Err(_) => self.bignum(BIGPOS, v),
        }
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result {
        self.serialize_f64(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result {
        // The shortest precision that gives back the same bits.
        let half = half::f16::from_f64(v);
        let single = v as f32;
        if half.to_f64().to_bits() == v.to_bits() {
            self.out.push(0xf9);
            self.out.extend_from_slice(&half.to_bits().to_be_bytes());
        } else if f64::from(single).to_bits() == v.to_bits() {
            self.out.push(0xfa);
            self.out.extend_from_slice(&single.to_bits().to_be_bytes());
        } else {
            self.out.push(0xfb);
            self.out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.text(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result {
        self.text(v);
        Ok(())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result {
        self.head(BYTES, v.len() as u64);
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_none(self) -> Result {
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result {
        self.serialize_none()
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result {
        self.serialize_none()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result {
        self.text(variant);
        Ok(())
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        // ciborium's untagged case of its tag types: the value alone.
        if name != TAG_ENUM || variant != UNTAGGED {
            self.head(MAP, 1);
            self.text(variant);
        }
        value.serialize(self)
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq> {
        match len {
            Some(n) => self.head(ARRAY, n as u64),
            None => self.out.push(INDEFINITE_ARRAY),
        }
        Ok(collection(self, len.is_none()))
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        if name == TAG_ENUM && variant == TAGGED {
            // ciborium's tagged value: the tag number, then the value.
            let mut c = collection(self, false);
            c.tag = true;
            return Ok(c);
        }
        self.head(MAP, 1);
        self.text(variant);
        self.head(ARRAY, len as u64);
        Ok(collection(self, false))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap> {
        match len {
            Some(n) => self.head(MAP, n as u64),
            None => self.out.push(INDEFINITE_MAP),
        }
        Ok(collection(self, len.is_none()))
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self::SerializeStruct> {
        self.head(MAP, len as u64);
        Ok(collection(self, false))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        self.head(MAP, 1);
        self.text(variant);
        self.head(MAP, len as u64);
        Ok(collection(self, false))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The items of an array, the entries of a map or the fields of a struct;
/// `ending` when the length was not known up front (a break ends it), `tag`
/// while a tagged value's tag number is still to come.
struct Collection<'a, 'b> {
    enc: &'a mut VecEncoder<'b>,
    ending: bool,
    tag: bool,
}

impl Collection<'_, '_> {
    #[inline]
    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        value.serialize(&mut *self.enc)
    }

    #[inline]
    fn finish(self) -> Result {
        if self.ending {
            self.enc.out.push(BREAK);
        }
        Ok(())
    }
}

/// The collections whose items are values alone.
macro_rules! items {
    ($($trait:ident :: $method:ident;)*) => {
        $(impl ser::$trait for Collection<'_, '_> {
            type Ok = ();
            type Error = Refused;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
                self.item(value)
            }

            fn end(self) -> Result {
                self.finish()
            }
        })*
    };
}

items! {
    SerializeSeq::serialize_element;
    SerializeTuple::serialize_element;
    SerializeTupleStruct::serialize_field;
}

impl ser::SerializeTupleVariant for Collection<'_, '_> {
    type Ok = ();
    type Error = Refused;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        if !self.tag {
            return self.item(value);
        }
        self.tag = false;
        match value.serialize(TagNumber) {
            Ok(tag) => {
                self.enc.head(TAG, tag);
                Ok(())
            }
            Err(_) => not_a_tag(),
        }
    }

    fn end(self) -> Result {
        self.finish()
    }
}

impl ser::SerializeMap for Collection<'_, '_> {
    type Ok = ();
    type Error = Refused;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result {
        self.item(key)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result {
        self.item(value)
    }

    fn end(self) -> Result {
        self.finish()
    }
}

impl ser::SerializeStruct for Collection<'_, '_> {
    type Ok = ();
    type Error = Refused;

    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        self.enc.text(key);
        self.item(value)
    }

    #[inline]
    fn end(self) -> Result {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Collection<'_, '_> {
    type Ok = ();
    type Error = Refused;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result {
        self.enc.text(key);
        self.item(value)
    }

    fn end(self) -> Result {
        self.finish()
    }
}

/// Reads a tagged value's tag number: an unsigned integer, nothing else
/// (as ciborium's own tag serializer).
struct TagNumber;

/// What a tag number that is not an unsigned integer gets, as from
/// ciborium.
fn not_a_tag<T>() -> Result<T> {
    Err(Refused("expected tag".into()))
}

/// Everything but an unsigned integer is refused.
macro_rules! not_a_tag {
    ($($name:ident($($arg:ty),*);)*) => {
        $(fn $name(self, $(_: $arg),*) -> Result<u64> {
            not_a_tag()
        })*
    };
}

impl ser::Serializer for TagNumber {
    type Ok = u64;
    type Error = Refused;
    type SerializeSeq = Impossible<u64, Refused>;
    type SerializeTuple = Impossible<u64, Refused>;
    type SerializeTupleStruct = Impossible<u64, Refused>;
    type SerializeTupleVariant = Impossible<u64, Refused>;
    type SerializeMap = Impossible<u64, Refused>;
    type SerializeStruct = Impossible<u64, Refused>;
    type SerializeStructVariant = Impossible<u64, Refused>;

    fn serialize_u8(self, v: u8) -> Result<u64> {
        Ok(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<u64> {
        Ok(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<u64> {
        Ok(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<u64> {
        Ok(v)
    }

    not_a_tag! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u128(u128);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
        serialize_unit_variant(&'static str, u32, &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<u64> {
        not_a_tag()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<u64> {
        not_a_tag()
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<u64> {
        not_a_tag()
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq> {
        not_a_tag()
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple> {
        not_a_tag()
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        not_a_tag()
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        not_a_tag()
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap> {
        not_a_tag()
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct> {
        not_a_tag()
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant> {
        not_a_tag()
    }
}

#[cfg(test)]
mod tests {
    //! Byte for byte what ciborium writes: random values (tags, bignums
    //! and every float precision among them) and typed structs.

    use std::collections::BTreeMap;

    use ciborium::value::Value;
    use proptest::prelude::*;

    use super::super::strategies::{float, value};
    use serde::Serialize;

    fn ciborium<T: Serialize + ?Sized>(v: &T) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn ours<T: Serialize + ?Sized>(v: &T) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        super::encode_into(v, &mut out).map_err(|e| e.0)?;
        Ok(out)
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(v: &T) {
        match (ours(v), ciborium(v)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{v:?}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{v:?}: ours {a:?}, ciborium {b:?}"),
        }
    }

    #[derive(Serialize, Debug)]
    enum Shape {
        Unit,
        Newtype(i64),
        Tuple(u8, String, Option<bool>),
        Struct { a: i16, b: Vec<Shape> },
    }

    #[derive(Serialize, Debug)]
    struct Typed {
        id: u64,
        small: (u8, i8, u16, i32, i64),
        wide: (u128, i128),
        floats: (f32, f64),
        c: char,
        name: String,
        #[serde(with = "serde_bytes_like")]
        bytes: Vec<u8>,
        seq: Vec<u8>,
        map: BTreeMap<String, i64>,
        opt: Option<Box<Shape>>,
        unit: (),
        tagged: ciborium::tag::Required<u64, 55>,
        captured: ciborium::tag::Captured<String>,
    }

    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }

    /// A sequence whose length is not known up front.
    struct Unsized(Vec<u16>);

    impl Serialize for Unsized {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().filter(|_| true))
        }
    }

    impl std::fmt::Debug for Unsized {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fmt(f)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn values_encode_as_ciborium_encodes_them(v in value()) {
            same(&v);
        }

        #[test]
        fn typed_values_encode_as_ciborium_encodes_them(
            id: u64,
            small: (u8, i8, u16, i32, i64),
            wide: (u128, i128),
            f: f32,
            g in float(),
            c: char,
            name in ".{0,300}",
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            map in proptest::collection::btree_map(".{0,4}", any::<i64>(), 0..4),
            tag in proptest::option::of(any::<u64>()),
            unsized_seq in proptest::collection::vec(any::<u16>(), 0..30),
        ) {
            let v = Typed {
                id,
                small,
                wide,
                floats: (f, g),
                c,
                name: name.clone(),
                seq: bytes.clone(),
                bytes,
                map,
                opt: Some(Box::new(Shape::Struct {
                    a: small.2 as i16,
                    b: vec![Shape::Unit, Shape::Newtype(small.4), Shape::Tuple(small.0, name.clone(), None)],
                })),
                unit: (),
                tagged: ciborium::tag::Required(id),
                captured: ciborium::tag::Captured(tag, name),
            };
            same(&v);
            same(&Unsized(unsized_seq));
            same(&wide.0);
            same(&wide.1);
        }
    }

    #[test]
    fn edges_encode_as_ciborium_encodes_them() {
        for n in [
            0u64,
            23,
            24,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX,
        ] {
            same(&n);
            same(&(n as i64));
            same(&(-(n as i128) - 1));
            same(&(u128::from(n) << 64));
        }
        same(&i128::MIN);
        same(&u128::MAX);
        for f in [
            0.0,
            -0.0,
            1.0,
            1.5,
            65504.0,
            65505.0,
            1e-8,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NAN,
        ] {
            same(&f);
            same(&(f as f32));
        }
        same(&'é');
        same(&"x".repeat(70_000));
        same(&Value::Tag(u64::MAX, Box::new(Value::Null)));
    }

    #[test]
    fn a_refusal_is_an_error_with_its_reason() {
        struct No;
        impl Serialize for No {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("not this one"))
            }
        }
        assert_eq!(ours(&No).unwrap_err(), "not this one");
        let e = crate::codec::encode(&vec![No]).unwrap_err();
        assert!(e.to_string().contains("not this one"), "{e}");
        assert!(e.to_string().contains("No"), "{e}");
    }
}
