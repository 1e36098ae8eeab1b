//! Measures the call header's cost: the fixed binary layout Courier uses
//! against the same fields as a CBOR map via ciborium. Run with
//! `cargo bench -p courier-runtime --bench header`.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use courier_runtime::id::{Incarnation, LocalId};
use courier_runtime::wire::{encode_call, CallHeader, Envelope};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct CborHeader {
    request: u64,
    incarnation: u64,
    index: u32,
    generation: u32,
    fds: u8,
    type_name: String,
    #[serde(with = "serde_bytes_compat")]
    payload: Vec<u8>,
}

mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: ciborium::value::Value = Deserialize::deserialize(d)?;
        v.into_bytes()
            .map_err(|_| serde::de::Error::custom("expected bytes"))
    }
}

fn time(label: &str, iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    println!("{label:<40} {ns:>8.1} ns");
    ns
}

fn main() {
    let iters = 1_000_000;
    let payload = [7u8; 64];
    let header = CallHeader {
        request: 42,
        incarnation: Incarnation(0x1234_5678),
        target: LocalId {
            index: 17,
            generation: 3,
        },
        fds: 0,
    };
    let fixed = time("fixed header: encode + decode", iters, || {
        let mut out = BytesMut::with_capacity(128);
        encode_call(&mut out, black_box(&header), "counter.add", &[], &payload);
        let f: Bytes = out.freeze();
        let Ok(Envelope::Call(c)) = Envelope::decode(&f) else {
            panic!()
        };
        black_box(c.header.target);
    });
    let cbor = time("CBOR header (ciborium): encode + decode", iters, || {
        let h = CborHeader {
            request: 42,
            incarnation: 0x1234_5678,
            index: 17,
            generation: 3,
            fds: 0,
            type_name: "counter.add".into(),
            payload: payload.to_vec(),
        };
        let mut out = Vec::with_capacity(128);
        ciborium::into_writer(black_box(&h), &mut out).unwrap();
        let back: CborHeader = ciborium::from_reader(&out[..]).unwrap();
        black_box(back.index);
    });
    println!("ratio CBOR / fixed: {:.1}x", cbor / fixed);
}
