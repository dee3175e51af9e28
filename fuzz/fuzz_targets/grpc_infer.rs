//! The `grpc_infer` target: its body and invariants are `nnserve_core::fuzzing::grpc_infer`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::grpc_infer(data));
