//! What a plugin's store holds while one call runs ([`PluginState`]), and the `host`
//! interface it serves from it: the log (bounded per call), the bundle's config and its
//! assets, read once at load.
//!
//! It grants nothing by itself: what a plugin may import is the linker's (`engine`).

use super::limits::{CpuMeter, Limiter};
use crate::nn::NnCtx;
use crate::wit::nnserve::plugin::host as host_api;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// What a store holds while one request runs.
pub struct PluginState {
    pub(super) table: ResourceTable,
    pub(super) wasi: WasiCtx,
    pub(super) limits: Limiter,
    pub(super) log: LogBudget,
    pub(super) nn: NnCtx,
    pub(super) host: Arc<HostInfo>,
    pub(super) cpu: CpuMeter,
    pub(super) cpu_budget: Duration,
    pub(super) cpu_exhausted: bool,
    /// The call's stdout and stderr, while debug logging wants them.
    pub(super) output: Option<super::output::Output>,
    /// What the SDK's panic hook reported just before the trap: message and location.
    pub(super) panic: Option<(String, Option<String>)>,
}

/// What the `host` interface serves: config and assets of one bundle. Assets are read
/// once at load, so requests never touch the file system.
pub(super) struct HostInfo {
    pub(super) plugin: String,
    pub(super) config: BTreeMap<String, String>,
    /// The config table as one JSON object.
    pub(super) config_json: String,
    pub(super) assets: BTreeMap<String, Vec<u8>>,
}

/// The most asset bytes a bundle may hold (they are kept in memory).
const MAX_ASSET_BYTES: u64 = 256 << 20;

/// Reads every file under `<bundle>/assets/`, keyed by its path from the bundle root.
pub(super) fn read_assets(bundle_dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let root = bundle_dir.join("assets");
    if !root.is_dir() {
        return Ok(out);
    }
    let mut total = 0u64;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path
                .strip_prefix(bundle_dir)?
                .to_string_lossy()
                .into_owned();
            // Follows symlinks only when they stay inside the bundle.
            let real = crate::bundle::resolve_inside(bundle_dir, &rel)
                .map_err(|e| anyhow::anyhow!("asset `{rel}`: {e}"))?;
            if real.is_dir() {
                stack.push(path);
            } else if real.is_file() {
                let bytes = std::fs::read(&real)?;
                total += bytes.len() as u64;
                anyhow::ensure!(
                    total <= MAX_ASSET_BYTES,
                    "the bundle's assets exceed {} MiB",
                    MAX_ASSET_BYTES >> 20
                );
                out.insert(rel, bytes);
            }
        }
    }
    Ok(out)
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_io::IoView for PluginState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

/// Log lines one request (or one router call) of a plugin may write; past it lines are
/// dropped and counted, and the count is logged once the call ends. A looping plugin
/// wrote 1.3 GB of log in 30 s before this.
pub const LOG_LINES_PER_CALL: u32 = 64;

/// The longest log line a plugin may write, bytes; longer ones are cut, with their length.
pub const LOG_LINE_BYTES: usize = 4096;

/// One call's log lines: written and dropped.
#[derive(Debug, Default)]
pub(super) struct LogBudget {
    written: u32,
    dropped: u32,
}

impl PluginState {
    /// Logs, once a call ends, how many of its log lines were dropped; resets the count.
    pub(super) fn flush_log(&mut self) {
        if self.log.dropped > 0 {
            tracing::warn!(
                plugin = %self.host.plugin,
                "dropped {} log lines of one call (at most {LOG_LINES_PER_CALL} per call)",
                self.log.dropped
            );
        }
        self.log = LogBudget::default();
        if let Some(output) = &self.output {
            output.flush(&self.host.plugin);
        }
    }
}

/// The longest panic message kept (it reaches the log whole, the client shortened).
const MAX_PANIC_BYTES: usize = 4096;

impl host_api::Host for PluginState {
    fn log(&mut self, level: host_api::LogLevel, message: String) -> wasmtime::Result<()> {
        if self.log.written >= LOG_LINES_PER_CALL {
            self.log.dropped += 1;
            return Ok(());
        }
        self.log.written += 1;
        // A newline in a message would forge a log line of its own: escaped.
        let message = crate::names::log_safe(&message, LOG_LINE_BYTES);
        let plugin = &self.host.plugin;
        match level {
            host_api::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host_api::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host_api::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host_api::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host_api::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }

    fn panicked(&mut self, message: String, location: Option<String>) -> wasmtime::Result<()> {
        // Kept for the trap that follows; a second report (a panic while panicking)
        // does not replace the first.
        if self.panic.is_none() {
            self.panic = Some((
                crate::names::log_safe(&message, MAX_PANIC_BYTES),
                location.map(|l| crate::names::log_safe(&l, 512)),
            ));
        }
        Ok(())
    }

    fn config_json(&mut self) -> wasmtime::Result<String> {
        Ok(self.host.config_json.clone())
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.host.config.get(&key).cloned())
    }

    fn config_entries(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self
            .host
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn read_asset(&mut self, path: String) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let key = path.trim_start_matches("./");
        Ok(match self.host.assets.get(key) {
            Some(bytes) => Ok(bytes.clone()),
            None if !key.starts_with("assets/") => {
                Err(format!("`{path}`: only files under assets/ can be read"))
            }
            None => Err(format!("`{path}` is not a file in the bundle's assets/")),
        })
    }
}
