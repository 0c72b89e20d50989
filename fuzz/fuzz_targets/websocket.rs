#![no_main]
//! See `wire::fuzzcheck::websocket` for the input layout and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wire::fuzzcheck::websocket(data));
