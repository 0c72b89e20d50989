#![no_main]
//! See `engine::fuzzcheck::tls` for the input layout and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzcheck::tls(data));
