//! Server configuration: one typed struct, defaults in one place, read from an optional
//! TOML file (`--config nnserve.toml`) and overridden by command-line flags.
//! Documented in `docs/configuration.md`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A secret from the config: never shown by `Debug` (so it cannot reach a log line).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

/// Who may use the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Management {
    /// No management route at all (for images and manifests: the repository is the truth).
    Off,
    /// The admin token is required.
    Token,
    /// No token needed (a loopback listener for development).
    Open,
}

impl Management {
    pub fn as_str(self) -> &'static str {
        match self {
            Management::Off => "off",
            Management::Token => "token",
            Management::Open => "open",
        }
    }
}

/// When `/v2/health/ready` turns true (`api::probe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// Every version found at start has loaded (a failed one keeps the server unready
    /// until its model has a version available again).
    All,
    /// A version of any model is available (the others may still be loading).
    Any,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The model repository: `<repository>/<model>/<version>/bundle.toml`, or an object
    /// store with the same layout, `s3://bucket/prefix` (docs/object-store.md).
    pub repository: PathBuf,
    /// With an object-store repository: this replica's local cache of it (locked).
    /// Default: per repository and free slot under the user's cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address of the gRPC listener (KServe v2 / Triton's `GRPCInferenceService` and
    /// `grpc.health.v1`); none by default, so that two servers never collide on a port.
    pub grpc_listen: Option<SocketAddr>,
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
    /// Freed plugin memory slots kept warm (their low 4 MiB resident, ready for the
    /// plugin that used them) at most; past it the least recently used warm slot is
    /// reused. Bounds what pool slots keep resident between requests.
    pub plugin_warm_slots: u32,
    /// The largest memory cap a bundle's plugin may ask for, MiB (its linear memory, and
    /// the host memory its tensors take).
    pub plugin_max_memory_mib: u64,
    /// The largest CPU budget per request a bundle's plugin may ask for, ms.
    pub plugin_max_cpu_ms: u64,
    /// All plugin memory together, MiB: the linear memories of every running instance
    /// and the host memory their tensors take. A plugin that would go past it traps with
    /// a 503 (retry). 0: a quarter of the machine's memory (or of the container's cgroup
    /// limit), at least 256 MiB.
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
    /// Inference routes never need it. Prefer `admin_token_file`: a flag shows in `ps`.
    pub admin_token: Option<Secret>,
    /// A file whose content (trailing newline stripped) is the admin token.
    pub admin_token_file: Option<PathBuf>,
    /// The management API (uploads, deletes, labels, Triton load/unload): `off` (no such
    /// route at all), `token` (the admin token required) or `open` (no token). Unset:
    /// `token` when a token is configured, `open` on a loopback listener without one; a
    /// non-loopback listener with neither refuses to start.
    pub management: Option<Management>,
    /// TLS for the listener: a PEM certificate chain and its private key.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A waiting connection that has begun a request must complete its headers within
    /// this many ms of the start of the wait (a fresh connection counts), ms.
    pub header_read_timeout_ms: u64,
    /// A connection idle between requests (nothing sent since the last answer) is closed
    /// after this many ms.
    pub keep_alive_timeout_ms: u64,
    /// A request body that stops arriving for this many ms fails (408).
    pub body_read_timeout_ms: u64,
    /// Open connections at most; 0: as many as fit below the file-descriptor limit
    /// (raised to its hard limit at start) with 256 to spare. At the cap the oldest
    /// waiting connection is closed to admit a new one.
    pub max_connections: usize,
    /// On SIGTERM or ctrl-c, requests in service get this long to finish, s.
    pub grace_seconds: u64,
    /// On SIGTERM, readiness turns false at once and the server keeps serving (new
    /// connections too) for this long before the shutdown of `grace_seconds` begins, s:
    /// load balancers and Kubernetes endpoints notice in the meantime.
    pub drain_seconds: u64,
    /// When the server reports ready: `all` start-up versions loaded, or `any`.
    pub readiness: Readiness,
    /// When the repository directory holds one model rather than a repository (a
    /// bundle, a TF Serving base path, a bare TorchScript file: what KServe's storage
    /// initializer leaves in /mnt/models): the model's name.
    pub model_name: Option<String>,
    /// A bare TorchScript file's inputs and outputs, `NAME:DTYPE:DIMS` each (e.g.
    /// `input:fp32:-1,4`).
    pub model_inputs: Vec<String>,
    pub model_outputs: Vec<String>,
    /// Version policy `latest = N` for models without their own: the newest N versions
    /// of each model stay loaded.
    pub latest_versions: usize,
    /// Per-model version policies: `name = "all"`, `{ latest = N }` or `{ specific = [..] }`,
    /// checked as the file is read.
    #[serde(deserialize_with = "crate::lifecycle::policy::deserialize_policies")]
    pub policies: std::collections::BTreeMap<String, crate::lifecycle::VersionPolicy>,
    /// How often the repository is scanned for versions copied in or removed by hand, ms
    /// (0: never). A new version directory is loaded once it has not changed for a full
    /// interval. With an object store: how often the bucket is listed, which is how the
    /// other replicas' uploads, deletes and label changes arrive.
    pub poll_interval_ms: u64,
    /// Memory budgets per device in MiB (`cpu = 8192`, `"cuda:0" = 70000`); a load that
    /// would exceed its device's budget is refused. Devices not named have none.
    pub device_memory_mib: std::collections::BTreeMap<String, u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            repository: PathBuf::from("repository"),
            cache_dir: None,
            listen: "127.0.0.1:8080".parse().unwrap(),
            grpc_listen: None,
            request_timeout_ms: 30_000,
            max_request_bytes: 64 << 20,
            torch_intra_op_threads: None,
            torch_inter_op_threads: 1,
            plugin_instance_slots: 256,
            plugin_warm_slots: 32,
            plugin_max_memory_mib: 512,
            plugin_max_cpu_ms: 60_000,
            plugin_memory_total_mib: 0,
            max_response_bytes: 256 << 20,
            max_concurrent_uploads: 2,
            http_threads: 0,
            max_upload_bytes: 4 << 30,
            admin_token: None,
            admin_token_file: None,
            management: None,
            tls_cert: None,
            tls_key: None,
            header_read_timeout_ms: 10_000,
            keep_alive_timeout_ms: 75_000,
            body_read_timeout_ms: 10_000,
            max_connections: 0,
            grace_seconds: 10,
            drain_seconds: 0,
            readiness: Readiness::All,
            model_name: None,
            model_inputs: Vec::new(),
            model_outputs: Vec::new(),
            latest_versions: 1,
            policies: Default::default(),
            poll_interval_ms: 2000,
            device_memory_mib: Default::default(),
        }
    }
}

/// A token must be printable ASCII without spaces: a client sends it in a header, where
/// anything else is refused or trimmed, and it could never match.
fn check_token(token: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        token.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "the admin token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
    );
    if token.len() < 16 {
        tracing::warn!(
            "the admin token is {} characters long; use at least 16 (e.g. `openssl rand -hex 32`)",
            token.len()
        );
    }
    Ok(())
}

/// Warns when others than the owner may read the token file (as ssh does for keys).
fn check_token_file_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "the admin token file {} can be read by others than its owner; `chmod 600` it",
                path.display()
            );
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
    /// versions report (`cpu`, `cuda:N`), so that no budget is silently never applied;
    /// TLS needs both files; timeouts are positive.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "TLS needs both --tls-cert and --tls-key"
        );
        for (key, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("keep_alive_timeout_ms", self.keep_alive_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ] {
            anyhow::ensure!(v > 0, "{key} must be positive");
        }
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

    /// The repository's URL when it is an object store (`s3://...`), else `None`.
    pub fn repository_url(&self) -> Option<&str> {
        self.repository
            .to_str()
            .filter(|r| crate::lifecycle::objects::is_url(r))
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
        // In a container the cgroup's limit is the machine (v2, then v1).
        let cgroup = [
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .min()
        .unwrap_or(u64::MAX);
        (physical.min(cgroup) / 4).max(256 << 20)
    }

    /// The admin token, from `admin_token` or the file `admin_token_file`.
    pub fn admin_token(&self) -> anyhow::Result<Option<String>> {
        match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both an admin token and an admin token file are given; keep one (the file keeps it out of `ps`)"
            ),
            (Some(t), None) => {
                anyhow::ensure!(!t.0.trim().is_empty(), "the admin token is empty");
                check_token(t.0.trim())?;
                Ok(Some(t.0.trim().to_string()))
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read the admin token file {}: {e}", path.display())
                })?;
                check_token_file_mode(path);
                let token = text.trim_start_matches('\u{feff}').trim();
                anyhow::ensure!(
                    !token.is_empty(),
                    "the admin token file {} is empty",
                    path.display()
                );
                check_token(token)?;
                Ok(Some(token.to_string()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Who may manage, as configured or by default (see `management`); refuses a
    /// non-loopback listener whose management would be open by default.
    pub fn management(&self, token: bool) -> anyhow::Result<Management> {
        match self.management {
            Some(Management::Token) if !token => anyhow::bail!(
                "--management token needs a token: give --admin-token-file PATH (or NNSERVE_ADMIN_TOKEN_FILE)"
            ),
            Some(m) => Ok(m),
            None if token => Ok(Management::Token),
            None if self.loopback_only() => Ok(Management::Open),
            None => anyhow::bail!(
                "refusing to listen on {} with the management API (uploads, deletes, labels) open to the network: \
                 give --admin-token-file PATH to require a token, or --management off to serve without it \
                 (--management open allows it without a token, on purpose)",
                self.exposed()
            ),
        }
    }

    /// Whether every listener (HTTP, and gRPC when on) is on a loopback address.
    pub fn loopback_only(&self) -> bool {
        self.listen.ip().is_loopback() && self.grpc_listen.is_none_or(|g| g.ip().is_loopback())
    }

    /// The first listener reachable from the network.
    fn exposed(&self) -> SocketAddr {
        match self.grpc_listen {
            Some(g) if self.listen.ip().is_loopback() => g,
            _ => self.listen,
        }
    }

    /// The connection policy (`connections::Limits`), with the fd limit raised.
    pub fn connection_limits(&self) -> crate::connections::Limits {
        let fit = crate::connections::connections_that_fit();
        let max_connections = match self.max_connections {
            0 => fit,
            n if n > fit => {
                tracing::warn!(
                    "max_connections = {n} does not fit below the file-descriptor limit; using {fit} (raise `ulimit -n`)"
                );
                fit
            }
            n => n,
        };
        crate::connections::Limits {
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            keep_alive_timeout: std::time::Duration::from_millis(self.keep_alive_timeout_ms),
            body_read_timeout: std::time::Duration::from_millis(self.body_read_timeout_ms),
            max_connections,
            grace: std::time::Duration::from_secs(self.grace_seconds),
        }
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

    /// The version policies: the per-model ones and `latest_versions` for the others.
    pub fn policies(&self) -> crate::lifecycle::Policies {
        crate::lifecycle::Policies {
            default: crate::lifecycle::VersionPolicy::Latest(self.latest_versions.max(1)),
            per_model: self.policies.clone(),
        }
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
    fn every_key_is_documented() {
        // The fields of `ServerConfig`, as this file declares them.
        let src = include_str!("config.rs");
        let body = src
            .split("pub struct ServerConfig {")
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .unwrap();
        let keys: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub ")?.split(':').next())
            .collect();
        assert!(
            keys.len() > 20 && keys.contains(&"plugin_warm_slots"),
            "{keys:?}"
        );
        let doc = include_str!("../../docs/configuration.md");
        let missing: Vec<_> = keys
            .iter()
            .filter(|k| !doc.contains(&format!("`{k}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
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
