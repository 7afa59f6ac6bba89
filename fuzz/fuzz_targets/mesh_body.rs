//! Fuzzes the mesh body decoder (Python-dialect JSON from RabbitMQ deliveries), as the AMQP
//! adapter uses it (into a `Value`) and into the typed bodies: never a panic, and what
//! decodes re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nuropb_wire::mesh::{EventBody, ResponseBody};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = from_python_json::<Value>(data) {
        let encoded = to_python_json(&value).expect("a decoded value encodes");
        let again: Value = from_python_json(&encoded).expect("what we encode decodes");
        assert_eq!(again, value);
    }
    let _ = from_python_json::<ResponseBody>(data);
    let _ = from_python_json::<EventBody>(data);
});
