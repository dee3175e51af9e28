//! `image-classifier`: PNG or JPEG bytes in, top-k labels out.
//!
//! Made for the `digits` example (scikit-learn's 8x8 digits, bright ink on a dark
//! ground, pixel values 0..16), and configurable for other small grey-image models.
//! The preprocessing, step by step (a Python reference in `tests/` does the same):
//!
//! 1. decode PNG or JPEG (any size, grey or colour) and convert to grey with
//!    ITU-R 601 luma `0.299 R + 0.587 G + 0.114 B` (alpha is ignored);
//! 2. a dark-on-bright image (the usual scan) is inverted, judged by its border: when the
//!    mean of the outermost pixels is above mid-grey, `v -> 255 - v`;
//! 3. resize to `size` x `size` by area averaging (each output pixel is the mean of the
//!    input area it covers, partial pixels weighted by their overlap);
//! 4. scale `v -> v * max_value / 255` (the data set's range is 0..16);
//! 5. run the model on a `[1, 1, size, size]` fp32 tensor, softmax its logits and answer
//!    `{"predictions": [{"label": "7", "score": 0.98}, ...]}` with the `top_k` best.
//!
//! Bundle config (all optional): `top_k` (3), `labels` (an asset with one label per line;
//! default: the class index), `input` (the model's input name, `input`), `size` (8),
//! `max_value` (16).

use nnserve_sdk::{export_handler, host, Error, Handler, Model, Request, Response, Tensor};
use serde::Serialize;

struct ImageClassifier;

#[derive(Serialize)]
struct Prediction {
    label: String,
    score: f32,
}

#[derive(Serialize)]
struct Answer {
    predictions: Vec<Prediction>,
}

/// Images larger than this on either side are refused with a 400 before decoding.
const MAX_SIDE: u32 = 4096;
/// The most the decoded image may take. The grey values (8 bytes a pixel) are made while
/// it is still held, beside the request body: 12 MiB decoded (4 megapixels of RGB) keeps
/// the peak near 50 MiB, within the example bundle's `memory_mib = 64`. With 32 MiB, a
/// 3000x3000 image ran the plugin out of its memory (a 500) instead of getting a 400.
const MAX_DECODED: u64 = 12 << 20;

impl Handler for ImageClassifier {
    fn handle(req: Request) -> Result<Response, Error> {
        let top_k: usize = host::config_or("top_k", 3)?;
        let size: u32 = host::config_or("size", 8)?;
        let max_value: f64 = host::config_or("max_value", 16.0)?;
        let input_name = host::config("input").unwrap_or_else(|| "input".to_string());

        let grey = decode_grey(&req.body)?;
        let pixels = preprocess(&grey, size as usize, max_value);
        let input = Tensor::f32(&[1, 1, size, size], &pixels);
        let logits = Model::load()?.infer_one(&input_name, input)?.to_f32()?;

        let labels = match host::config("labels") {
            Some(path) => {
                let text = String::from_utf8(host::asset(&path)?)
                    .map_err(|_| Error::internal(format!("{path} is not UTF-8 text")))?;
                text.lines().map(str::to_string).collect()
            }
            None => Vec::new(),
        };
        Response::json(&Answer {
            predictions: top_k_of(&softmax(&logits), top_k, &labels),
        })
    }
}

export_handler!(ImageClassifier);

/// A grey image as f64 values in 0..=255, row-major.
struct Grey {
    width: usize,
    height: usize,
    values: Vec<f64>,
}

fn decode_grey(bytes: &[u8]) -> Result<Grey, Error> {
    let img = nnserve_sdk::image::decode(bytes, MAX_SIDE, MAX_DECODED)?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let luma = |r: u8, g: u8, b: u8| 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64;
    // The usual layouts straight from the decoded bytes: the image crate's generic
    // conversion (`to_rgb8`) cost more than the decode itself (65 us against 43 us for a
    // 64x64 grey PNG, in the plugin).
    let values = match &img {
        image::DynamicImage::ImageLuma8(g) => g.as_raw().iter().map(|&v| v as f64).collect(),
        image::DynamicImage::ImageLumaA8(g) => {
            g.as_raw().chunks_exact(2).map(|p| p[0] as f64).collect()
        }
        image::DynamicImage::ImageRgb8(c) => c
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
        image::DynamicImage::ImageRgba8(c) => c
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
        other => other
            .to_rgb8()
            .pixels()
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
    };
    Ok(Grey {
        width,
        height,
        values,
    })
}

/// Steps 2-4 of the module doc: invert dark-on-bright, area-average to `size`, scale.
fn preprocess(img: &Grey, size: usize, max_value: f64) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let mut border_sum = 0.0;
    let mut border_n = 0usize;
    for y in 0..h {
        for x in 0..w {
            if y == 0 || x == 0 || y == h - 1 || x == w - 1 {
                border_sum += img.values[y * w + x];
                border_n += 1;
            }
        }
    }
    let invert = border_sum / border_n as f64 > 127.5;

    let wx = area_weights(w, size);
    let wy = area_weights(h, size);
    // Horizontal pass: h rows of `size` values, then the vertical pass.
    let mut rows = vec![0.0f64; h * size];
    for y in 0..h {
        for (o, weights) in wx.iter().enumerate() {
            let mut acc = 0.0;
            for &(i, wgt) in weights {
                let v = img.values[y * w + i];
                acc += wgt * if invert { 255.0 - v } else { v };
            }
            rows[y * size + o] = acc;
        }
    }
    let mut out = vec![0.0f32; size * size];
    for (oy, weights) in wy.iter().enumerate() {
        for ox in 0..size {
            let mut acc = 0.0;
            for &(i, wgt) in weights {
                acc += wgt * rows[i * size + ox];
            }
            out[oy * size + ox] = (acc * max_value / 255.0) as f32;
        }
    }
    out
}

/// For each of `n_out` output cells, the input indices it overlaps and their weights
/// (overlap length over cell length, so each cell's weights sum to 1).
fn area_weights(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let (lo, hi) = (o as f64 * scale, (o + 1) as f64 * scale);
            let first = lo.floor() as usize;
            let last = (hi.ceil() as usize).min(n_in);
            (first..last)
                .filter_map(|i| {
                    let overlap = hi.min(i as f64 + 1.0) - lo.max(i as f64);
                    (overlap > 0.0).then_some((i, overlap / scale))
                })
                .collect()
        })
        .collect()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn top_k_of(scores: &[f32], k: usize, labels: &[String]) -> Vec<Prediction> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // Stable sort: equal scores keep class order, as numpy's stable argsort does.
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx.into_iter()
        .take(k)
        .map(|i| Prediction {
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: scores[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_sum_to_one_and_cover_the_input() {
        for (n_in, n_out) in [(8, 8), (28, 8), (5, 8), (100, 8), (9, 8)] {
            let w = area_weights(n_in, n_out);
            let mut cover = vec![0.0; n_in];
            for cell in &w {
                let s: f64 = cell.iter().map(|&(_, x)| x).sum();
                assert!((s - 1.0).abs() < 1e-9, "{n_in}->{n_out}: {s}");
                for &(i, x) in cell {
                    cover[i] += x * n_in as f64 / n_out as f64;
                }
            }
            for c in cover {
                assert!((c - 1.0).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn dark_on_bright_is_inverted_and_scaled() {
        // A white 16x16 image with a black 8x8 square in the middle.
        let mut values = vec![255.0; 256];
        for y in 4..12 {
            for x in 4..12 {
                values[y * 16 + x] = 0.0;
            }
        }
        let img = Grey {
            width: 16,
            height: 16,
            values,
        };
        let out = preprocess(&img, 8, 16.0);
        assert_eq!(out[0], 0.0); // background becomes dark
        assert_eq!(out[3 * 8 + 3], 16.0); // ink becomes bright, at the data set's max
    }

    #[test]
    fn top_k_orders_by_score_and_uses_labels() {
        let p = top_k_of(&[0.1, 0.7, 0.2], 2, &["a".into(), "b".into(), "c".into()]);
        assert_eq!(p[0].label, "b");
        assert_eq!(p[1].label, "c");
    }
}
