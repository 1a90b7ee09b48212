//! Fuzz target: see `checks::config_toml`. Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run config_toml` from `fuzz/`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_toml(data));
