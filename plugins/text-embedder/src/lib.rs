//! Sentence embeddings with a BERT-style encoder (examples/repository/minilm:
//! all-MiniLM-L6-v2), as sentence-transformers computes them:
//! 1. tokenise in the sandbox with Hugging Face `tokenizers` and the bundle's
//!    `assets/tokenizer.json` (lower-casing, accent stripping, CJK and punctuation
//!    splitting, WordPiece, `[CLS]`/`[SEP]`, truncation at 256 tokens);
//! 2. run every text of the request in one forward, padded to its longest text (the
//!    server's batcher pads across requests the same way);
//! 3. mean-pool the token embeddings over the attention mask and L2-normalise.
//!
//! Request: `{"texts": ["...", ...]}` or `{"text": "..."}` (JSON). Answer:
//! `{"embeddings": [[f32; dim], ...], "model": NAME, "tokens": [n, ...]}`.
//!
//! Config (`[handler] config`): `model` (the name answered, default the bundle's model
//! name), `max_texts` (per request, default 64), `tokenizer` (the asset, default
//! `assets/tokenizer.json`).

use nnserve_sdk::{export_handler, host, Error, Handler, Model, Request, Response, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Parsed once by `init` at load (about 25 ms of the 30 ms an empty text took per
/// request before); every request's instance starts from the server's snapshot taken
/// after it, with this already set.
static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();

struct Embedder;

const SEND: &str = "send {\"texts\": [\"...\", ...]} or {\"text\": \"...\"} as JSON";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    texts: Option<Vec<String>>,
    text: Option<String>,
}

#[derive(Serialize)]
struct Answer {
    embeddings: Vec<Vec<f32>>,
    model: String,
    tokens: Vec<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_model")]
    model: String,
    #[serde(default = "default_max_texts")]
    max_texts: usize,
    #[serde(default = "default_tokenizer")]
    tokenizer: String,
}

fn default_model() -> String {
    "all-MiniLM-L6-v2".into()
}
fn default_max_texts() -> usize {
    64
}
fn default_tokenizer() -> String {
    "assets/tokenizer.json".into()
}

/// The tokenizer: parsed by `init`, or here on first use where `init` has not run
/// (`nnserve bundle run`).
fn tokenizer(config: &Config) -> Result<&'static Tokenizer, Error> {
    if let Some(t) = TOKENIZER.get() {
        return Ok(t);
    }
    let json = host::asset(&config.tokenizer)?;
    let parsed = Tokenizer::from_bytes(&json).map_err(|e| {
        Error::internal(format!(
            "{} is not a tokenizer this plugin can load: {e}",
            config.tokenizer
        ))
    })?;
    Ok(TOKENIZER.get_or_init(|| parsed))
}

impl Handler for Embedder {
    fn init() -> Result<(), Error> {
        let config: Config = nnserve_sdk::config()?;
        tokenizer(&config).map(|_| ())
    }

    fn handle(req: Request) -> Result<Response, Error> {
        let config: Config = nnserve_sdk::config()?;
        let body: Body = serde_json::from_slice(&req.body)
            .map_err(|e| Error::bad_request(format!("{SEND}: {e}")))?;
        let texts = match (body.texts, body.text) {
            (Some(t), None) => t,
            (None, Some(t)) => vec![t],
            _ => return Err(Error::bad_request(SEND)),
        };
        if texts.is_empty() {
            return Err(Error::bad_request(
                "\"texts\" is empty: send at least one text",
            ));
        }
        if texts.len() > config.max_texts {
            return Err(Error::bad_request(format!(
                "{} texts in one request; at most {} (send the rest in another request)",
                texts.len(),
                config.max_texts
            )));
        }
        let started = Instant::now();
        let tokenizer = tokenizer(&config)?;
        let encodings = tokenizer
            .encode_batch(texts, true)
            .map_err(|e| Error::bad_request(format!("cannot tokenise the text: {e}")))?;
        let tokens: Vec<usize> = encodings.iter().map(|e| e.len()).collect();
        let tokenized = Instant::now();
        let (embeddings, forward) = embed(&encodings, &tokens)?;
        let pooled = Instant::now();
        // Where the time went, as the W3C Server-Timing header says it (ms): bench/minilm.py
        // reads it, and so can a browser's or a client's tools.
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let timing = format!(
            "tokenize;dur={:.3}, model;dur={:.3}, pool;dur={:.3}",
            ms(tokenized - started),
            ms(forward),
            ms(pooled - tokenized - forward)
        );
        Ok(Response::json(&Answer {
            embeddings,
            model: config.model,
            tokens,
        })?
        .with_header("server-timing", &timing))
    }
}

/// One forward for all texts, padded to the longest; mean pooling and normalisation.
/// Also gives the time the model took (its queue included).
fn embed(
    encodings: &[tokenizers::Encoding],
    lengths: &[usize],
) -> Result<(Vec<Vec<f32>>, Duration), Error> {
    let n = encodings.len();
    let longest = lengths.iter().copied().max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; n * longest];
    let mut mask = vec![0i64; n * longest];
    for (row, e) in encodings.iter().enumerate() {
        for (t, &id) in e.get_ids().iter().enumerate() {
            ids[row * longest + t] = id as i64;
            mask[row * longest + t] = 1;
        }
    }
    let shape = [n as u32, longest as u32];
    let before = Instant::now();
    let out = Model::load()?.infer(vec![
        ("input_ids".into(), Tensor::i64(&shape, &ids)),
        ("attention_mask".into(), Tensor::i64(&shape, &mask)),
    ])?;
    let forward = before.elapsed();
    let (_, hidden) = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("the model returned no output"))?;
    let dims = hidden.shape.clone();
    if dims.len() != 3 || dims[0] as usize != n || dims[1] as usize != longest {
        return Err(Error::internal(format!(
            "the model returned token embeddings of shape {dims:?}, not [{n}, {longest}, dim]"
        )));
    }
    let dim = dims[2] as usize;
    let values = hidden.to_f32()?;
    let embeddings = (0..n)
        .map(|row| {
            let mut sum = vec![0f32; dim];
            for t in 0..lengths[row] {
                let at = (row * longest + t) * dim;
                for (s, v) in sum.iter_mut().zip(&values[at..at + dim]) {
                    *s += v;
                }
            }
            let count = lengths[row].max(1) as f32;
            let mean: Vec<f32> = sum.iter().map(|s| s / count).collect();
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            mean.iter().map(|v| v / norm).collect()
        })
        .collect();
    Ok((embeddings, forward))
}

export_handler!(Embedder);
