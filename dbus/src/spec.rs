//! `a{sv}` → [`VmSpec`]: the variant dictionary is turned into JSON and read
//! with the engine's one serde schema (camelCase keys, unknown keys refused),
//! so D-Bus accepts exactly what varlink and pool files accept. Any integer
//! type is accepted where a number is expected (`busctl` users write `u`,
//! `i` or `t` interchangeably); a wrong type or unknown key is `InvalidSpec`.

use std::collections::HashMap;

use kiln_engine::error::ErrorName;
use kiln_engine::VmSpec;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value as Json};
use zbus::zvariant::{OwnedValue, Value};

use crate::error::KilnError;

/// Decode a `CreateVM` spec dictionary.
pub fn vm_spec(dict: &HashMap<String, OwnedValue>) -> Result<VmSpec, KilnError> {
    decode(dict)
}

/// Decode an `a{sv}` into any of the engine's serde types (`PoolSpec`
/// nests the VM spec as an `a{sv}` under `vm`).
pub fn decode<T: DeserializeOwned>(dict: &HashMap<String, OwnedValue>) -> Result<T, KilnError> {
    let mut object = Map::new();
    for (key, value) in dict {
        let json = to_json(value).ok_or_else(|| {
            KilnError::new(
                ErrorName::InvalidSpec,
                format!(
                    "{key}: values of D-Bus type {} are not accepted",
                    value.value_signature()
                ),
            )
        })?;
        object.insert(key.clone(), json);
    }
    serde_json::from_value(Json::Object(object))
        .map_err(|e| KilnError::new(ErrorName::InvalidSpec, format!("invalid spec: {e}")))
}

fn to_json(value: &Value<'_>) -> Option<Json> {
    Some(match value {
        Value::Bool(b) => Json::Bool(*b),
        Value::U8(n) => Json::from(*n),
        Value::U16(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::I16(n) => Json::from(*n),
        Value::I32(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::F64(n) => Json::Number(Number::from_f64(*n)?),
        Value::Str(s) => Json::String(s.to_string()),
        Value::ObjectPath(p) => Json::String(p.to_string()),
        Value::Value(inner) => to_json(inner)?,
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect::<Option<_>>()?),
        Value::Dict(dict) => {
            let mut object = Map::new();
            for (k, v) in dict.iter() {
                let Value::Str(k) = k else { return None };
                object.insert(k.to_string(), to_json(v)?);
            }
            Json::Object(object)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use zbus::DBusError;

    fn dict(entries: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn known_keys_decode_with_any_integer_type() {
        let spec = vm_spec(&dict(vec![
            ("vcpus", Value::U32(2)),
            ("memoryMiB", Value::U64(256)),
            ("cmdline", Value::from("quiet")),
        ]))
        .unwrap();
        assert_eq!(spec.vcpus, Some(2));
        assert_eq!(spec.memory_mib, Some(256));
        assert_eq!(spec.cmdline.as_deref(), Some("quiet"));
        assert_eq!(vm_spec(&HashMap::new()).unwrap(), VmSpec::default());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_invalid_spec() {
        for bad in [
            dict(vec![("cpus", Value::U32(2))]),
            dict(vec![("vcpus", Value::from("two"))]),
            dict(vec![("memoryMiB", Value::I32(-1))]),
            dict(vec![("accel", Value::from("fast"))]),
        ] {
            let e = vm_spec(&bad).expect_err("refused");
            assert_eq!(
                e.name().as_str(),
                "io.kiln.Kiln1.Error.InvalidSpec",
                "{e:?}"
            );
        }
    }

    /// Any `a{sv}` a caller can send: a spec, or `InvalidSpec`, never a
    /// panic (the keys specs use are mixed in to get past the first field).
    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn variant() -> impl Strategy<Value = Value<'static>> {
            let leaf = prop_oneof![
                any::<bool>().prop_map(Value::from),
                any::<u8>().prop_map(Value::from),
                any::<u32>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,24}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    inner.clone().prop_map(|v| Value::Value(Box::new(v))),
                    prop::collection::vec(any::<u32>(), 0..4).prop_map(Value::from),
                    prop::collection::hash_map("[a-zA-Z]{1,10}", ".{0,8}", 0..4)
                        .prop_map(Value::from),
                    prop::collection::hash_map(key(), inner, 0..4).prop_map(|m| {
                        let m: HashMap<String, Value<'static>> = m;
                        Value::from(m)
                    }),
                ]
            })
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("vcpus".to_owned()),
                Just("memoryMiB".to_owned()),
                Just("network".to_owned()),
                Just("mode".to_owned()),
                Just("warm".to_owned()),
                Just("max".to_owned()),
                Just("vm".to_owned()),
                Just("gpus".to_owned()),
                "[a-zA-Z]{1,10}",
            ]
        }

        /// `default` cases, or `PROPTEST_CASES` when set (`make stress` raises it).
        fn cases(default: u32) -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases(3000)))]
            #[test]
            fn any_dictionary_is_a_spec_or_invalid_spec(
                entries in prop::collection::vec((key(), variant()), 0..8)
            ) {
                let dict: HashMap<String, OwnedValue> = entries
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, OwnedValue::try_from(v).ok()?)))
                    .collect();
                for result in [
                    decode::<VmSpec>(&dict).err(),
                    decode::<kiln_engine::PoolSpec>(&dict).err(),
                ]
                .into_iter()
                .flatten()
                {
                    prop_assert_eq!(result.name(), "io.kiln.Kiln1.Error.InvalidSpec");
                }
            }
        }
    }
}
