//! Serde helpers for reading what foreign peers send leniently: a field of the wrong type
//! reads as its default instead of failing the whole body, as nuropb's own dictionary
//! lookups would let it through. Only for decoding; encoding is unaffected.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `deserialize_with` for a field that reads as `T::default()` when it has another type
/// (use with `#[serde(default)]`, so that a missing field reads as the default too).
///
/// The value is buffered as JSON first: serde cannot back out of a half-read value.
pub fn or_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = Value::deserialize(deserializer)?;
    Ok(T::deserialize(value).unwrap_or_default())
}

/// A value read with [`or_default`], for places a field attribute cannot reach (the
/// values of a map, the items of a list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrDefault<T>(pub T);

impl<'de, T: DeserializeOwned + Default> Deserialize<'de> for OrDefault<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        or_default(deserializer).map(OrDefault)
    }
}

/// A field a receiver answers differently when it is absent (or `null`), of its type, or
/// of another type. Use with `#[serde(default)]` (absent reads as [`Field::Absent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Field<T> {
    /// The field is absent or `null`.
    #[default]
    Absent,
    /// The field has the expected type.
    Valid(T),
    /// The field is present with another type.
    Invalid,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(deserializer)? {
            Value::Null => Field::Absent,
            value => T::deserialize(value).map_or(Field::Invalid, Field::Valid),
        })
    }
}

/// `deserialize_with` for a text field that takes any scalar: a string as it is, `null`
/// as `""`, anything else as its JSON text (so `3` reads as `"3"`).
pub fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Probe {
        #[serde(default, deserialize_with = "or_default")]
        flag: bool,
        #[serde(default, deserialize_with = "text")]
        name: String,
        #[serde(default)]
        list: Vec<OrDefault<u8>>,
        #[serde(default)]
        field: Field<String>,
    }

    #[test]
    fn wrong_types_read_as_defaults() {
        let check = |v: Value, flag: bool, name: &str, list: &[u8]| {
            let probe: Probe = serde_json::from_value(v.clone()).expect("decodes");
            let got: Vec<u8> = probe.list.into_iter().map(|OrDefault(n)| n).collect();
            assert_eq!(
                (probe.flag, probe.name.as_str(), got.as_slice()),
                (flag, name, list),
                "{v}"
            );
        };
        check(json!({}), false, "", &[]);
        check(json!({"flag": true, "name": "n", "list": [1, 2]}), true, "n", &[1, 2]);
        check(json!({"flag": "yes", "name": 3, "list": [1, "x"]}), false, "3", &[1, 0]);
        check(json!({"flag": null, "name": null}), false, "", &[]);
    }

    #[test]
    fn fields_tell_absent_from_invalid() {
        let check = |v: Value, expected: Field<String>| {
            let probe: Probe = serde_json::from_value(v.clone()).expect("decodes");
            assert_eq!(probe.field, expected, "{v}");
        };
        check(json!({}), Field::Absent);
        check(json!({"field": null}), Field::Absent);
        check(json!({"field": "x"}), Field::Valid("x".into()));
        check(json!({"field": 1}), Field::Invalid);
    }
}
