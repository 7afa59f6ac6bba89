//! Fuzzes the client frame decoder on text frames (JSON): any bytes give a message or a
//! `ClientFrameError`, never a panic, and the decoded-cost bounds hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nuropb_wire::client::{ClientLimits, ClientMessage, Encoding, decode_client_message};

fuzz_target!(|data: &[u8]| {
    // Small bounds, so the fuzzer reaches the refusals with short inputs too.
    let limits = ClientLimits {
        max_decoded_values: 64,
        max_decoded_bytes: 16 * 1024,
        ..ClientLimits::default()
    };
    for limits in [ClientLimits::default(), limits] {
        if let Ok(ClientMessage::Request(call) | ClientMessage::Command(call)) =
            decode_client_message(data, Encoding::Json, &limits)
        {
            // An accepted call's params are within what the frame was allowed to cost.
            let params = nuropb_wire::client::estimated_object_size(&call.params);
            assert!(params <= limits.max_decoded_bytes, "{params} > {}", limits.max_decoded_bytes);
        }
    }
});
