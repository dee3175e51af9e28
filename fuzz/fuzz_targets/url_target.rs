//! The `url_target` target: its body and invariants are `nnserve_core::fuzzing::url_target`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::url_target(data));
