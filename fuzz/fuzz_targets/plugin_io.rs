//! The `plugin_io` target: its body and invariants are `nnserve_core::fuzzing::plugin_io`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnserve_core::fuzzing::plugin_io(data));
