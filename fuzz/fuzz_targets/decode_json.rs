//! Fuzz target: see `checks::decode_json`. Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run decode_json` from `fuzz/`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::decode_json(data));
