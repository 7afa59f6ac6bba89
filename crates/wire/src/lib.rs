//! Wire types: the NuroPb mesh messages (`mesh`), the gateway-to-gateway control payload
//! (`control`), the gateway's client protocol (`client`), the JSON dialects both sides
//! speak (`pyjson`) and serde helpers for lenient decoding (`lenient`). Pure data and codecs, no I/O.

#![warn(unreachable_pub)]

pub mod client;
pub mod control;
mod decoded;
pub mod lenient;
pub mod mesh;
pub mod pyjson;

pub use mesh::{ErrorObject, JsonObject};
