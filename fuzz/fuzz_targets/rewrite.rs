#![no_main]
//! Every input runs through both checks: `wire::fuzzcheck::rewrite_names`
//! (byte 0 picks a Parse / Bind / Describe / Close body) and
//! `engine::fuzzcheck::rewriter` (byte 0 sizes the server's statement
//! cache, the rest is a client's frame stream).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wire::fuzzcheck::rewrite_names(data);
    engine::fuzzcheck::rewriter(data);
});
