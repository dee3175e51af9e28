//! The `nnserve bundle` commands: `pack` (check, then a deterministic `.tar.gz`),
//! `inspect` (what a bundle holds, from a directory or an archive) and `push` (upload an
//! archive to a running server's management API).
//!
//! A client of the server's formats (`bundle`, `archive`, `plugin::describe`); it never
//! reaches into a running server's state.

use crate::archive::{self, Limits};
use crate::bundle::Bundle;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Checks a bundle directory and packs it; returns the line to print.
pub fn pack(dir: &Path, out: Option<&Path>) -> anyhow::Result<String> {
    // A plugin crate packs as the bundle it stands for: no sources, no target/.
    let staged = crate::scaffold::stage(dir)?;
    let dir = staged.as_ref().map_or(dir, |s| s.path());
    if !dir.join("bundle.toml").is_file() && dir.join("saved_model.pb").is_file() {
        // Served as it is from a repository, but an archive is named by its manifest.
        anyhow::bail!(
            "{} is a TF Serving version directory without bundle.toml: the server serves it as it \
             is from a repository, but an uploaded archive needs a bundle.toml naming the model and \
             version (docs/bundle.md, \"TensorFlow models\": backend = \"tensorflow\", path = \".\")",
            dir.display()
        );
    }
    let bundle = Bundle::open(dir)?;
    let plugin_problems = check_plugins(&bundle);
    if !plugin_problems.is_empty() {
        anyhow::bail!(
            "invalid bundle {}: {}",
            dir.display(),
            plugin_problems.join("; ")
        );
    }
    let out: PathBuf = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}.tar.gz", bundle.name(), bundle.version())));
    let total: u64 = archive::list_files(dir)?.iter().map(|(_, m)| m.len()).sum();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("packing {bar:40} {bytes}/{total_bytes} ({eta})")
            .expect("a valid template"),
    );
    // Write beside the target and rename, so a failed pack leaves no half archive.
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    archive::pack(dir, std::io::BufWriter::new(file), |n| bar.set_position(n))?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, &out)?;
    let size = std::fs::metadata(&out)?.len();
    Ok(format!(
        "packed {}@{} into {}: {size} bytes, digest {}",
        bundle.name(),
        bundle.version(),
        out.display(),
        archive::digest(dir)?
    ))
}

/// Every plugin's import and export check (the server repeats it, with the model load).
fn check_plugins(bundle: &Bundle) -> Vec<String> {
    let mut problems = Vec::new();
    for (world, spec) in bundle.manifest.plugins() {
        let export = if world == "router" { "route" } else { "handle" };
        match crate::plugin::describe(&bundle.file(&spec.path)) {
            Ok(d) if !crate::plugin::refused_imports(&d.imports, world).is_empty() => problems
                .push(format!(
                    "{world} {} imports {}, which nnserve does not grant to a {world}",
                    spec.path,
                    crate::plugin::refused_imports(&d.imports, world).join(", ")
                )),
            Ok(d) if !d.exports.iter().any(|e| e == export) => problems.push(format!(
                "{world} {} does not export `{export}` (world nnserve:plugin/{world})",
                spec.path
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{world} {}: {e:#}", spec.path)),
        }
    }
    problems
}

/// Describes a bundle directory or `.tar.gz` archive.
pub fn inspect(path: &Path) -> anyhow::Result<String> {
    if let Some(staged) = crate::scaffold::stage(path)? {
        return describe_dir(staged.path());
    }
    if path.is_dir() {
        return describe_dir(path);
    }
    let scratch = tempfile::tempdir()?;
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    archive::unpack(
        std::io::BufReader::new(file),
        scratch.path(),
        &Limits::default(),
    )
    .map_err(|reasons| {
        anyhow::anyhow!("invalid archive {}: {}", path.display(), reasons.join("; "))
    })?;
    describe_dir(scratch.path())
}

fn describe_dir(dir: &Path) -> anyhow::Result<String> {
    let mut s = String::new();
    let bundle = Bundle::open(dir);
    let files = archive::list_files(dir)?;
    match &bundle {
        Ok(b) => {
            let m = &b.manifest;
            writeln!(s, "bundle   {}@{}", m.bundle.name, m.bundle.version)?;
            if let Some(model) = &m.model {
                writeln!(
                    s,
                    "model    {:?} {} on {}",
                    model.backend, model.path, model.device
                )?;
                for (kind, list) in [("input ", &model.inputs), ("output", &model.outputs)] {
                    for t in list.iter() {
                        writeln!(s, "  {kind} {} {} {:?}", t.name, t.dtype, t.shape)?;
                    }
                }
            }
            if let Some(bt) = &m.batching {
                writeln!(
                    s,
                    "batching max_batch_size {}, allowed {:?}, timeout {} us",
                    bt.max_batch_size, bt.allowed_batch_sizes, bt.batch_timeout_micros
                )?;
            }
            if let Some(e) = &m.endpoint {
                writeln!(
                    s,
                    "endpoint routing key {}, on router error {}, default variant {}, stats window {} ms",
                    e.routing_key_header.as_deref().unwrap_or("-"),
                    e.on_router_error.as_str(),
                    e.default_variant
                        .as_deref()
                        .or(m.variants.first().map(|v| v.name()))
                        .unwrap_or("-"),
                    e.stats_window_ms
                )?;
                for v in &m.variants {
                    let pin = match (&v.version, &v.label) {
                        (Some(n), _) => format!(" version {n}"),
                        (_, Some(l)) => format!(" label {l}"),
                        _ => String::new(),
                    };
                    writeln!(
                        s,
                        "  variant {} = model {}{pin}, weight {}",
                        v.name(),
                        v.model,
                        v.weight
                    )?;
                }
            }
            for (world, h) in m.plugins() {
                writeln!(
                    s,
                    "{world:<8} {} (memory {} MiB, cpu {} ms)",
                    h.path, h.limits.memory_mib, h.limits.cpu_ms
                )?;
                for (k, v) in &h.config_strings() {
                    writeln!(s, "  config {k} = {v:?}")?;
                }
                match crate::plugin::describe(&b.file(&h.path)) {
                    Ok(d) => {
                        writeln!(s, "  exports {}", d.exports.join(", "))?;
                        if let Some(start) = d.initial_memory {
                            let hint = if start < crate::plugin::SMALL_INITIAL_MEMORY {
                                format!(
                                    " (small: link with {}, docs/plugins.md)",
                                    crate::plugin::INITIAL_MEMORY_FLAG
                                )
                            } else {
                                String::new()
                            };
                            writeln!(s, "  initial memory {} KiB{hint}", start >> 10)?;
                        }
                        let refused = crate::plugin::refused_imports(&d.imports, world);
                        for i in &d.imports {
                            let mark = if refused.contains(i) {
                                "  (NOT GRANTED)"
                            } else {
                                ""
                            };
                            writeln!(s, "  imports {i}{mark}")?;
                        }
                    }
                    Err(e) => writeln!(s, "  not a valid component: {e:#}")?,
                }
            }
        }
        Err(e) => writeln!(s, "INVALID  {}", e.reasons.join("\n         "))?,
    }
    writeln!(s, "files")?;
    let mut total = 0;
    for (rel, meta) in &files {
        total += meta.len();
        writeln!(s, "  {:>12}  {rel}", meta.len())?;
    }
    writeln!(s, "  {total:>12}  total in {} files", files.len())?;
    writeln!(s, "digest   {}", archive::digest(dir)?)?;
    Ok(s)
}

/// Uploads an archive; returns the line to print.
pub fn push(file: &Path, server: &str, token: Option<&str>) -> anyhow::Result<String> {
    // The model's name comes from the archive itself (checked again by the server).
    let scratch = tempfile::tempdir()?;
    let f = std::fs::File::open(file)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
    archive::unpack(
        std::io::BufReader::new(f),
        scratch.path(),
        &Limits::default(),
    )
    .map_err(|r| anyhow::anyhow!("invalid archive {}: {}", file.display(), r.join("; ")))?;
    let bundle = Bundle::open(scratch.path())?;
    let url = format!(
        "{}/v1/models/{}/versions",
        server.trim_end_matches('/'),
        bundle.name()
    );

    let size = std::fs::metadata(file)?.len();
    let bar = indicatif::ProgressBar::new(size).with_style(
        indicatif::ProgressStyle::with_template("uploading {bar:40} {bytes}/{total_bytes} ({eta})")
            .expect("a valid template"),
    );
    let mut reader = bar.wrap_read(std::fs::File::open(file)?);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    // A refusal before the body is read (a wrong token) closes the connection while we
    // would still be sending, so ask first with an empty body: 401 means the token,
    // anything else (an empty archive is a 400) means go ahead.
    let mut probe = agent.post(&url);
    if let Some(a) = &auth {
        probe = probe.header("authorization", a);
    }
    let mut answer = probe.send_empty().map_err(|e| {
        anyhow::anyhow!("cannot reach {url}: {e} (is the server running? check --server)")
    })?;
    if answer.status().as_u16() == 401 {
        let body = answer.body_mut().read_to_string().unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        anyhow::bail!(
            "the server refused the bundle (401): {} (pass --token)",
            json["error"].as_str().unwrap_or(body.trim())
        );
    }
    let mut req = agent.post(&url).header("content-type", "application/gzip");
    if let Some(a) = &auth {
        req = req.header("authorization", a);
    }
    let mut resp = req.send(ureq::SendBody::from_reader(&mut reader)).map_err(|e| {
        anyhow::anyhow!(
            "the upload to {url} broke off: {e} (the server closes the connection when an archive is over its max_upload_bytes)"
        )
    })?;
    bar.finish_and_clear();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    match status {
        200 | 201 => {
            let mut line = format!(
                "{} {}@{} digest {}",
                if status == 201 {
                    "stored"
                } else {
                    "already stored"
                },
                json["name"].as_str().unwrap_or("?"),
                json["version"],
                json["digest"].as_str().unwrap_or("?")
            );
            if let Some(state) = json["state"].as_str() {
                line.push_str(&format!(", {state}"));
            }
            // The server says why a stored version does not serve (its version policy).
            if let Some(note) = json["note"].as_str() {
                line.push_str(&format!("\n{note}"));
            }
            Ok(line)
        }
        _ => anyhow::bail!(
            "the server refused the bundle ({status}): {}",
            json["error"].as_str().unwrap_or(body.trim())
        ),
    }
}
