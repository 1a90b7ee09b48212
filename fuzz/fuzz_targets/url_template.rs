//! Fuzz target: see `checks::url_template`. Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run url_template` from `fuzz/`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::url_template(data));
