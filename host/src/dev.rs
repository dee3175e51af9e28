//! `nnserve dev DIR`: the edit-run loop. DIR (a plugin crate from `nnserve plugin new`,
//! or a plain bundle directory) is served on a local port; when its files change, a
//! crate is rebuilt (`cargo build --release`) and the bundle is staged again into the
//! served repository, where the server's poller reloads the same version in place
//! (`lifecycle::manager_edits`). A build that fails is shown and the last good build
//! keeps serving.

use crate::config::{Management, ServerConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the sources are looked at, and the served repository polled.
const POLL: Duration = Duration::from_millis(250);

/// Serves `dir` on `listen` until ctrl-c or SIGTERM, rebuilding and reloading on change.
pub fn run(dir: &Path, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    anyhow::ensure!(
        dir.join("bundle.toml").is_file(),
        "{} has no bundle.toml: give a plugin crate (`nnserve plugin new`) or a bundle directory",
        dir.display()
    );
    let is_crate = dir.join("Cargo.toml").is_file();
    let text = std::fs::read_to_string(dir.join("bundle.toml"))?;
    let manifest = crate::bundle::parse_manifest(&text).map_err(anyhow::Error::msg)?;
    let (name, version) = (manifest.bundle.name.clone(), manifest.bundle.version);
    let repo = tempfile::Builder::new().prefix("nnserve-dev-").tempdir()?;
    let served = repo.path().join(&name).join(version.to_string());
    std::fs::create_dir_all(served.parent().expect("has a parent"))?;
    if is_crate {
        build(&dir)?;
        stage_into(&dir, &served)?;
    } else {
        // A plain bundle is served where it is: its edits are the server's to see.
        std::os::unix::fs::symlink(&dir, &served)?;
    }
    let config = ServerConfig {
        repository: repo.path().to_path_buf(),
        listen,
        poll_interval_ms: POLL.as_millis() as u64,
        management: Some(Management::Open),
        readiness: crate::config::Readiness::Any,
        ..Default::default()
    };
    anyhow::ensure!(
        config.loopback_only(),
        "nnserve dev serves with the management API open: listen on a loopback address"
    );
    if is_crate {
        let (dir, served) = (dir.clone(), served.clone());
        std::thread::Builder::new()
            .name("nnserve-dev-watch".into())
            .spawn(move || watch(&dir, &served))?;
    }
    eprintln!(
        "nnserve dev: {name}@{version} from {}; {} on change, reloaded in place (ctrl-c stops)",
        dir.display(),
        if is_crate {
            "rebuilt and staged"
        } else {
            "served"
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads())
        .enable_all()
        .build()?;
    let result = runtime.block_on(crate::server::run(config));
    drop(repo); // the staged copy goes; the crate is untouched
                // Not dropped: a cut forward may still run on its thread (see `main`'s exit).
    std::mem::forget(runtime);
    result
}

/// The sources whose change means a rebuild: everything but `target/` and dot-files.
fn sources(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || (d == dir && name == "target") {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if let Ok(t) = meta.modified() {
                out.push((e.path(), t, meta.len()));
            }
        }
    }
    out.sort();
    out
}

fn watch(dir: &Path, served: &Path) {
    let mut seen = sources(dir);
    loop {
        std::thread::sleep(POLL);
        let now = sources(dir);
        if now == seen {
            continue;
        }
        let started = Instant::now();
        match build(dir).and_then(|()| stage_into(dir, served)) {
            Ok(()) => eprintln!(
                "nnserve dev: rebuilt and staged in {:.1} s; the server reloads it",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("nnserve dev: {e:#}; the last good build keeps serving"),
        }
        // What the build itself wrote (Cargo.lock) is not a change of the sources.
        seen = sources(dir);
    }
}

/// `cargo build --release` in the crate, its output on this process's stderr.
fn build(dir: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["build", "--release"])
        .current_dir(dir)
        .stdout(std::process::Stdio::inherit())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run cargo: {e} (install Rust: https://rustup.rs)"))?;
    anyhow::ensure!(status.success(), "cargo build --release failed");
    Ok(())
}

/// Replaces the served version's files with the crate's staged bundle. Files are
/// written beside and renamed in, so the poller never loads half a file; it reloads
/// once the directory has stopped changing.
fn stage_into(dir: &Path, served: &Path) -> anyhow::Result<()> {
    let staged = crate::scaffold::stage(dir)?
        .ok_or_else(|| anyhow::anyhow!("{} is not a plugin crate", dir.display()))?;
    let files = crate::archive::list_files(staged.path())?;
    std::fs::create_dir_all(served)?;
    for (rel, _) in &files {
        let to = served.join(rel);
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        let tmp = to.with_extension("staging");
        std::fs::copy(staged.path().join(rel), &tmp)?;
        std::fs::rename(&tmp, &to)?;
    }
    // Files the bundle no longer has leave the served copy too.
    let keep: std::collections::BTreeSet<&String> = files.iter().map(|(r, _)| r).collect();
    for (rel, _) in crate::archive::list_files(served)? {
        if !keep.contains(&rel) {
            let _ = std::fs::remove_file(served.join(&rel));
        }
    }
    Ok(())
}
