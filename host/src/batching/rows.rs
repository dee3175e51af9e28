//! Split and join: rows of a request along dim 0, copied once into a batch at their offset
//! (padded with zero rows), cut back out of the outputs, and the parts of a split request
//! rejoined.
//!
//! Plain tensor arithmetic: no queue, no forward.

use super::{BatchError, Outputs};
use crate::tensor::Tensor;

/// Rows of a request: dim 0, the same for every input.
pub(super) fn batch_rows(inputs: &[Tensor]) -> Result<usize, BatchError> {
    let mut rows = None;
    for t in inputs {
        let r = *t.shape.first().ok_or_else(|| {
            BatchError::BadInput(
                "a scalar input cannot be batched: inputs need a batch dimension".into(),
            )
        })? as usize;
        if rows.is_some_and(|n| n != r) {
            return Err(BatchError::BadInput(format!(
                "inputs disagree on the batch dimension ({} and {r} rows)",
                rows.unwrap()
            )));
        }
        rows = Some(r);
    }
    rows.filter(|&r| r > 0)
        .ok_or_else(|| BatchError::BadInput("a request needs at least one row".into()))
}

/// Same dtypes and non-batch dimensions, input by input.
pub(super) fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.dtype == y.dtype && x.shape[1..] == y.shape[1..])
}

/// Bytes of one row.
pub(super) fn row_bytes(t: &Tensor) -> usize {
    crate::tensor::numel(&t.shape[1..]) * t.dtype.size()
}

/// `n` rows of `t` from row `start`.
pub(super) fn slice_rows(t: &Tensor, start: usize, n: usize) -> Tensor {
    let rb = row_bytes(t);
    let mut shape = t.shape.clone();
    shape[0] = n as i64;
    Tensor {
        dtype: t.dtype,
        shape,
        data: t.data[start * rb..(start + n) * rb].to_vec(),
    }
}

/// Stacks the requests' inputs along dim 0 and pads with zero rows to `padded`: each
/// request's rows are copied once, to their offset.
pub(super) fn concat_rows(requests: &[&[Tensor]], padded: usize) -> Vec<Tensor> {
    let first = requests[0];
    (0..first.len())
        .map(|i| {
            let rb = row_bytes(&first[i]);
            let mut data = Vec::with_capacity(padded * rb);
            for req in requests {
                data.extend_from_slice(&req[i].data);
            }
            data.resize(padded * rb, 0);
            let mut shape = first[i].shape.clone();
            shape[0] = padded as i64;
            Tensor {
                dtype: first[i].dtype,
                shape,
                data,
            }
        })
        .collect()
}

/// Rejoins the outputs of a split request along dim 0. The parts must agree on the
/// outputs' names, dtypes and non-batch dimensions (a model whose output size depends on
/// its input cannot have a request split): otherwise the request fails with the reason.
pub(super) fn join_rows(parts: Vec<Vec<(String, Tensor)>>) -> Outputs {
    let mut iter = parts.into_iter();
    let mut joined = iter.next().unwrap_or_default();
    for part in iter {
        let agree = part.len() == joined.len()
            && joined.iter().zip(&part).all(|((n, a), (m, b))| {
                n == m && a.dtype == b.dtype && a.shape[1..] == b.shape[1..]
            });
        if !agree {
            let shapes = |p: &[(String, Tensor)]| {
                p.iter()
                    .map(|(n, t)| format!("{n} {:?}", t.shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(BatchError::Model(format!(
                "the request had more rows than max_batch_size and was split, but the model's outputs for its parts differ ({} and {}), so they cannot be rejoined; send at most max_batch_size rows per request",
                shapes(&joined),
                shapes(&part)
            )));
        }
        for ((_, acc), (_, t)) in joined.iter_mut().zip(part) {
            acc.shape[0] += t.shape[0];
            acc.data.extend_from_slice(&t.data);
        }
    }
    Ok(joined)
}
