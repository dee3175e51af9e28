//! The `tensor_json` target: its body and invariants are `nnserve_core::fuzzing::tensor_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::tensor_json(data));
