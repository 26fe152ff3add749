//! Decoding of call parameters into the proto request types, naming the
//! offending parameter on failure (`org.varlink.service.InvalidParameter`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A parameter that is missing, malformed or out of range, by wire name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParameter(pub String);

impl InvalidParameter {
    /// Names `parameter` as the culprit.
    pub fn new(parameter: &str) -> Self {
        Self(parameter.to_owned())
    }
}

/// Decodes `parameters` (absent or `null` means `{}`) into `T`.
pub fn decode<T: DeserializeOwned>(parameters: Option<&Value>) -> Result<T, InvalidParameter> {
    let empty = Value::Object(Map::new());
    let value = match parameters {
        None | Some(Value::Null) => &empty,
        Some(value @ Value::Object(_)) => value,
        Some(_) => return Err(InvalidParameter::new("parameters")),
    };
    match T::deserialize(value) {
        Ok(decoded) => Ok(decoded),
        Err(err) => Err(InvalidParameter(blame::<T>(value, &err.to_string()))),
    }
}

/// Field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split_once('`').map(|(field, _)| field)
}

/// Finds which parameter made decoding fail. serde_json does not report the
/// path of a type error, so each key is removed in turn: the culprit is the
/// one whose removal makes decoding succeed (an optional field) or turns the
/// error into "missing field" for that key (a required field).
fn blame<T: DeserializeOwned>(value: &Value, message: &str) -> String {
    if let Some(field) = missing_field(message) {
        return field.to_owned();
    }
    if let Value::Object(map) = value {
        for key in map.keys() {
            let mut without = map.clone();
            without.remove(key);
            match T::deserialize(Value::Object(without)) {
                Ok(_) => return key.clone(),
                Err(err) if missing_field(&err.to_string()) == Some(key.as_str()) => {
                    return key.clone()
                }
                Err(_) => {}
            }
        }
    }
    "parameters".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_agent_proto::{ExecRequest, PingRequest, SetIdentityRequest};
    use serde_json::json;

    fn exec(params: Value) -> Result<ExecRequest, InvalidParameter> {
        decode(Some(&params))
    }

    #[test]
    fn absent_and_null_parameters_mean_empty_object() {
        assert_eq!(decode::<PingRequest>(None), Ok(PingRequest::default()));
        assert_eq!(
            decode::<PingRequest>(Some(&Value::Null)),
            Ok(PingRequest::default())
        );
    }

    #[test]
    fn decodes_camel_case_fields() {
        let req = exec(json!({"argv": ["ls"], "timeoutMs": 5, "maxOutputBytes": 7})).expect("ok");
        assert_eq!(req.argv, ["ls"]);
        assert_eq!(req.timeout_ms, Some(5));
        assert_eq!(req.max_output_bytes, Some(7));
    }

    #[test]
    fn ignores_unknown_fields() {
        assert!(exec(json!({"argv": ["ls"], "future": 1})).is_ok());
    }

    #[test]
    fn names_a_missing_required_parameter() {
        assert_eq!(exec(json!({"env": []})), Err(InvalidParameter::new("argv")));
    }

    #[test]
    fn names_a_required_parameter_of_the_wrong_type() {
        assert_eq!(
            exec(json!({"argv": "ls"})),
            Err(InvalidParameter::new("argv"))
        );
    }

    #[test]
    fn names_an_optional_parameter_of_the_wrong_type() {
        assert_eq!(
            exec(json!({"argv": ["ls"], "timeoutMs": "soon"})),
            Err(InvalidParameter::new("timeoutMs"))
        );
        assert_eq!(
            decode::<SetIdentityRequest>(Some(&json!({"hostname": 3}))),
            Err(InvalidParameter::new("hostname"))
        );
        assert_eq!(
            decode::<PingRequest>(Some(&json!({"nonce": -1}))),
            Err(InvalidParameter::new("nonce"))
        );
    }

    #[test]
    fn non_object_parameters_are_rejected() {
        assert_eq!(
            exec(json!(["ls"])),
            Err(InvalidParameter::new("parameters"))
        );
    }
}
