//! `nnserve bundle run`: one request through a bundle, in process, with no server and no
//! port. The bundle (a directory or an archive) is loaded exactly as a server loads a
//! version (checks, model, plugin, warm-up), the request goes through the same request
//! path (`api`), and the answer is printed: status, headers, body. The plugin's log and
//! its stdout and stderr are on stderr (log filter
//! `warn,nnserve::plugin::host=trace,nnserve::plugin::output=debug` unless `--log` or
//! `RUST_LOG` says otherwise).
//!
//! A bundle with a handler is called at `POST /v1/models/NAME:infer` with the body as
//! it is; one without, at `:predict` with the body as a TF Serving JSON request.

use crate::config::{Management, ServerConfig};
use std::io::Write;
use std::path::Path;

/// What to send.
pub struct Call {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
}

/// The answer, as printed.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Loads the bundle at `path` and runs `call` through it.
pub fn run(path: &Path, call: Call) -> anyhow::Result<Answer> {
    let scratch = tempfile::tempdir()?;
    let staged = crate::scaffold::stage(path)?;
    let dir = if let Some(s) = &staged {
        s.path().to_path_buf()
    } else if path.is_dir() {
        path.to_path_buf()
    } else {
        let file = std::fs::File::open(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open {}: {e} (give a bundle directory or a .tar.gz)",
                path.display()
            )
        })?;
        let dest = scratch.path().join("bundle");
        std::fs::create_dir(&dest)?;
        crate::archive::unpack(
            std::io::BufReader::new(file),
            &dest,
            &crate::archive::Limits::default(),
        )
        .map_err(|reasons| {
            anyhow::anyhow!("invalid archive {}: {}", path.display(), reasons.join("; "))
        })?;
        dest
    };
    anyhow::ensure!(
        dir.join("bundle.toml").is_file(),
        "{} has no bundle.toml: give a bundle directory (or its archive from `nnserve bundle pack`)",
        dir.display()
    );
    let config = ServerConfig {
        repository: dir,
        poll_interval_ms: 0,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        crate::backend::init_threads(config.intra_op_threads(), config.torch_inter_op_threads);
        let assembled = crate::server::assemble(&config, None, Management::Off)?;
        let report = assembled.manager.load_repository().await?;
        if let Some(failed) = report.failed.first() {
            anyhow::bail!("the bundle does not load: {failed}");
        }
        let state = assembled.state;
        let name = state
            .registry
            .model_names()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("the bundle loaded no model"))?;
        let version = crate::api::resolve_model(&state, &name, None, None)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (verb, path) = if version.bundle.manifest.handler.is_some() {
            (
                crate::api::Verb::Infer {
                    rest: format!("{name}:infer"),
                },
                format!("/v1/models/{name}:infer"),
            )
        } else {
            (
                crate::api::Verb::Predict,
                format!("/v1/models/{name}:predict"),
            )
        };
        let mut headers = axum::http::HeaderMap::new();
        if let Some(ct) = &call.content_type {
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_str(ct)
                    .map_err(|_| anyhow::anyhow!("--content-type {ct:?} is not a header value"))?,
            );
        }
        let response = match crate::api::serve_inference(
            &state,
            &name,
            None,
            None,
            verb,
            axum::http::Method::POST,
            &path,
            headers,
            call.body.into(),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => axum::response::IntoResponse::into_response(e),
        };
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await?;
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        })
    })
}

/// Prints the answer as an HTTP client would show it.
pub fn print(answer: &Answer, out: &mut impl Write) -> std::io::Result<()> {
    let reason = axum::http::StatusCode::from_u16(answer.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    writeln!(out, "{} {reason}", answer.status)?;
    for (k, v) in &answer.headers {
        writeln!(out, "{k}: {v}")?;
    }
    writeln!(out)?;
    out.write_all(&answer.body)?;
    if !answer.body.ends_with(b"\n") {
        writeln!(out)?;
    }
    Ok(())
}
