//! The `tfserving_grpc` target: its body and invariants are `nnserve_core::fuzzing::tfserving_grpc`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::tfserving_grpc(data));
