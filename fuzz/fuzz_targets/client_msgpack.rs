//! Fuzzes the client frame decoder on binary frames (MessagePack); the checks are in
//! `client_frames.rs`.
#![no_main]

#[path = "client_frames.rs"]
mod client_frames;

use libfuzzer_sys::fuzz_target;
use nuropb_wire::client::Encoding;

fuzz_target!(|data: &[u8]| client_frames::check(data, Encoding::MessagePack));
