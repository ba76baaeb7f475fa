//! Request decoding with the rules of Go's `encoding/json`, which the Go
//! Garden server uses and clients rely on.
//!
//! - Struct keys match case-insensitively (`{"Kill":true}` sets `kill`); an
//!   exact match wins. Keys of maps such as `properties` are user data and
//!   are kept as they are.
//! - Unknown keys are ignored and `null` leaves a field at its default.
//! - Only the first JSON value of a body is read; what follows is ignored.
//! - Invalid UTF-8 becomes U+FFFD instead of failing.
//! - An empty body fails with `EOF` and a truncated one with
//!   `unexpected EOF`, the texts the Go server returns.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::{Map, Value};

/// A request body that could not be decoded. The message is what the client
/// sees in the error envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub message: String,
}

impl DecodeError {
    fn new(message: impl Into<String>) -> Self {
        DecodeError { message: message.into() }
    }
}

/// Decodes the first JSON value of `body` into `T` with Go's rules.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        return Err(DecodeError::new("EOF"));
    }
    let mut values = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => decode_value(value),
        Some(Err(error)) if error.is_eof() => Err(DecodeError::new("unexpected EOF")),
        Some(Err(error)) => Err(DecodeError::new(error.to_string())),
        None => Err(DecodeError::new("EOF")),
    }
}

/// Decodes an already parsed JSON value into `T` with Go's key matching.
pub fn decode_value<T: DeserializeOwned>(value: Value) -> Result<T, DecodeError> {
    T::deserialize(Folded(value)).map_err(|error| DecodeError::new(error.to_string()))
}

/// Parses the first complete JSON value at the start of `buffer`.
///
/// Returns the value and the number of bytes it used, including any leading
/// white space, or `None` when the buffer holds only white space or a value
/// that is not complete yet. Used for the message streams of hijacked
/// connections, where values arrive back to back or split across reads.
pub fn parse_stream_value(buffer: &[u8]) -> Result<Option<(Value, usize)>, DecodeError> {
    let mut values = serde_json::Deserializer::from_slice(buffer).into_iter::<Value>();
    match values.next() {
        Some(Ok(value)) => Ok(Some((value, values.byte_offset()))),
        Some(Err(error)) if error.is_eof() => Ok(None),
        Some(Err(error)) if error.classify() == serde_json::error::Category::Syntax
            && std::str::from_utf8(buffer).is_err() =>
        {
            // Invalid UTF-8 inside a string: retry on a lossy copy so the
            // bytes become U+FFFD as Go does. The consumed length is then
            // measured on the original buffer by re-encoding the prefix.
            parse_lossy_stream_value(buffer)
        }
        Some(Err(error)) => Err(DecodeError::new(error.to_string())),
        None => Ok(None),
    }
}

fn parse_lossy_stream_value(buffer: &[u8]) -> Result<Option<(Value, usize)>, DecodeError> {
    // Find the end of the first value on the raw bytes: a JSON value's
    // structure is ASCII, so scanning bytes while tracking strings and depth
    // finds where it ends without decoding UTF-8.
    let Some(end) = find_value_end(buffer) else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&buffer[..end]);
    let value: Value = serde_json::from_str(&text).map_err(|error| DecodeError::new(error.to_string()))?;
    Ok(Some((value, end)))
}

/// Returns the end offset of the first object or array in `buffer`, or `None`
/// when it is incomplete. Values other than objects and arrays are not
/// messages on a process connection and end at the first white space.
fn find_value_end(buffer: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut started = false;
    for (index, &byte) in buffer.iter().enumerate() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                started = true;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if started && depth == 0 {
                    return Some(index + 1);
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' if started && depth == 0 => return Some(index),
            _ => started = true,
        }
    }
    None
}

/// A JSON value whose struct keys are matched to field names the way Go
/// matches them.
struct Folded(Value);

/// Renames each key of `object` that matches a field only when letter case
/// is ignored to that field's exact name. An exact key wins over a folded
/// one for the same field.
fn fold_keys(object: Map<String, Value>, fields: &'static [&'static str]) -> Vec<(String, Value)> {
    let mut exact = Vec::new();
    let mut folded: Vec<(String, Value)> = Vec::new();
    for (key, value) in object {
        if fields.contains(&key.as_str()) {
            exact.push((key, value));
        } else if let Some(field) = fields.iter().find(|field| keys_match(field, &key)) {
            folded.push((field.to_string(), value));
        } else {
            exact.push((key, value));
        }
    }
    folded.retain(|(field, _)| !exact.iter().any(|(key, _)| key == field));
    exact.extend(folded);
    exact
}

fn keys_match(field: &str, key: &str) -> bool {
    field.len() == key.len() && field.eq_ignore_ascii_case(key)
        || field.to_lowercase() == key.to_lowercase()
}

struct FoldedMap {
    entries: std::vec::IntoIter<(String, Value)>,
    pending: Option<Value>,
}

impl<'de> MapAccess<'de> for FoldedMap {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.pending = Some(value);
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let value = self.pending.take().ok_or_else(|| de::Error::custom("value requested before key"))?;
        seed.deserialize(Folded(value))
    }
}

struct FoldedSeq {
    items: std::vec::IntoIter<Value>,
}

impl<'de> SeqAccess<'de> for FoldedSeq {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Self::Error> {
        match self.items.next() {
            Some(item) => seed.deserialize(Folded(item)).map(Some),
            None => Ok(None),
        }
    }
}

fn visit_object<'de, V: Visitor<'de>>(
    object: Map<String, Value>,
    fields: Option<&'static [&'static str]>,
    visitor: V,
) -> Result<V::Value, serde_json::Error> {
    let entries = match fields {
        Some(fields) => fold_keys(object, fields),
        None => object.into_iter().collect(),
    };
    visitor.visit_map(FoldedMap { entries: entries.into_iter(), pending: None })
}

macro_rules! forward_to_value {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.0.$method(visitor)
            }
        )*
    };
}

/// Scalars for which Go's decoder turns `null` into the zero value.
macro_rules! null_as_zero {
    ($($method:ident => $visit:ident($zero:expr),)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                match self.0 {
                    Value::Null => visitor.$visit($zero),
                    other => other.$method(visitor),
                }
            }
        )*
    };
}

impl<'de> Deserializer<'de> for Folded {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(object) => visit_object(object, None, visitor),
            Value::Array(items) => visitor.visit_seq(FoldedSeq { items: items.into_iter() }),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(Folded(other)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(object) => visit_object(object, Some(fields), visitor),
            Value::Null => visit_object(Map::new(), Some(fields), visitor),
            other => other.deserialize_struct(name, fields, visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(object) => visit_object(object, None, visitor),
            Value::Null => visit_object(Map::new(), None, visitor),
            other => other.deserialize_map(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(FoldedSeq { items: items.into_iter() }),
            Value::Null => visitor.visit_seq(FoldedSeq { items: Vec::new().into_iter() }),
            other => other.deserialize_seq(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    null_as_zero! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(0),
        deserialize_i16 => visit_i16(0),
        deserialize_i32 => visit_i32(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u8(0),
        deserialize_u16 => visit_u16(0),
        deserialize_u32 => visit_u32(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f32(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
    }

    forward_to_value! {
        deserialize_char deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_identifier deserialize_ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContainerSpec, Nanoseconds, ProcessPayload, StopRequest};

    #[test]
    fn empty_body_is_eof() {
        assert_eq!(decode::<ContainerSpec>(b"").unwrap_err().message, "EOF");
        assert_eq!(decode::<ContainerSpec>(b"  \n").unwrap_err().message, "EOF");
    }

    #[test]
    fn truncated_body_is_unexpected_eof() {
        assert_eq!(decode::<ContainerSpec>(b"{\"handle\":\"a").unwrap_err().message, "unexpected EOF");
    }

    #[test]
    fn keys_match_case_insensitively() {
        let stop: StopRequest = decode(b"{\"Kill\":true}").unwrap();
        assert!(stop.kill);
        let spec: ContainerSpec = decode(b"{\"HANDLE\":\"x\",\"Grace_Time\":5}").unwrap();
        assert_eq!(spec.handle, "x");
        assert_eq!(spec.grace_time, 5);
    }

    #[test]
    fn exact_key_wins_over_folded_key() {
        let stop: StopRequest = decode(b"{\"kill\":true,\"KILL\":false}").unwrap();
        assert!(stop.kill);
    }

    #[test]
    fn property_keys_keep_their_case() {
        let spec: ContainerSpec = decode(b"{\"properties\":{\"Team\":\"red\"}}").unwrap();
        assert_eq!(spec.properties.get("Team").map(String::as_str), Some("red"));
    }

    #[test]
    fn null_fields_become_defaults() {
        let spec: ContainerSpec = decode(b"{\"limits\":null,\"image\":null,\"handle\":null,\"env\":null}").unwrap();
        assert_eq!(spec, ContainerSpec::default());
        let spec: ContainerSpec = decode(b"null").unwrap();
        assert_eq!(spec, ContainerSpec::default());
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let spec: ContainerSpec = decode(b"{\"future_field\":1,\"handle\":\"h\"}").unwrap();
        assert_eq!(spec.handle, "h");
    }

    #[test]
    fn trailing_data_is_ignored() {
        let spec: ContainerSpec = decode(b"{\"handle\":\"h\"} garbage").unwrap();
        assert_eq!(spec.handle, "h");
    }

    #[test]
    fn type_errors_are_rejected() {
        assert!(decode::<Nanoseconds>(b"\"1s\"").is_err());
        assert!(decode::<ContainerSpec>(b"{\"grace_time\":1.5}").is_err());
        assert!(decode::<ContainerSpec>(b"{\"grace_time\":1e9}").is_err());
        assert!(decode::<ContainerSpec>(b"{\"privileged\":\"yes\"}").is_err());
        assert!(decode::<crate::api::WindowSize>(b"{\"rows\":70000}").is_err());
        assert!(decode::<crate::api::Limits>(b"{\"memory_limits\":{\"limit_in_bytes\":-1}}").is_err());
    }

    #[test]
    fn bare_integer_decodes_as_duration() {
        assert_eq!(decode::<Nanoseconds>(b"30000000000").unwrap(), 30_000_000_000);
        assert_eq!(decode::<Nanoseconds>(b"null").unwrap(), 0);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_character() {
        let spec: ContainerSpec = decode(b"{\"handle\":\"a\xffb\"}").unwrap();
        assert_eq!(spec.handle, "a\u{fffd}b");
    }

    #[test]
    fn invalid_ip_in_net_out_rule_is_rejected() {
        let error = decode::<crate::api::NetOutRule>(b"{\"networks\":[{\"start\":\"not-an-ip\"}]}").unwrap_err();
        assert!(error.message.contains("not-an-ip"), "{}", error.message);
    }

    #[test]
    fn stream_values_arrive_back_to_back_and_split() {
        let buffer = b"{\"source\":0,\"data\":\"ab\"}{\"source\":0}\n{\"sig";
        let (first, used) = parse_stream_value(buffer).unwrap().unwrap();
        let first: ProcessPayload = decode_value(first).unwrap();
        assert_eq!(first.data.as_deref(), Some("ab"));
        let (second, used_second) = parse_stream_value(&buffer[used..]).unwrap().unwrap();
        let second: ProcessPayload = decode_value(second).unwrap();
        assert_eq!(second.source, Some(0));
        assert_eq!(second.data, None);
        assert!(parse_stream_value(&buffer[used + used_second..]).unwrap().is_none());
        assert!(parse_stream_value(b"  \n").unwrap().is_none());
    }

    #[test]
    fn stream_value_with_invalid_utf8_is_replaced() {
        let buffer = b"{\"source\":0,\"data\":\"a\xffb\"}\n{}";
        let (value, used) = parse_stream_value(buffer).unwrap().unwrap();
        let payload: ProcessPayload = decode_value(value).unwrap();
        assert_eq!(payload.data.as_deref(), Some("a\u{fffd}b"));
        assert_eq!(&buffer[used..], b"\n{}");
    }

    #[test]
    fn stream_value_syntax_error_is_reported() {
        assert!(parse_stream_value(b"}{").is_err());
    }
}
