//! `imagenet-classifier`: JPEG or PNG bytes in, the top-k ImageNet-style labels out.
//!
//! The preprocessing is torchvision's usual evaluation transform on a PIL image,
//! `Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(mean, std)`, so a model
//! exported from torchvision answers here as it does in Python:
//!
//! 1. decode PNG or JPEG (grey, RGB or RGBA; alpha is dropped) to 8-bit RGB;
//! 2. resize so the shorter side is `resize` (the longer side `int(resize * long / short)`,
//!    as torchvision computes it) with PIL's bilinear filter, which is antialiased when
//!    shrinking (a triangle filter stretched by the scale factor); each of the two passes
//!    rounds to 8 bits as PIL does. Only the pixels that the crop keeps are computed, and an
//!    image whose size does not change is not resampled at all;
//! 3. centre-crop `crop` x `crop` (offsets `round((size - crop) / 2)`, Python's rounding);
//! 4. `v / 255`, then `(v - mean) / std` per channel (ImageNet's mean and std by default),
//!    through one 256-entry table per channel, written straight into the bytes of an
//!    NCHW fp32 `[1, 3, crop, crop]` tensor;
//! 5. run the model, softmax its logits and answer
//!    `{"predictions": [{"label": "class 7", "score": 0.12}, ...]}` with the `top_k` best.
//!
//! Bundle config (all optional): `top_k` (5), `labels` (an asset with one label per line;
//! default: the class index), `input` (the model's input name, `input`), `resize` (256),
//! `crop` (224), `mean` and `std` (three comma-separated numbers each; ImageNet's),
//! `timing` (`"true"` adds `"timing_us"` with the time of each stage to the answer).
//!
//! Everything is f32 and allocated once per request (the decoded image, one row band
//! for the resize, the tensor bytes): a 256x256 JPEG costs well under a millisecond here.

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
    let img = nnserve_sdk::image::decode(bytes, MAX_SIDE, 48 << 20)?;
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
fn coefficients(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
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
            (xmin, w.into_iter().map(|x| x as f32).collect())
        })
        .collect()
}

/// PIL rounds each pass to 8 bits (its fixed-point sum plus a half, clipped).
#[inline]
fn clip8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
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

    // (v / 255 - mean) / std for every 8-bit value, per channel.
    let mut lut = [[0f32; 256]; 3];
    for c in 0..3 {
        for v in 0..256 {
            lut[c][v] = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
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
        for (((px, r), g), b) in src
            .chunks_exact(3)
            .zip(r_row.chunks_exact_mut(4))
            .zip(g_row.chunks_exact_mut(4))
            .zip(b_row.chunks_exact_mut(4))
        {
            r.copy_from_slice(&lut[0][px[0] as usize].to_le_bytes());
            g.copy_from_slice(&lut[1][px[1] as usize].to_le_bytes());
            b.copy_from_slice(&lut[2][px[2] as usize].to_le_bytes());
        }
    }
    bytes
}

/// Bilinear resize of `img` to `rw` x `rh` (PIL's way: horizontal pass, then vertical,
/// each rounded to 8 bits), computing only the `crop` x `crop` window at (`left`, `top`).
fn resize_crop(img: &Rgb, rw: usize, rh: usize, left: usize, top: usize, crop: usize) -> Vec<u8> {
    let xs = coefficients(img.width, rw);
    let ys = coefficients(img.height, rh);
    let xs = &xs[left..left + crop];
    let ys = &ys[top..top + crop];
    // Input rows that the kept output rows read.
    let y0 = ys.iter().map(|(s, _)| *s).min().unwrap_or(0);
    let y1 = ys.iter().map(|(s, w)| s + w.len()).max().unwrap_or(0);
    // Horizontal pass over those rows, kept columns only.
    let mut band = vec![0u8; (y1 - y0) * crop * 3];
    for (r, y) in (y0..y1).enumerate() {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let out = &mut band[r * crop * 3..(r + 1) * crop * 3];
        for ((start, w), dst) in xs.iter().zip(out.chunks_exact_mut(3)) {
            let src = &row[start * 3..(start + w.len()) * 3];
            let mut acc = [0f32; 3];
            for (k, px) in w.iter().zip(src.chunks_exact(3)) {
                acc[0] += k * px[0] as f32;
                acc[1] += k * px[1] as f32;
                acc[2] += k * px[2] as f32;
            }
            dst.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
        }
    }
    // Vertical pass.
    let stride = crop * 3;
    let mut out = vec![0u8; crop * stride];
    let mut acc = vec![0f32; stride];
    for ((start, w), dst) in ys.iter().zip(out.chunks_exact_mut(stride)) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (i, k) in w.iter().enumerate() {
            let r = start + i - y0;
            let src = &band[r * stride..(r + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += k * v as f32;
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = clip8(a);
        }
    }
    out
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
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{n_in}->{n_out}: {s}");
                assert!(start + w.len() <= n_in);
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
        // R plane, row 0, column 0 is input pixel (16, 16); column 5 is x = 21.
        assert_eq!(t[0], norm(16.0, 0));
        assert_eq!(t[5], norm(21.0, 0));
        // G plane, row 3 is y = 19.
        assert_eq!(t[224 * 224 + 3 * 224], norm(19.0, 1));
        assert_eq!(t[2 * 224 * 224 + 100], norm(7.0, 2));
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
