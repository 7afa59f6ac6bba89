//! Fuzzes the upgrade checks on an HTTP head (RFC 6455 head check, Origin policy, token
//! lookup in header, cookie and query, JWT check); the properties are in
//! `ws_adapter::fuzzing::upgrade`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ws_adapter::fuzzing::upgrade(data));
