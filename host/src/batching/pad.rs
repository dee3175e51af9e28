//! Variable-length inputs (TF Serving's `pad_variable_length_inputs`): requests whose
//! inputs differ only in dimensions the model declares free (`-1` past the batch
//! dimension, e.g. a sentence's tokens) share a batch. Each request's rows are padded to
//! the longest in the batch with the input's pad value, and the outputs' free dimensions
//! are cut back to the request's own size, so a request gets what it would alone.
//!
//! Plain tensor arithmetic: no queue, no forward.

use crate::tensor::{DType, Tensor};

/// What may differ between requests of one batch, and how to undo the padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Padding {
    /// Per input, in the model's order.
    pub inputs: Vec<InputPad>,
    /// Per output name: its free dimensions (past the batch), which are cut back to the
    /// request's own size of the same dimension of the inputs.
    pub outputs: Vec<(String, Vec<bool>)>,
}

/// One input's free dimensions (index 0, the batch, is never one) and its pad value.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPad {
    pub free: Vec<bool>,
    pub value: f64,
}

impl Padding {
    /// May requests with inputs `a` and `b` share a batch? Same dtypes and ranks, and the
    /// same size in every dimension that is not free.
    pub(super) fn compatible(&self, a: &[Tensor], b: &[Tensor]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).zip(&self.inputs).all(|((x, y), p)| {
                x.dtype == y.dtype
                    && x.shape.len() == y.shape.len()
                    && (1..x.shape.len()).all(|d| {
                        x.shape[d] == y.shape[d] || p.free.get(d).copied().unwrap_or(false)
                    })
            })
    }

    /// Pads every request's inputs to the batch's largest size in each dimension. `None`
    /// when all already agree (nothing to copy).
    pub(super) fn pad(&self, requests: &[&[Tensor]]) -> Option<Vec<Vec<Tensor>>> {
        let first = requests[0];
        let targets: Vec<Vec<i64>> = (0..first.len())
            .map(|i| {
                let mut t = first[i].shape.clone();
                for r in requests {
                    for (d, s) in r[i].shape.iter().enumerate().skip(1) {
                        t[d] = t[d].max(*s);
                    }
                }
                t
            })
            .collect();
        let all_fit = requests
            .iter()
            .all(|r| r.iter().zip(&targets).all(|(x, t)| x.shape[1..] == t[1..]));
        if all_fit {
            return None;
        }
        Some(
            requests
                .iter()
                .map(|r| {
                    r.iter()
                        .zip(&targets)
                        .zip(&self.inputs)
                        .map(|((x, t), p)| {
                            let mut shape = t.clone();
                            shape[0] = x.shape[0];
                            resize(x, &shape, &element(x.dtype, p.value))
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// A request's own size in each dimension, as the outputs' free dimensions are cut:
    /// dimension `d` of the first input that is free there.
    pub(super) fn own_sizes(&self, inputs: &[Tensor]) -> Vec<Option<i64>> {
        let rank = inputs.iter().map(|t| t.shape.len()).max().unwrap_or(0);
        (0..rank)
            .map(|d| {
                inputs
                    .iter()
                    .zip(&self.inputs)
                    .find(|(_, p)| d > 0 && p.free.get(d).copied().unwrap_or(false))
                    .and_then(|(t, _)| t.shape.get(d).copied())
            })
            .collect()
    }

    /// Cuts an output's free dimensions that the batch padded back to the request's
    /// `own` sizes (from [`Padding::own_sizes`]).
    pub(super) fn cut(&self, name: &str, t: Tensor, own: &[Option<i64>]) -> Tensor {
        let Some((_, free)) = self.outputs.iter().find(|(n, _)| n == name) else {
            return t;
        };
        let mut shape = t.shape.clone();
        for d in 1..shape.len() {
            if let (Some(true), Some(Some(size))) = (free.get(d), own.get(d)) {
                if *size < shape[d] {
                    shape[d] = *size;
                }
            }
        }
        if shape == t.shape {
            return t;
        }
        resize(&t, &shape, &[])
    }
}

/// Padding may make a batch at most this many times the bytes its requests hold (past
/// [`PAD_FLOOR`]): one long request must not pull many short ones up to its length, or a
/// client sending one 64 MiB sequence would make the batch 32 times that.
pub const MAX_PAD_FACTOR: u64 = 4;
/// Padded batches up to this size are always allowed (short sequences pad cheaply).
pub const PAD_FLOOR: u64 = 1 << 20;

/// What padding the batch being formed costs, to stop adding requests before it costs
/// more than [`MAX_PAD_FACTOR`] times their own bytes.
pub(super) struct PadBudget {
    rows: u64,
    /// Per input: the largest size in each dimension so far.
    largest: Vec<Vec<i64>>,
    /// The requests' own bytes so far.
    own: u64,
}

impl PadBudget {
    /// The budget of a batch that holds `first` (the leader's inputs).
    pub(super) fn new(first: &[Tensor]) -> PadBudget {
        PadBudget {
            rows: first.first().map_or(0, |t| t.shape[0].max(0) as u64),
            largest: first.iter().map(|t| t.shape.clone()).collect(),
            own: first.iter().map(|t| t.data.len() as u64).sum(),
        }
    }

    /// Whether `next` may join: the padded batch then stays within the factor (or the
    /// floor). When it may, the budget counts it.
    pub(super) fn admits(&mut self, next: &[Tensor]) -> bool {
        let rows = self.rows + next.first().map_or(0, |t| t.shape[0].max(0) as u64);
        let own = self.own + next.iter().map(|t| t.data.len() as u64).sum::<u64>();
        let largest: Vec<Vec<i64>> = self
            .largest
            .iter()
            .zip(next)
            .map(|(l, t)| l.iter().zip(&t.shape).map(|(a, b)| *a.max(b)).collect())
            .collect();
        let padded: u64 = largest
            .iter()
            .zip(next)
            .map(|(l, t)| {
                let per_row = crate::tensor::checked_numel(&l[1..]).unwrap_or(usize::MAX) as u64;
                rows.saturating_mul(per_row)
                    .saturating_mul(t.dtype.size() as u64)
            })
            .fold(0u64, u64::saturating_add);
        if padded > own.saturating_mul(MAX_PAD_FACTOR).max(PAD_FLOOR) {
            return false;
        }
        (self.rows, self.own, self.largest) = (rows, own, largest);
        true
    }
}

/// One element of `dtype` with the value `v`, little-endian.
fn element(dtype: DType, v: f64) -> Vec<u8> {
    match dtype {
        DType::Bool => vec![(v != 0.0) as u8],
        DType::Uint8 => vec![v as u8],
        DType::Int8 => (v as i8).to_le_bytes().to_vec(),
        DType::Int16 => (v as i16).to_le_bytes().to_vec(),
        DType::Int32 => (v as i32).to_le_bytes().to_vec(),
        DType::Int64 => (v as i64).to_le_bytes().to_vec(),
        DType::Fp16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        DType::Bf16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        DType::Fp32 => (v as f32).to_le_bytes().to_vec(),
        DType::Fp64 => v.to_le_bytes().to_vec(),
    }
}

/// `t` resized to `shape` (same rank): each dimension cut or extended, new elements
/// `fill` (one element's bytes; only used when growing). Copies whole runs of the last
/// dimension.
pub(super) fn resize(t: &Tensor, shape: &[i64], fill: &[u8]) -> Tensor {
    let es = t.dtype.size();
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let src: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let total: usize = dims.iter().product();
    let mut data = Vec::with_capacity(total * es);
    if dims.is_empty() {
        return t.clone();
    }
    let last = dims.len() - 1;
    let run = dims[last].min(src[last]);
    let grow = dims[last] - run;
    // Strides of the source, in elements.
    let mut stride = vec![1usize; src.len()];
    for d in (0..last).rev() {
        stride[d] = stride[d + 1] * src[d + 1];
    }
    let mut index = vec![0usize; last];
    let outer: usize = dims[..last].iter().product();
    for _ in 0..outer {
        let inside = index.iter().zip(&src).all(|(i, s)| i < s);
        if inside {
            let at: usize = index.iter().zip(&stride).map(|(i, s)| i * s).sum();
            data.extend_from_slice(&t.data[at * es..(at + run) * es]);
            for _ in 0..grow {
                data.extend_from_slice(fill);
            }
        } else {
            for _ in 0..dims[last] {
                data.extend_from_slice(fill);
            }
        }
        // The next index, last dimension fastest.
        for d in (0..last).rev() {
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Tensor {
        dtype: t.dtype,
        shape: shape.to_vec(),
        data,
    }
}
