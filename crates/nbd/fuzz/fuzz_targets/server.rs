//! The fuzz input is everything a client sends to ferry's NBD server.
#![no_main]

#[path = "../common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::serve_bytes(data);
});
