//! `imagenet-classifier`: JPEG or PNG bytes in, the top-k ImageNet-style labels out.
//!
//! The preprocessing is torchvision's usual evaluation transform on a PIL image,
//! `Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)`, so a model
//! exported from torchvision answers here as it does in Python:
//!
//! 1. decode PNG or JPEG (grey, RGB or RGBA; alpha is dropped) to 8-bit RGB;
//! 2. resize so the shorter side is `resize` (the longer side `int(resize * long / short)`,
//!    as torchvision computes it) with PIL's bilinear filter, which is antialiased when
//!    shrinking (a triangle filter stretched by the scale factor), in PIL's fixed point
//!    (weights scaled by 2^22, each of the two passes rounded to 8 bits), so the resized
//!    pixels equal Pillow's byte for byte. Only the pixels that the crop keeps are
//!    computed, and an image whose size does not change is not resampled at all;
//! 3. centre-crop `crop` x `crop` (offsets `round((size - crop) / 2)`, Python's rounding);
//! 4. `v / 255`, then `(v - mean) / std` per channel (ImageNet's mean and std by default),
//!    as a multiply then an add in f32 (within 5e-7 of torchvision's two divisions),
//!    sixteen pixels at a time with wasm SIMD, straight into the bytes of an NCHW fp32 `[1, 3, crop, crop]`
//!    tensor;
//! 5. run the model, softmax its logits and answer
//!    `{"predictions": [{"label": "class 7", "score": 0.12}, ...]}` with the `top_k` best.
//!
//! Bundle config (all optional): `top_k` (5), `labels` (an asset with one label per line;
//! default: the class index), `input` (the model's input name, `input`), `resize` (256),
//! `crop` (224), `mean` and `std` (three comma-separated numbers each; ImageNet's),
//! `timing` (`"true"` adds `"timing_us"` with the time of each stage to the answer).
//!
//! Buffers are allocated once per request (the decoded image, one row band for the
//! resize, the tensor bytes): a 256x256 JPEG costs well under a millisecond here.

use nnserve_sdk::{
    export_handler, host, Error, Handler, Model, Request, Response, Tensor, TensorType,
};
use serde::Serialize;
use std::time::Instant;

struct ImagenetClassifier;

#[derive(Serialize)]
struct Prediction {
    label: String,
    score: f32,
}

#[derive(Serialize)]
struct Answer {
    predictions: Vec<Prediction>,
    /// With config `timing = "true"`: microseconds per stage of this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    timing_us: Option<Timing>,
}

#[derive(Serialize)]
struct Timing {
    decode: f64,
    preprocess: f64,
    forward: f64,
    answer: f64,
}

/// Images larger than this on either side are refused with a 400 before decoding.
const MAX_SIDE: u32 = 8192;
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Handler for ImagenetClassifier {
    fn handle(req: Request) -> Result<Response, Error> {
        let top_k: usize = host::config_or("top_k", 5)?;
        let resize: usize = host::config_or("resize", 256)?;
        let crop: usize = host::config_or("crop", 224)?;
        let mean = triple("mean", IMAGENET_MEAN)?;
        let std = triple("std", IMAGENET_STD)?;
        let input_name = host::config("input").unwrap_or_else(|| "input".to_string());
        if crop == 0 || resize < crop {
            return Err(Error::internal(format!(
                "bundle config: need 0 < crop ({crop}) <= resize ({resize})"
            )));
        }

        let timing = host::config("timing").as_deref() == Some("true");
        let t0 = Instant::now();
        let img = decode_rgb(&req.body)?;
        let t1 = Instant::now();
        let data = preprocess(&img, resize, crop, &mean, &std);
        let t2 = Instant::now();
        let side = crop as u32;
        let input = Tensor {
            shape: vec![1, 3, side, side],
            ty: TensorType::Fp32,
            data,
        };
        let logits = Model::load()?.infer_one(&input_name, input)?.to_f32()?;
        let t3 = Instant::now();
        let scores = softmax(&logits);
        let best = top_k_indices(&scores, top_k);

        let labels = match host::config("labels") {
            Some(path) => Some(host::asset(&path)?),
            None => None,
        };
        let predictions = best
            .into_iter()
            .map(|i| Prediction {
                label: labels
                    .as_deref()
                    .and_then(|text| label_of(text, i))
                    .unwrap_or_else(|| i.to_string()),
                score: scores[i],
            })
            .collect();
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        let timing_us = timing.then(|| Timing {
            decode: us(t0, t1),
            preprocess: us(t1, t2),
            forward: us(t2, t3),
            answer: us(t3, Instant::now()),
        });
        Response::json(&Answer {
            predictions,
            timing_us,
        })
    }
}

export_handler!(ImagenetClassifier);

fn triple(key: &str, default: [f32; 3]) -> Result<[f32; 3], Error> {
    let Some(text) = host::config(key) else {
        return Ok(default);
    };
    let bad = || {
        Error::internal(format!(
            "bundle config `{key}` = {text:?}: want three numbers"
        ))
    };
    let v: Vec<f32> = text
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    <[f32; 3]>::try_from(v).map_err(|_| bad())
}

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
struct Rgb {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

fn decode_rgb(bytes: &[u8]) -> Result<Rgb, Error> {
    // 24 MiB decoded (8 megapixels of RGB): a grey or RGBA image is converted to RGB
    // while it is still held, beside the body, all within `memory_mib = 64`.
    let img = nnserve_sdk::image::decode(bytes, MAX_SIDE, 24 << 20)?;
    // A JPEG decodes to RGB8 already: `into_rgb8` then moves the buffer, no copy.
    let rgb = img.into_rgb8();
    Ok(Rgb {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// torchvision's `Resize(size)` output size for an int `size`: the shorter side becomes
/// `size`, the longer `int(size * long / short)`. Returns (width, height).
fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    if width <= height {
        (size, (size as f64 * height as f64 / width as f64) as usize)
    } else {
        ((size as f64 * width as f64 / height as f64) as usize, size)
    }
}

/// Python's `round(x)` (half to even), as torchvision's centre crop uses it.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    };
    r.max(0.0) as usize
}

/// PIL's bilinear resampling coefficients along one axis (`precompute_coeffs` in
/// Pillow's `Resample.c`): for each output index, the first input index and the
/// normalised weights. Shrinking widens the triangle filter by the scale factor.
fn coefficients(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|x| *x /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// PIL's fixed point for 8-bit resampling: weights scaled by 2^22, sums of
/// 255 * 2^22 fit an i32.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// [`coefficients`] as PIL uses them for 8-bit images (`normalize_coeffs_8bpc`), laid
/// out flat: output `o` reads input `starts[o]..starts[o] + taps`, with weights
/// `weights[o * taps..]` (zero-padded where an output needs fewer taps; the first input
/// index is pulled back where the padding would run past the end).
struct Taps {
    taps: usize,
    starts: Vec<usize>,
    weights: Vec<i32>,
}

impl Taps {
    fn new(n_in: usize, n_out: usize, first: usize, count: usize) -> Taps {
        let all = coefficients(n_in, n_out);
        let kept = &all[first..first + count];
        let taps = kept.iter().map(|(_, w)| w.len()).max().unwrap_or(1).max(1);
        let mut starts = Vec::with_capacity(count);
        let mut weights = vec![0i32; count * taps];
        for (o, (start, w)) in kept.iter().enumerate() {
            // Keep `start + taps <= n_in`: shift the window left, the weights right.
            let s = (*start).min(n_in.saturating_sub(taps));
            let shift = start - s;
            for (i, &k) in w.iter().enumerate() {
                let scaled = k * (1u32 << PRECISION_BITS) as f64;
                weights[o * taps + shift + i] = (scaled + if k < 0.0 { -0.5 } else { 0.5 }) as i32;
            }
            starts.push(s);
        }
        Taps {
            taps,
            starts,
            weights,
        }
    }
}

/// PIL's rounding of a fixed-point sum (which started at one half) to 8 bits.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Steps 2-4 of the module doc: the bytes of the NCHW fp32 tensor `[1, 3, crop, crop]`.
fn preprocess(img: &Rgb, resize: usize, crop: usize, mean: &[f32; 3], std: &[f32; 3]) -> Vec<u8> {
    let (rw, rh) = resized_size(img.width, img.height, resize);
    let left = round_half_even((rw as f64 - crop as f64) / 2.0);
    let top = round_half_even((rh as f64 - crop as f64) / 2.0);
    // The crop as 8-bit RGB rows: straight from the decoded image when no resize is
    // needed, else resampled (only the kept window).
    let resized;
    let (rows, stride, x0, y0) = if (rw, rh) == (img.width, img.height) {
        (&img.data[..], img.width * 3, left * 3, top)
    } else {
        resized = resize_crop(img, rw, rh, left, top, crop);
        (&resized[..], crop * 3, 0, 0)
    };

    // One pass over the kept pixels, each written to its place in the three channel
    // planes of the tensor's little-endian bytes.
    let plane = crop * crop * 4;
    let mut bytes = vec![0u8; 3 * plane];
    let (r_plane, rest) = bytes.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    let row_bytes = crop * 4;
    for (((y, r_row), g_row), b_row) in (y0..y0 + crop)
        .zip(r_plane.chunks_exact_mut(row_bytes))
        .zip(g_plane.chunks_exact_mut(row_bytes))
        .zip(b_plane.chunks_exact_mut(row_bytes))
    {
        let src = &rows[y * stride + x0..y * stride + x0 + crop * 3];
        normalise_row(src, [r_row, g_row, b_row], mean, std);
    }
    bytes
}

/// `(v / 255 - mean) / std` for every value of one row of interleaved RGB, into the
/// three channel rows of the tensor's bytes, as `v * scale + shift` with
/// `scale = 1 / (255 std)` and `shift = -mean / std` in f32, a multiply then an add
/// (never fused: Rust does not contract them, and the SIMD path uses separate
/// instructions): within 5e-7 of torchvision's `ToTensor` then `Normalize` (two
/// divisions per value; the values lie in [-2.2, 2.7]), and the same result, bit for
/// bit, in the wasm SIMD path and the plain one. For a 224x224 crop in
/// wasm (the whole preprocess stage, p50 over 2,000 requests, three runs): a 256-entry
/// table per channel looked up per value 131-135 us, the compiler's vectorisation of
/// this arithmetic 192-194 us, the SIMD path 42-46 us.
fn normalise_row(src: &[u8], out: [&mut [u8]; 3], mean: &[f32; 3], std: &[f32; 3]) {
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -mean[c] / std[c]);
    let n = src.len() / 3;
    let [r_out, g_out, b_out] = out;
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let done = simd::normalise(src, [&mut *r_out, &mut *g_out, &mut *b_out], &scale, &shift);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let done = 0;
    for x in done..n {
        let px = &src[3 * x..3 * x + 3];
        let at = 4 * x;
        r_out[at..at + 4].copy_from_slice(&(px[0] as f32 * scale[0] + shift[0]).to_le_bytes());
        g_out[at..at + 4].copy_from_slice(&(px[1] as f32 * scale[1] + shift[1]).to_le_bytes());
        b_out[at..at + 4].copy_from_slice(&(px[2] as f32 * scale[2] + shift[2]).to_le_bytes());
    }
}

/// [`normalise_row`] sixteen pixels at a time with wasm SIMD: three 16-byte loads
/// de-interleaved by shuffles into R, G and B, each widened to four f32x4.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    /// Normalises the whole groups of 16 pixels of `src`; returns how many pixels it did.
    pub fn normalise(src: &[u8], out: [&mut [u8]; 3], scale: &[f32; 3], shift: &[f32; 3]) -> usize {
        let groups = src.len() / 48;
        assert!(out.iter().all(|o| o.len() >= groups * 64));
        let sc = scale.map(|x| f32x4_splat(x));
        let sh = shift.map(|x| f32x4_splat(x));
        for g in 0..groups {
            // SAFETY: bytes 48g..48g+48 of `src` and 64g..64g+64 of every output row
            // exist (checked above); v128 loads and stores need no alignment.
            unsafe {
                let p = src.as_ptr().add(48 * g) as *const v128;
                let (a, b, c) = (v128_load(p), v128_load(p.add(1)), v128_load(p.add(2)));
                // Pixel i's channel k is byte 3i + k of the 48: a holds 0..16, b 16..32,
                // c 32..48. First the bytes from a and b, then the rest from c.
                let r =
                    i8x16_shuffle::<0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0, 0, 0, 0, 0>(a, b);
                let r = i8x16_shuffle::<0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29>(r, c);
                let gr =
                    i8x16_shuffle::<1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 0, 0, 0, 0, 0>(a, b);
                let gr =
                    i8x16_shuffle::<0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30>(gr, c);
                let bl =
                    i8x16_shuffle::<2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0, 0, 0, 0, 0, 0>(a, b);
                let bl =
                    i8x16_shuffle::<0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31>(bl, c);
                for (k, v) in [r, gr, bl].into_iter().enumerate() {
                    let lo = u16x8_extend_low_u8x16(v);
                    let hi = u16x8_extend_high_u8x16(v);
                    let quads = [
                        u32x4_extend_low_u16x8(lo),
                        u32x4_extend_high_u16x8(lo),
                        u32x4_extend_low_u16x8(hi),
                        u32x4_extend_high_u16x8(hi),
                    ];
                    let d = out[k].as_mut_ptr().add(64 * g) as *mut v128;
                    for (j, q) in quads.into_iter().enumerate() {
                        let f = f32x4_add(f32x4_mul(f32x4_convert_u32x4(q), sc[k]), sh[k]);
                        v128_store(d.add(j), f);
                    }
                }
            }
        }
        groups * 16
    }
}

/// Bilinear resize of `img` to `rw` x `rh` (PIL's way: horizontal pass, then vertical,
/// each rounded to 8 bits, in PIL's fixed point), computing only the `crop` x `crop`
/// window at (`left`, `top`).
fn resize_crop(img: &Rgb, rw: usize, rh: usize, left: usize, top: usize, crop: usize) -> Vec<u8> {
    let xs = Taps::new(img.width, rw, left, crop);
    let ys = Taps::new(img.height, rh, top, crop);
    // Input rows that the kept output rows read.
    let y0 = ys.starts.iter().copied().min().unwrap_or(0);
    let y1 = ys.starts.iter().map(|s| s + ys.taps).max().unwrap_or(0);
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    // Horizontal pass over those rows, kept columns only.
    let stride = crop * 3;
    let mut band = vec![0u8; (y1 - y0) * stride];
    for (y, out) in (y0..y1).zip(band.chunks_exact_mut(stride)) {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        horizontal_row(row, &xs, out);
    }
    // Vertical pass: whole rows at a time (the inner loop vectorises).
    let mut out = vec![0u8; crop * stride];
    let mut acc = vec![0i32; stride];
    for ((start, w), dst) in ys
        .starts
        .iter()
        .zip(ys.weights.chunks_exact(ys.taps))
        .zip(out.chunks_exact_mut(stride))
    {
        acc.iter_mut().for_each(|a| *a = HALF);
        for (i, &k) in w.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let r = start + i - y0;
            let src = &band[r * stride..(r + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += k * v as i32;
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = clip8(a);
        }
    }
    out
}

/// One row of the horizontal pass. A tap count known at compile time unrolls the inner
/// loop (shrinking by up to 4x needs at most 8 taps): 1.23-1.50 ms against 1.89-2.09 ms
/// for the 640x480 benchmark image in wasm.
fn horizontal_row(row: &[u8], xs: &Taps, out: &mut [u8]) {
    match xs.taps {
        1 => horizontal::<1>(row, xs, out),
        2 => horizontal::<2>(row, xs, out),
        3 => horizontal::<3>(row, xs, out),
        4 => horizontal::<4>(row, xs, out),
        5 => horizontal::<5>(row, xs, out),
        6 => horizontal::<6>(row, xs, out),
        7 => horizontal::<7>(row, xs, out),
        8 => horizontal::<8>(row, xs, out),
        _ => horizontal_any(row, xs, out),
    }
}

/// One row of the horizontal pass with `T` taps per output pixel.
fn horizontal<const T: usize>(row: &[u8], xs: &Taps, out: &mut [u8]) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    for ((start, w), dst) in xs
        .starts
        .iter()
        .zip(xs.weights.chunks_exact(T))
        .zip(out.chunks_exact_mut(3))
    {
        let w: &[i32; T] = w.try_into().unwrap();
        let src: &[u8] = &row[start * 3..(start + T) * 3];
        let (mut r, mut g, mut b) = (HALF, HALF, HALF);
        for i in 0..T {
            r += w[i] * src[3 * i] as i32;
            g += w[i] * src[3 * i + 1] as i32;
            b += w[i] * src[3 * i + 2] as i32;
        }
        dst[0] = clip8(r);
        dst[1] = clip8(g);
        dst[2] = clip8(b);
    }
}

/// [`horizontal`] for any tap count.
fn horizontal_any(row: &[u8], xs: &Taps, out: &mut [u8]) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    for ((start, w), dst) in xs
        .starts
        .iter()
        .zip(xs.weights.chunks_exact(xs.taps))
        .zip(out.chunks_exact_mut(3))
    {
        let src = &row[start * 3..(start + xs.taps) * 3];
        let (mut r, mut g, mut b) = (HALF, HALF, HALF);
        for (&k, px) in w.iter().zip(src.chunks_exact(3)) {
            r += k * px[0] as i32;
            g += k * px[1] as i32;
            b += k * px[2] as i32;
        }
        dst[0] = clip8(r);
        dst[1] = clip8(g);
        dst[2] = clip8(b);
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter_mut().for_each(|e| *e /= sum);
    exps
}

/// Indices of the `k` highest scores, best first; equal scores keep class order.
fn top_k_indices(scores: &[f32], k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, s) in scores.iter().enumerate() {
        if best.len() == k && k > 0 && *s <= scores[best[k - 1]] {
            continue;
        }
        let pos = best.partition_point(|&j| scores[j] >= *s);
        best.insert(pos, i);
        best.truncate(k);
    }
    best
}

/// Line `i` of a labels file (no allocation for the lines skipped).
fn label_of(text: &[u8], i: usize) -> Option<String> {
    let line = text.split(|&b| b == b'\n').nth(i)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some(String::from_utf8_lossy(line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn sizes_and_crop_offsets_follow_torchvision() {
        assert_eq!(resized_size(256, 256, 256), (256, 256));
        assert_eq!(resized_size(640, 480, 256), (341, 256)); // int(256 * 640 / 480)
        assert_eq!(resized_size(300, 500, 256), (256, 426));
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(58.5), 58); // Python: round(58.5) == 58
        assert_eq!(round_half_even(59.5), 60);
    }

    #[test]
    fn coefficients_sum_to_one_and_identity_is_exact() {
        for (n_in, n_out) in [(640, 341), (480, 256), (100, 256), (256, 256), (3, 2)] {
            for (start, w) in coefficients(n_in, n_out) {
                let s: f64 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-9, "{n_in}->{n_out}: {s}");
                assert!(start + w.len() <= n_in);
            }
            // Fixed point: each output's weights sum to 2^22 within their rounding, and
            // its window stays inside the input.
            let t = Taps::new(n_in, n_out, 0, n_out);
            for (start, w) in t.starts.iter().zip(t.weights.chunks_exact(t.taps)) {
                let s: i32 = w.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.taps as i32,
                    "{n_in}->{n_out}: {s}"
                );
                assert!(start + t.taps <= n_in);
            }
        }
        for (o, (start, w)) in coefficients(7, 7).into_iter().enumerate() {
            assert_eq!(start, o);
            assert_eq!(w[0], 1.0);
            assert!(w[1..].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn crop_and_normalise_without_resize() {
        // 256x256 with value = x % 256 in R, y in G, 7 in B; crop 224 starts at 16.
        let (w, h) = (256, 256);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[x as u8, y as u8, 7]);
            }
        }
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        let t = f32s(&preprocess(&img, 256, 224, &IMAGENET_MEAN, &IMAGENET_STD));
        assert_eq!(t.len(), 3 * 224 * 224);
        let norm = |v: f32, c: usize| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        let close = |a: f32, b: f32| (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1.0);
        // R plane, row 0, column 0 is input pixel (16, 16); column 5 is x = 21.
        assert!(close(t[0], norm(16.0, 0)));
        assert!(close(t[5], norm(21.0, 0)));
        // G plane, row 3 is y = 19.
        assert!(close(t[224 * 224 + 3 * 224], norm(19.0, 1)));
        assert!(close(t[2 * 224 * 224 + 100], norm(7.0, 2)));
        // Every value of every plane: R is x, G is y, B is 7.
        for (i, &v) in t.iter().enumerate() {
            let (c, y, x) = (i / (224 * 224), i / 224 % 224, i % 224);
            let want = norm([(x + 16) as f32, (y + 16) as f32, 7.0][c], c);
            assert!(close(v, want), "plane {c} ({x}, {y}): {v} against {want}");
        }
    }

    #[test]
    fn normalising_by_scale_and_shift_stays_within_5e_7_of_torchvisions_divisions() {
        let mean = IMAGENET_MEAN;
        let std = IMAGENET_STD;
        // Every byte value in every channel (natively this is the plain path; the wasm
        // SIMD path computes the same operations, and tests/e2e/test_imagenet.py runs it).
        let src: Vec<u8> = (0..=255u8)
            .flat_map(|v| [v, 255 - v, v.wrapping_mul(7)])
            .collect();
        let n = src.len() / 3;
        let mut planes = vec![vec![0u8; 4 * n]; 3];
        let [r, g, b] = &mut planes[..] else {
            unreachable!()
        };
        normalise_row(&src, [r, g, b], &mean, &std);
        let mut worst = 0f32;
        for c in 0..3 {
            for x in 0..n {
                let got = f32::from_le_bytes(planes[c][4 * x..4 * x + 4].try_into().unwrap());
                let want = (src[3 * x + c] as f32 / 255.0 - mean[c]) / std[c];
                worst = worst.max((got - want).abs());
            }
        }
        assert!(worst <= 5e-7, "largest difference {worst:e}");
    }

    #[test]
    fn resize_of_a_flat_image_stays_flat_and_a_ramp_stays_monotone() {
        // 640x480 -> 341x256 -> crop 224 at (58, 16).
        let (w, h) = (640, 480);
        let mut data = Vec::with_capacity(w * h * 3);
        for _y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[(x * 255 / (w - 1)) as u8, 128, 200]);
            }
        }
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        let mean = [0.0; 3];
        let std = [1.0; 3];
        let t = f32s(&preprocess(&img, 256, 224, &mean, &std));
        let g = &t[224 * 224..2 * 224 * 224];
        assert!(g.iter().all(|&v| v == 128.0 / 255.0));
        let row = &t[..224];
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        // Output column 58 covers input x around (58.5 * 640 / 341) ~ 109.8.
        let expect = 109.8 * 255.0 / 639.0 / 255.0;
        assert!(
            (row[0] - expect).abs() < 2.0 / 255.0,
            "{} vs {expect}",
            row[0]
        );
    }

    /// Pillow 13's `Image.resize((27, 16), BILINEAR)` of this 61x37 pattern, the 12x12
    /// window at (7, 2): the resize must match PIL byte for byte (torchvision's `Resize`
    /// on a PIL image is exactly that). The f32 arithmetic of before was off by one in
    /// 760 of the 150,528 values of the benchmark's 640x480 crop.
    #[test]
    fn resize_matches_pillow_byte_for_byte() {
        let (w, h) = (61usize, 37usize);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    data.push(((x * 7 + y * 13 + c * 101 + (x * y) % 17 * 9) % 256) as u8);
                }
            }
        }
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        #[rustfmt::skip]
        const PILLOW: [u8; 432] = [
        131, 83, 184, 101, 112, 153, 113, 135, 148, 92, 146, 119, 101, 169, 120, 96, 186, 112, 103, 172, 99, 108, 180, 89,
        102, 182, 100, 150, 143, 96, 155, 159, 102, 163, 98, 121, 126, 106, 194, 82, 148, 144, 92, 165, 120, 99, 183, 77,
        97, 183, 68, 112, 175, 87, 131, 139, 77, 131, 106, 77, 138, 125, 84, 178, 112, 124, 180, 100, 133, 131, 70, 160,
        109, 143, 169, 87, 155, 115, 101, 156, 91, 114, 156, 87, 128, 129, 74, 142, 155, 88, 155, 120, 101, 173, 97, 119,
        161, 121, 107, 180, 113, 152, 163, 90, 176, 138, 78, 169, 64, 150, 116, 106, 156, 81, 122, 142, 68, 151, 126, 97,
        158, 130, 104, 160, 122, 111, 156, 117, 140, 195, 75, 141, 161, 126, 146, 161, 76, 175, 152, 101, 158, 142, 121, 147,
        81, 147, 70, 163, 74, 122, 152, 107, 98, 172, 122, 118, 156, 110, 133, 177, 116, 149, 186, 81, 169, 197, 46, 143,
        116, 99, 134, 79, 127, 178, 97, 124, 142, 128, 140, 108, 106, 162, 52, 140, 155, 86, 158, 123, 104, 165, 135, 116,
        167, 145, 130, 151, 90, 150, 154, 61, 146, 169, 70, 117, 180, 82, 131, 139, 116, 143, 130, 128, 136, 115, 139, 109,
        175, 134, 121, 152, 117, 102, 147, 81, 158, 129, 85, 167, 137, 99, 138, 114, 107, 152, 62, 124, 191, 97, 165, 81,
        168, 112, 162, 86, 144, 145, 94, 153, 100, 112, 170, 85, 196, 115, 142, 168, 86, 162, 112, 100, 192, 125, 97, 179,
        101, 123, 124, 69, 148, 124, 93, 146, 127, 80, 168, 83, 97, 153, 133, 109, 156, 68, 115, 136, 71, 126, 162, 80,
        150, 69, 161, 135, 105, 142, 129, 116, 164, 92, 134, 156, 81, 153, 125, 77, 171, 104, 89, 188, 92, 86, 185, 123,
        92, 169, 125, 131, 143, 77, 139, 145, 85, 167, 158, 113, 95, 97, 156, 120, 122, 134, 109, 151, 125, 69, 167, 123,
        82, 167, 109, 98, 174, 89, 114, 157, 106, 127, 153, 107, 116, 177, 85, 157, 123, 104, 147, 115, 126, 183, 113, 135,
        108, 122, 146, 102, 158, 100, 89, 179, 116, 104, 173, 83, 113, 145, 65, 121, 133, 76, 138, 157, 95, 152, 128, 98,
        151, 143, 97, 174, 117, 138, 134, 74, 161, 137, 89, 169, 75, 133, 189, 116, 188, 84, 95, 173, 81, 131, 129, 78,
        141, 124, 87, 152, 139, 98, 188, 79, 134, 164, 111, 110, 130, 161, 137, 163, 91, 165, 157, 95, 153, 131, 99, 168,
        ];
        assert_eq!(resize_crop(&img, 27, 16, 7, 2, 12), PILLOW);
    }

    #[test]
    fn unrolled_horizontal_passes_equal_the_general_one() {
        // Shrink factors from 1 to 12: from 2 taps to more than 8 (the general path).
        for (n_in, n_out) in [
            (50, 50),
            (60, 50),
            (100, 50),
            (150, 50),
            (200, 50),
            (260, 50),
            (330, 50),
            (600, 50),
        ] {
            let row: Vec<u8> = (0..n_in * 3)
                .map(|i| ((i * 37 + i / 7) % 251) as u8)
                .collect();
            let xs = Taps::new(n_in, n_out, 0, n_out);
            let (mut a, mut b) = (vec![0u8; n_out * 3], vec![0u8; n_out * 3]);
            horizontal_row(&row, &xs, &mut a);
            horizontal_any(&row, &xs, &mut b);
            assert_eq!(a, b, "{n_in} -> {n_out} ({} taps)", xs.taps);
        }
    }

    #[test]
    fn top_k_and_labels() {
        let s = [0.1, 0.5, 0.2, 0.5, 0.05];
        assert_eq!(top_k_indices(&s, 3), vec![1, 3, 2]);
        assert_eq!(top_k_indices(&s, 0), Vec::<usize>::new());
        assert_eq!(top_k_indices(&s, 10), vec![1, 3, 2, 0, 4]);
        let text = b"class 0\nclass 1\r\nclass 2\n";
        assert_eq!(label_of(text, 1).as_deref(), Some("class 1"));
        assert_eq!(label_of(text, 7), None);
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

/// Native timing of the stages (not the wasm build): `cargo test --release -p
/// imagenet-classifier -- --ignored --nocapture stage_timing` with bench/work's images.
#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn stage_timing() {
        for name in ["image-256.jpg", "image-640x480.jpg"] {
            let path = format!("{}/../../bench/work/{name}", env!("CARGO_MANIFEST_DIR"));
            let Ok(bytes) = std::fs::read(&path) else {
                eprintln!("{path} missing: run bench/make_resnet.py");
                continue;
            };
            let n = 200;
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(decode_rgb(&bytes).ok());
            }
            let decode = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let img = decode_rgb(&bytes).ok().unwrap();
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(preprocess(&img, 256, 224, &IMAGENET_MEAN, &IMAGENET_STD));
            }
            let pre = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("{name}: decode {decode:.1} us, preprocess {pre:.1} us (native)");
        }
    }
}
