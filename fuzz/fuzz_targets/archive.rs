//! The `archive` target: its body and invariants are `nnserve_core::fuzzing::archive`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::archive(data));
