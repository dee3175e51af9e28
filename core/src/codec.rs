//! JSON and Triton-binary encodings of tensors, shared by the TF Serving and KServe
//! routes. Errors are messages for a 400 and name the tensor.

use crate::tensor::{checked_bytes, numel, DType, Tensor};
use serde_json::Value;

/// Reads a (possibly nested) JSON array of numbers as a tensor of `dtype`, inferring
/// the shape from the nesting. A scalar gives shape `[]`.
pub fn tensor_from_json(name: &str, value: &Value, dtype: DType) -> Result<Tensor, String> {
    let mut shape = Vec::new();
    let mut v = value;
    while let Value::Array(items) = v {
        shape.push(items.len() as i64);
        match items.first() {
            Some(first) => v = first,
            None => break,
        }
    }
    // The shape comes from the first element of each level, before the rest is checked:
    // only a hint, capped, so that a small ragged body cannot ask for a huge buffer.
    let hint = checked_bytes(&shape, dtype).unwrap_or(0).min(1 << 20);
    let mut data = Vec::with_capacity(hint);
    flatten(name, value, &shape, dtype, &mut data)?;
    Tensor::new(dtype, shape, data).map_err(|e| format!("input '{name}': {e}"))
}

fn flatten(
    name: &str,
    v: &Value,
    shape: &[i64],
    dtype: DType,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    match (v, shape.split_first()) {
        (Value::Array(items), Some((&n, rest))) => {
            if items.len() as i64 != n {
                return Err(format!(
                    "input '{name}' is ragged: a list has {} items where {n} were expected (all rows must have the same shape)",
                    items.len()
                ));
            }
            for item in items {
                flatten(name, item, rest, dtype, out)?;
            }
            Ok(())
        }
        (Value::Array(_), None) => Err(format!(
            "input '{name}' is ragged: a list appears where a number was expected"
        )),
        (_, Some(_)) => Err(format!(
            "input '{name}' is ragged: a number appears where a list was expected"
        )),
        (scalar, None) => push_scalar(name, scalar, dtype, out),
    }
}

/// Appends one JSON scalar as an element of `dtype`.
pub fn push_scalar(name: &str, v: &Value, dtype: DType, out: &mut Vec<u8>) -> Result<(), String> {
    let bad = || {
        let v = crate::names::bounded(&v.to_string());
        format!("input '{name}' holds {v} where a {dtype} value was expected")
    };
    if dtype == DType::Bool {
        let b = match v {
            Value::Bool(b) => *b,
            Value::Number(n) if n.as_f64() == Some(0.0) => false,
            Value::Number(n) if n.as_f64() == Some(1.0) => true,
            _ => return Err(bad()),
        };
        out.push(b as u8);
        return Ok(());
    }
    let Value::Number(n) = v else {
        return Err(bad());
    };
    let is_float = matches!(dtype, DType::Fp16 | DType::Bf16 | DType::Fp32 | DType::Fp64);
    if is_float {
        let f = n.as_f64().ok_or_else(bad)?;
        match dtype {
            DType::Fp16 => out.extend_from_slice(&half::f16::from_f64(f).to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(f).to_le_bytes()),
            DType::Fp32 => out.extend_from_slice(&(f as f32).to_le_bytes()),
            _ => out.extend_from_slice(&f.to_le_bytes()),
        }
        return Ok(());
    }
    let i = n.as_i64().ok_or_else(|| {
        format!("input '{name}' holds {v} where an integer ({dtype}) was expected")
    })?;
    let range = || format!("input '{name}' holds {i}, out of range for {dtype}");
    match dtype {
        DType::Uint8 => out.push(u8::try_from(i).map_err(|_| range())?),
        DType::Int8 => out.push(i8::try_from(i).map_err(|_| range())? as u8),
        DType::Int16 => {
            out.extend_from_slice(&i16::try_from(i).map_err(|_| range())?.to_le_bytes())
        }
        DType::Int32 => {
            out.extend_from_slice(&i32::try_from(i).map_err(|_| range())?.to_le_bytes())
        }
        _ => out.extend_from_slice(&i.to_le_bytes()),
    }
    Ok(())
}

/// Writes a tensor as nested JSON arrays; `row` selects one index of dim 0.
pub fn write_json(out: &mut Vec<u8>, t: &Tensor, row: Option<usize>) {
    let size = t.dtype.size();
    let (shape, start) = match row {
        Some(r) => {
            let inner = &t.shape[1..];
            (inner, r * numel(inner))
        }
        None => (&t.shape[..], 0),
    };
    let mut index = start;
    write_level(out, t, shape, size, &mut index);
}

/// The most bytes `t` can take written as JSON, nested or flat: every element at its
/// dtype's widest text (an f32 as `-1.1754944e-38`), a comma each, and the brackets.
/// Answers are checked against `max_response_bytes` with it before they are built.
pub fn json_bound(t: &Tensor) -> u64 {
    let width: u64 = match t.dtype {
        DType::Bool => 5,
        DType::Uint8 => 3,
        DType::Int8 => 4,
        DType::Int16 => 6,
        DType::Int32 => 11,
        DType::Int64 => 20,
        DType::Fp16 | DType::Bf16 | DType::Fp32 => 15,
        DType::Fp64 => 24,
    };
    let (mut arrays, mut outer) = (0u64, 1u64);
    for &d in &t.shape {
        arrays = arrays.saturating_add(outer);
        outer = outer.saturating_mul(d.max(0) as u64);
    }
    // At least one pair of brackets: the flat form of a scalar (shape []) is `[x]`
    // (found by the tensor_json fuzz target: a bound of 6 for `[false]`).
    (t.numel() as u64)
        .saturating_mul(width + 1)
        .saturating_add(arrays.max(1).saturating_mul(2))
}

/// Writes a flat JSON array of all elements (KServe v2's `data`).
pub fn write_flat_json(out: &mut Vec<u8>, t: &Tensor) {
    out.push(b'[');
    for i in 0..t.numel() {
        if i > 0 {
            out.push(b',');
        }
        write_element(out, t, i * t.dtype.size());
    }
    out.push(b']');
}

fn write_level(out: &mut Vec<u8>, t: &Tensor, shape: &[i64], size: usize, index: &mut usize) {
    match shape.split_first() {
        None => {
            write_element(out, t, *index * size);
            *index += 1;
        }
        Some((&n, rest)) => {
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_level(out, t, rest, size, index);
            }
            out.push(b']');
        }
    }
}

fn write_element(out: &mut Vec<u8>, t: &Tensor, at: usize) {
    let d = &t.data[at..];
    let mut ibuf = itoa::Buffer::new();
    let mut fbuf = ryu::Buffer::new();
    let s: &str = match t.dtype {
        DType::Bool => {
            if d[0] != 0 {
                "true"
            } else {
                "false"
            }
        }
        DType::Uint8 => ibuf.format(d[0]),
        DType::Int8 => ibuf.format(d[0] as i8),
        DType::Int16 => ibuf.format(i16::from_le_bytes([d[0], d[1]])),
        DType::Int32 => ibuf.format(i32::from_le_bytes([d[0], d[1], d[2], d[3]])),
        DType::Int64 => ibuf.format(i64::from_le_bytes(d[..8].try_into().unwrap())),
        DType::Fp16 => float(&mut fbuf, half::f16::from_le_bytes([d[0], d[1]]).to_f32()),
        DType::Bf16 => float(&mut fbuf, half::bf16::from_le_bytes([d[0], d[1]]).to_f32()),
        DType::Fp32 => float(&mut fbuf, f32::from_le_bytes([d[0], d[1], d[2], d[3]])),
        DType::Fp64 => {
            let f = f64::from_le_bytes(d[..8].try_into().unwrap());
            if f.is_finite() {
                fbuf.format_finite(f)
            } else {
                non_finite(f)
            }
        }
    };
    out.extend_from_slice(s.as_bytes());
}

/// Shortest round-trip text of an f32 (so 0.1f32 prints as 0.1, not 0.10000000149).
fn float(buf: &mut ryu::Buffer, f: f32) -> &str {
    if f.is_finite() {
        buf.format_finite(f)
    } else {
        non_finite(f as f64)
    }
}

/// JSON has no NaN or infinity; like TF Serving we write the tokens Python's json reads.
fn non_finite(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Splits a Triton binary-extension body: the JSON header (its length comes from the
/// `Inference-Header-Content-Length` header) and the binary tail.
pub fn split_binary(body: &[u8], header_len: usize) -> Result<(&[u8], &[u8]), String> {
    if header_len > body.len() {
        return Err(format!(
            "Inference-Header-Content-Length is {header_len} but the body has only {} bytes",
            body.len()
        ));
    }
    Ok(body.split_at(header_len))
}

/// Takes the next `size` bytes of a binary tail for input `name`.
pub fn take_binary<'a>(tail: &mut &'a [u8], size: usize, name: &str) -> Result<&'a [u8], String> {
    if size > tail.len() {
        return Err(format!(
            "input '{name}' declares binary_data_size {size} but only {} bytes of binary data remain",
            tail.len()
        ));
    }
    let (chunk, rest) = tail.split_at(size);
    *tail = rest;
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_json_becomes_a_tensor() {
        let t = tensor_from_json("x", &json!([[1, 2.5], [3, 4]]), DType::Fp32).unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.to_f64_vec(), vec![1.0, 2.5, 3.0, 4.0]);
        let s = tensor_from_json("x", &json!(7), DType::Int64).unwrap();
        assert_eq!(s.shape, Vec::<i64>::new());
    }

    #[test]
    fn bad_json_tensors_are_named() {
        let err = tensor_from_json("x", &json!([[1, 2], [3]]), DType::Fp32).unwrap_err();
        assert!(err.contains("input 'x' is ragged"), "{err}");
        let err = tensor_from_json("x", &json!([1, "a"]), DType::Fp32).unwrap_err();
        assert!(err.contains("holds \"a\""), "{err}");
        let err = tensor_from_json("x", &json!([1.5]), DType::Int32).unwrap_err();
        assert!(err.contains("integer"), "{err}");
        let err = tensor_from_json("x", &json!([300]), DType::Uint8).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn json_bounds_hold_the_widest_values() {
        let cases = [
            Tensor::from_f32(
                vec![2, 1, 3],
                &[-1.1754944e-38, f32::MIN, f32::NAN, 0.1, -1e-45, 1.0],
            ),
            Tensor::new(
                DType::Int64,
                vec![3],
                [i64::MIN, -1, i64::MAX]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
            .unwrap(),
            Tensor::new(
                DType::Fp64,
                vec![1, 1],
                (-2.2250738585072014e-308f64).to_le_bytes().to_vec(),
            )
            .unwrap(),
            Tensor::new(DType::Bool, vec![2], vec![0, 0]).unwrap(),
            // A scalar: written flat as `[false]` (the fuzzer found the bound one short).
            Tensor::new(DType::Bool, vec![], vec![0]).unwrap(),
        ];
        for t in &cases {
            let (mut nested, mut flat) = (Vec::new(), Vec::new());
            write_json(&mut nested, t, None);
            write_flat_json(&mut flat, t);
            let bound = json_bound(t);
            assert!(
                nested.len() as u64 <= bound && flat.len() as u64 <= bound,
                "{t:?}: {bound}"
            );
        }
    }

    #[test]
    fn tensors_write_as_json() {
        let t = Tensor::from_f32(vec![2, 2], &[0.1, 2.0, -3.5, 4.0]);
        let mut out = Vec::new();
        write_json(&mut out, &t, None);
        assert_eq!(String::from_utf8(out).unwrap(), "[[0.1,2.0],[-3.5,4.0]]");
        let mut out = Vec::new();
        write_json(&mut out, &t, Some(1));
        assert_eq!(String::from_utf8(out).unwrap(), "[-3.5,4.0]");
        let mut out = Vec::new();
        write_flat_json(&mut out, &t);
        assert_eq!(String::from_utf8(out).unwrap(), "[0.1,2.0,-3.5,4.0]");
        let b = Tensor::new(DType::Bool, vec![2], vec![1, 0]).unwrap();
        let mut out = Vec::new();
        write_json(&mut out, &b, None);
        assert_eq!(out, b"[true,false]");
    }

    #[test]
    fn binary_framing_splits_and_bounds() {
        let body = b"{\"a\":1}\x01\x02\x03\x04\x05";
        let (head, mut tail) = split_binary(body, 7).unwrap();
        assert_eq!(head, b"{\"a\":1}");
        assert_eq!(take_binary(&mut tail, 4, "x").unwrap(), &[1, 2, 3, 4]);
        let err = take_binary(&mut tail, 4, "y").unwrap_err();
        assert!(
            err.contains("input 'y' declares binary_data_size 4 but only 1 bytes"),
            "{err}"
        );
        assert!(split_binary(body, 99).is_err());
    }
}
