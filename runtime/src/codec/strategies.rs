//! Random CBOR values for the codec's property tests: every kind of item
//! ciborium writes, tags and bignums among them.

use ciborium::value::Value;
use proptest::prelude::*;

/// Floats of every precision ciborium writes: doubles, values exact in
/// single precision, values exact in half precision, and the specials.
pub fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        any::<f32>().prop_map(f64::from),
        any::<u16>().prop_map(|b| half::f16::from_bits(b).to_f64()),
        Just(f64::NAN),
        Just(-0.0),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
    ]
}

/// Trees of values: integers (bignums included), byte and text strings,
/// floats, booleans, null, arrays, maps and tags.
pub fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| Value::Integer(n.into())),
        any::<i64>().prop_map(|n| Value::Integer(n.into())),
        any::<i128>().prop_map(|n| Value::Integer(
            ciborium::value::Integer::try_from(n).unwrap_or(0.into())
        )),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        ".{0,12}".prop_map(Value::Text),
        float().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..6).prop_map(Value::Map),
            (any::<u64>(), inner).prop_map(|(t, v)| Value::Tag(t, Box::new(v))),
        ]
    })
}
