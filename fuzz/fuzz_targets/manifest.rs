//! The `manifest` target: its body and invariants are `nnserve_core::fuzzing::manifest`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::manifest(data));
