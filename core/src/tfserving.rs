//! TF Serving's REST predict body: `{"instances": [rows]}` or `{"inputs": columns}`
//! decoded into the model's named input tensors, and the answer written back as
//! `{"predictions": [rows]}` or `{"outputs": ...}`. Errors are messages for a 400 (and,
//! for an answer that cannot be written as rows, a 500); they show untrusted names
//! bounded.

use crate::bundle::{ModelSpec, TensorSpec};
use crate::codec::{tensor_from_json, write_json};
use crate::tensor::Tensor;
use serde_json::Value;

/// Decodes a predict body against the model's signature: the named inputs, and whether
/// the request used rows (`instances`), whose answer is rows too.
pub fn decode_predict(
    spec: &ModelSpec,
    body: &[u8],
) -> Result<(Vec<(String, Tensor)>, bool), String> {
    let req: Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))?;
    let Value::Object(mut req) = req else {
        return Err("the body must be a JSON object with \"instances\" or \"inputs\"".into());
    };
    match (req.remove("instances"), req.remove("inputs")) {
        (Some(instances), None) => Ok((rows_to_tensors(spec, instances)?, true)),
        (None, Some(inputs)) => Ok((columns_to_tensors(spec, inputs)?, false)),
        (Some(_), Some(_)) => {
            Err("send either \"instances\" (rows) or \"inputs\" (columns), not both".into())
        }
        (None, None) => {
            Err("the body has neither \"instances\" (rows) nor \"inputs\" (columns)".into())
        }
    }
}

/// `instances`: a list of rows; each row is the value of the only input, or an object
/// of named inputs. Rows are stacked along a new dim 0.
fn rows_to_tensors(spec: &ModelSpec, instances: Value) -> Result<Vec<(String, Tensor)>, String> {
    let Value::Array(rows) = instances else {
        return Err("\"instances\" must be a list of rows".into());
    };
    if rows.is_empty() {
        return Err("\"instances\" is empty".into());
    }
    let mut result = Vec::new();
    if !rows[0].is_object() {
        let input = only_input(spec)?;
        let t = tensor_from_json(&input.name, &Value::Array(rows), input.dtype)?;
        result.push((input.name.clone(), t));
        return Ok(result);
    }
    for input in &spec.inputs {
        let column: Vec<Value> = rows
            .iter()
            .map(|r| {
                r.get(&input.name)
                    .cloned()
                    .ok_or_else(|| format!("an instance lacks input '{}'", input.name))
            })
            .collect::<Result<_, _>>()?;
        let t = tensor_from_json(&input.name, &Value::Array(column), input.dtype)?;
        result.push((input.name.clone(), t));
    }
    if let Some(Value::Object(first)) = rows.first() {
        if let Some(unknown) = first
            .keys()
            .find(|k| !spec.inputs.iter().any(|i| &i.name == *k))
        {
            return Err(format!(
                "unknown input '{}'; the model's inputs are {:?}",
                crate::names::bounded(unknown),
                spec.inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
            ));
        }
    }
    Ok(result)
}

/// `inputs`: the value of the only input, or an object of named inputs.
fn columns_to_tensors(spec: &ModelSpec, inputs: Value) -> Result<Vec<(String, Tensor)>, String> {
    match inputs {
        Value::Object(map) => map
            .into_iter()
            .map(|(name, v)| {
                let dtype = spec
                    .inputs
                    .iter()
                    .find(|i| i.name == name)
                    .map(|i| i.dtype)
                    .ok_or_else(|| {
                        format!(
                            "unknown input '{}'; the model's inputs are {:?}",
                            crate::names::bounded(&name),
                            spec.inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
                        )
                    })?;
                let t = tensor_from_json(&name, &v, dtype)?;
                Ok((name, t))
            })
            .collect(),
        other => {
            let input = only_input(spec)?;
            let t = tensor_from_json(&input.name, &other, input.dtype)?;
            Ok(vec![(input.name.clone(), t)])
        }
    }
}

fn only_input(spec: &ModelSpec) -> Result<&TensorSpec, String> {
    match spec.inputs.as_slice() {
        [one] => Ok(one),
        many => Err(format!(
            "the model has {} inputs {:?}: give each row (or \"inputs\") as an object of named values",
            many.len(),
            many.iter().map(|i| &i.name).collect::<Vec<_>>()
        )),
    }
}

/// Rows of an output (dim 0), for the names a row-format answer repeats per row.
pub fn rows_of(t: &Tensor) -> u64 {
    t.shape.first().map_or(1, |&r| r.max(1) as u64)
}

/// `{"predictions": [...]}`: a row per instance, the bare value when the model has one
/// output, else an object of named outputs.
pub fn write_predictions(out: &mut Vec<u8>, outputs: &[(String, Tensor)]) -> Result<(), String> {
    let rows = outputs
        .first()
        .and_then(|(_, t)| t.shape.first().copied())
        .unwrap_or(0) as usize;
    if outputs
        .iter()
        .any(|(_, t)| t.shape.first().copied() != Some(rows as i64))
    {
        return Err(
            "the model's outputs do not share a batch dimension, so they cannot be returned as rows; use \"inputs\" (columns)".into(),
        );
    }
    out.extend_from_slice(b"{\"predictions\":[");
    for r in 0..rows {
        if r > 0 {
            out.push(b',');
        }
        write_value(out, outputs, Some(r));
    }
    out.extend_from_slice(b"]}");
    Ok(())
}

/// `{"outputs": value}` for one output, `{"outputs": {name: value}}` for several.
pub fn write_outputs(out: &mut Vec<u8>, outputs: &[(String, Tensor)]) {
    out.extend_from_slice(b"{\"outputs\":");
    write_value(out, outputs, None);
    out.push(b'}');
}

/// The bare value of a lone output, else an object of named outputs: row `row` of each,
/// or all of it.
fn write_value(out: &mut Vec<u8>, outputs: &[(String, Tensor)], row: Option<usize>) {
    if let [(_, t)] = outputs {
        write_json(out, t, row);
        return;
    }
    out.push(b'{');
    for (i, (name, t)) in outputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(serde_json::to_string(name).unwrap().as_bytes());
        out.push(b':');
        write_json(out, t, row);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_are_rows() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let mut out = Vec::new();
        write_predictions(&mut out, &[("y".into(), t.clone())]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"predictions":[[1.0,2.0],[3.0,4.0]]}"#
        );
        let mut out = Vec::new();
        write_predictions(&mut out, &[("a".into(), t.clone()), ("b".into(), t)]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"predictions":[{"a":[1.0,2.0],"b":[1.0,2.0]},{"a":[3.0,4.0],"b":[3.0,4.0]}]}"#
        );
    }
}
