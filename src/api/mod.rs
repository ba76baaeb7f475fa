//! Garden's wire types and JSON rules, shared by the server and the client.
//!
//! This module must not depend on actix or on `crate::linux`, so that the
//! client can become a crate of its own.

mod decode;
mod types;

pub use decode::{decode, decode_value, parse_stream_value, DecodeError};
pub use types::*;

/// Serialises `value` as one JSON document followed by `\n`, as every Go peer
/// writes it.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("wire types always serialise");
    bytes.push(b'\n');
    bytes
}
