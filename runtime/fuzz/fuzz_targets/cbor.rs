//! Fuzz target `cbor`: see `courier_runtime::fuzzing::cbor` for what it drives
//! and which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_runtime::fuzzing::cbor(data));
