//! Server configuration: one typed struct, defaults in one place, read from an optional
//! TOML file (`--config nnserve.toml`) and overridden by command-line flags.
//! Documented in `docs/configuration.md`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The model repository: `<repository>/<model>/<version>/bundle.toml`.
    pub repository: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Wall-clock deadline of a request (queueing, plugin, forward), ms. Clients may
    /// lower it per request with the `x-nnserve-timeout-ms` header.
    pub request_timeout_ms: u64,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
    /// libtorch intra-op threads (parallelism inside one forward). 0: one per core.
    /// Unset (the default): per model version, 1 when its batch-1 forward at warm-up took
    /// under 1 ms, else the cores shared among the compute-bound forwards running at that
    /// moment (`backend::threading`). Measured on 2 cores: a second thread made digits
    /// slower (p50 609 vs 443 us over HTTP) and did not help mlp, while ResNet-18 at 16
    /// clients served 0.986 (median) of the raw limit this way; see docs/configuration.md.
    pub torch_intra_op_threads: Option<usize>,
    /// libtorch inter-op threads. Set once per process.
    pub torch_inter_op_threads: usize,
    /// Plugin instances that may run at once, over all plugins; beyond it requests get
    /// 503 with Retry-After.
    pub plugin_instance_slots: u32,
    /// The largest memory cap a bundle's plugin may ask for, MiB (its linear memory, and
    /// the host memory its tensors take).
    pub plugin_max_memory_mib: u64,
    /// The largest CPU budget per request a bundle's plugin may ask for, ms.
    pub plugin_max_cpu_ms: u64,
    /// All plugin memory together, MiB: the linear memories of every running instance
    /// and the host memory their tensors take. A plugin that would go past it traps with
    /// a 503 (retry). 0: a quarter of the machine's memory, at least 256 MiB.
    pub plugin_memory_total_mib: u64,
    /// Largest answer the server builds, bytes (tensor APIs, plugin bodies); checked
    /// before the answer is built.
    pub max_response_bytes: usize,
    /// Uploads unpacked and checked at once; more wait their turn (never refused for it).
    pub max_concurrent_uploads: usize,
    /// Tokio worker threads for HTTP and plugins. 0: one per core.
    pub http_threads: usize,
    /// Largest bundle archive accepted by an upload, bytes.
    pub max_upload_bytes: u64,
    /// Bearer token the management API requires (uploads); none: no token needed.
    /// Inference routes never need it.
    pub admin_token: Option<String>,
    /// Version policy `latest = N` for models without their own: the newest N versions
    /// of each model stay loaded.
    pub latest_versions: usize,
    /// Per-model version policies: `name = "all"`, `{ latest = N }` or `{ specific = [..] }`.
    pub policies: std::collections::BTreeMap<String, toml::Value>,
    /// How often the repository is scanned for versions copied in or removed by hand, ms
    /// (0: never). A new version directory is loaded once it has not changed for a full
    /// interval.
    pub poll_interval_ms: u64,
    /// Memory budgets per device in MiB (`cpu = 8192`, `"cuda:0" = 70000`); a load that
    /// would exceed its device's budget is refused. Devices not named have none.
    pub device_memory_mib: std::collections::BTreeMap<String, u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            repository: PathBuf::from("repository"),
            listen: "127.0.0.1:8080".parse().unwrap(),
            request_timeout_ms: 30_000,
            max_request_bytes: 64 << 20,
            torch_intra_op_threads: None,
            torch_inter_op_threads: 1,
            plugin_instance_slots: 256,
            plugin_max_memory_mib: 512,
            plugin_max_cpu_ms: 60_000,
            plugin_memory_total_mib: 0,
            max_response_bytes: 256 << 20,
            max_concurrent_uploads: 2,
            http_threads: 0,
            max_upload_bytes: 4 << 30,
            admin_token: None,
            latest_versions: 1,
            policies: Default::default(),
            poll_interval_ms: 2000,
            device_memory_mib: Default::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a config file; unknown keys are errors that name them.
    pub fn from_file(path: &Path) -> anyhow::Result<ServerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        let c: ServerConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        c.check()
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        Ok(c)
    }

    /// What serde cannot check: the device names of `device_memory_mib` are the ones
    /// versions report (`cpu`, `cuda:N`), so that no budget is silently never applied.
    pub fn check(&self) -> anyhow::Result<()> {
        for device in self.device_memory_mib.keys() {
            let ok = device == "cpu"
                || device
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| format!("cuda:{n}") == *device);
            if !ok {
                anyhow::bail!(
                    "device_memory_mib names device '{device}'; budgets are per device as \
                     versions run on it: \"cpu\" or \"cuda:N\" (write \"cuda:0\" for the first GPU)"
                );
            }
        }
        Ok(())
    }

    /// All plugin memory together, bytes (`plugin_memory_total_mib`, or its default).
    pub fn plugin_memory_total_bytes(&self) -> u64 {
        if self.plugin_memory_total_mib > 0 {
            return self.plugin_memory_total_mib.saturating_mul(1 << 20);
        }
        // SAFETY: sysconf has no memory effects.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let physical = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
        (physical / 4).max(256 << 20)
    }

    pub fn cores() -> usize {
        crate::backend::cores()
    }

    /// The intra-op threads every version uses, or `None` for the per-version choice.
    pub fn intra_op_threads(&self) -> Option<usize> {
        match self.torch_intra_op_threads {
            Some(0) => Some(Self::cores()),
            other => other,
        }
    }

    /// The version policies, checked.
    pub fn policies(&self) -> anyhow::Result<crate::lifecycle::Policies> {
        let mut per_model = std::collections::BTreeMap::new();
        for (model, v) in &self.policies {
            let p = crate::lifecycle::VersionPolicy::from_toml(v)
                .map_err(|e| anyhow::anyhow!("policies.{model}: {e}"))?;
            per_model.insert(model.clone(), p);
        }
        Ok(crate::lifecycle::Policies {
            default: crate::lifecycle::VersionPolicy::Latest(self.latest_versions.max(1)),
            per_model,
        })
    }

    pub fn worker_threads(&self) -> usize {
        if self.http_threads == 0 {
            Self::cores()
        } else {
            self.http_threads
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: ServerConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\nrequest_timeout_ms = 5").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.request_timeout_ms, 5);
        assert_eq!(c.max_request_bytes, 64 << 20);
        let err = toml::from_str::<ServerConfig>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn memory_budgets_name_devices_as_versions_report_them() {
        let parse = |t: &str| toml::from_str::<ServerConfig>(t).unwrap().check();
        assert!(parse("[device_memory_mib]\ncpu = 8\n\"cuda:0\" = 70000\n\"cuda:12\" = 1").is_ok());
        for bad in [
            "cuda", "cuda0", "gpu", "cuda:", "cuda:x", "CPU", "cuda:01", "cuda:+1",
        ] {
            let err = parse(&format!("[device_memory_mib]\n\"{bad}\" = 8"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains("cuda:0"),
                "{err}"
            );
        }
    }
}
