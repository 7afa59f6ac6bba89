//! What both client-frame targets check, for one encoding: any bytes give a message or a
//! `ClientFrameError`, never a panic, and an accepted call stays within the decoded-cost
//! bound, under the default limits and under small ones (so the fuzzer reaches the
//! refusals with short inputs too). The fast path for plain calls gives exactly what the
//! general decoder gives.

use nuropb_wire::client::{
    ClientLimits, ClientMessage, Encoding, decode_client_frame, decode_client_frame_general,
    decode_client_message,
};

pub fn check(data: &[u8], encoding: Encoding) {
    let small = ClientLimits {
        max_decoded_values: 64,
        max_decoded_bytes: 16 * 1024,
        ..ClientLimits::default()
    };
    for limits in [ClientLimits::default(), small] {
        assert_eq!(
            decode_client_frame(data, encoding, &limits),
            decode_client_frame_general(data, encoding, &limits)
        );
        if let Ok(ClientMessage::Request(call) | ClientMessage::Command(call)) =
            decode_client_message(data, encoding, &limits)
        {
            let params = nuropb_wire::client::estimated_object_size(&call.params);
            assert!(params <= limits.max_decoded_bytes, "{params} > {}", limits.max_decoded_bytes);
        }
    }
}
