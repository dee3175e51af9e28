//! The command line: `nnserve serve` and its flags, and the `nnserve bundle` commands
//! (`pack`, `inspect`, `push`). `--help` is the reference; keep it true to the code.
//!
//! It only parses: flags become a `config::ServerConfig` (run by `server`) or a call into
//! `bundle_tool`.

use crate::config::ServerConfig;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "nnserve",
    version,
    about = "A model server: TorchScript models behind sandboxed WebAssembly handlers, over TF Serving REST and KServe v2 HTTP",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve every model version in a repository directory over HTTP.
    ///
    /// The repository holds one directory per model and one per version inside it:
    /// <repository>/<model>/<version>/bundle.toml (see docs/bundle.md). A TensorFlow
    /// SavedModel laid out as TF Serving has it, <model>/<version>/saved_model.pb without
    /// bundle.toml, is served as it is. A version that fails to load is reported and the
    /// others are served.
    Serve(ServeArgs),

    /// Make and examine bundles (the deployable unit: model, plugins, assets, manifest).
    #[command(subcommand)]
    Bundle(BundleCommand),

    /// Write plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),

    /// The edit-run loop: serve a plugin crate (or a bundle directory) on a local port,
    /// rebuild it when its files change and reload the same version in place.
    ///
    /// A crate (`nnserve plugin new`) is built with `cargo build --release` at start and
    /// on every change of its files (target/ aside), and its bundle staged into the
    /// served repository; the server reloads it within about half a second. A build that
    /// fails is shown and the last good one keeps serving. The management API is open
    /// (loopback only). ctrl-c stops.
    Dev {
        /// The plugin crate or bundle directory
        dir: PathBuf,
        /// Address to listen on (loopback); port 0 picks a free one
        #[arg(long, short = 'l', default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Log filter [default: the server's info lines and the plugin's log and output]
        #[arg(
            long,
            env = "RUST_LOG",
            default_value = "info,nnserve::plugin::host=trace,nnserve::plugin::output=debug"
        )]
        log: String,
    },

    /// Print the OpenAPI 3.1 document of the HTTP API (JSON), as the server serves it at
    /// GET /openapi.json; docs/openapi.json is this output (`make openapi`).
    Openapi,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Create a plugin crate that is also its bundle: `cargo build --release` in it,
    /// then `nnserve bundle run .`, `bundle pack .`, `bundle push`; nothing to copy.
    ///
    /// The crate has its own .cargo/config.toml (target wasm32-wasip2 and the flags
    /// plugins use), a bundle.toml whose plugin path is cargo's output, a warm-up request
    /// and a README of the loop. Without --model a handler is model-less (pure pre- or
    /// post-processing).
    New {
        /// The crate's directory; its last component is the crate's and the bundle's
        /// name (letters, digits, `-`, `_`)
        dir: PathBuf,
        /// The plugin's world
        #[arg(long, value_enum, default_value = "handler")]
        world: crate::scaffold::World,
        /// A model to copy in: a TorchScript file (its tensors are left as marked
        /// placeholders to fill in) or a SavedModel directory (its signature says all)
        #[arg(long)]
        model: Option<PathBuf>,
        /// Depend on the SDK at this path (the repository's `sdk/`) [default: the SDK
        /// shipped beside this binary or in its checkout]
        #[arg(long, conflicts_with = "sdk_git")]
        sdk: Option<PathBuf>,
        /// Depend on the SDK by git URL (the nnserve repository)
        #[arg(long)]
        sdk_git: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Check a bundle directory and write a deterministic .tar.gz of it.
    ///
    /// The same content always gives the same archive bytes (sorted entries, fixed
    /// times and owners). Prints the archive's size and the bundle's digest.
    Pack {
        /// The bundle directory (holding bundle.toml)
        dir: PathBuf,
        /// Where to write the archive [default: <name>-<version>.tar.gz]
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Upload a bundle archive to a running server (POST /v1/models/{name}/versions).
    ///
    /// Shows a progress bar on a terminal; prints the stored name, version and digest.
    /// The model's name is read from the archive's bundle.toml.
    Push {
        /// The .tar.gz archive (from `nnserve bundle pack`)
        file: PathBuf,
        /// The server's base URL, e.g. http://127.0.0.1:8080
        #[arg(long, short = 's', env = "NNSERVE_SERVER")]
        server: String,
        /// Bearer token for the management API (visible in `ps`: prefer --token-file)
        #[arg(long, short = 't', env = "NNSERVE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the bearer token (the server's --admin-token-file)
        #[arg(long, env = "NNSERVE_ADMIN_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
    },
    /// Show a bundle's manifest, model signature, plugin imports, files and digest.
    Inspect {
        /// A bundle directory or a .tar.gz archive
        path: PathBuf,
    },
    /// Run one request through a bundle in this process, with no server: it loads as a
    /// server loads it (checks, model, plugin, warm-up) and the answer is printed (status,
    /// headers, body). The plugin's log, stdout and stderr are shown on stderr.
    ///
    /// A bundle with a handler gets the body at `:infer` as it is; one without, at
    /// `:predict` (a TF Serving JSON body). Exits 0 for a 2xx answer, 1 otherwise.
    Run {
        /// A bundle directory or a .tar.gz archive
        path: PathBuf,
        /// The request body: text, or @FILE for a file's bytes (@- for stdin) [default: empty]
        #[arg(long, conflicts_with = "json")]
        body: Option<String>,
        /// The request body as JSON text (sets content-type application/json)
        #[arg(long)]
        json: Option<String>,
        /// The request's content-type [default: application/json with --json, none otherwise]
        #[arg(long)]
        content_type: Option<String>,
        /// Log filter for the run, as RUST_LOG [default: the plugin's log and output,
        /// warnings otherwise]
        #[arg(
            long,
            env = "RUST_LOG",
            default_value = "warn,nnserve::plugin::host=trace,nnserve::plugin::output=debug"
        )]
        log: String,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model repository: a directory, or an S3 bucket `s3://BUCKET/PREFIX` shared by
    /// replicas (endpoint, region and credentials from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true for a plain-HTTP
    /// endpoint; docs/object-store.md) [default: repository, or the config file's value]
    #[arg(long, short = 'r', env = "NNSERVE_REPOSITORY")]
    pub repository: Option<PathBuf>,

    /// With an s3:// repository: the local directory this replica syncs versions into
    /// and loads from; locked, so two processes never share one [default: per
    /// repository and free slot under $XDG_CACHE_HOME/nnserve or ~/.cache/nnserve]
    #[arg(long, env = "NNSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// How often the repository (directory or bucket) is looked at for versions added,
    /// removed or relabelled elsewhere, ms; 0: never [default: 2000]
    #[arg(long, env = "NNSERVE_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,

    /// Address to listen on; port 0 picks a free port (printed at start) [default: 127.0.0.1:8080]
    #[arg(long, short = 'l', env = "NNSERVE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Also serve gRPC here: KServe v2 as Triton serves it, TF Serving's PredictionService
    /// and ModelService, grpc.health.v1 and reflection (docs/grpc.md); port 0 picks a free
    /// port (printed at start) [default: no gRPC listener; `make run` uses 127.0.0.1:8081]
    #[arg(long, env = "NNSERVE_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,

    /// Server config file (TOML, keys in docs/configuration.md); flags override it
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,

    /// Wall-clock deadline per request in ms (clients may lower it with the x-nnserve-timeout-ms header) [default: 30000]
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,

    /// libtorch threads inside one forward (0: one per core) [default: per model: 1 when
    /// its forward takes under 1 ms at warm-up, else the cores shared among the forwards
    /// running at that moment]
    #[arg(long)]
    pub torch_threads: Option<usize>,

    /// libtorch inter-op threads [default: 1]
    #[arg(long)]
    pub torch_interop_threads: Option<usize>,

    /// Bearer token required by the management API; visible in `ps`, so prefer
    /// --admin-token-file [default: none]
    #[arg(long, env = "NNSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the management API's bearer token (trailing newline ignored)
    #[arg(long, env = "NNSERVE_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// Who may use the management API (uploads, deletes, labels, Triton load/unload):
    /// off (no such routes), token (the admin token required), open (no token)
    /// [default: token when a token is given, open on a loopback address without one; a
    /// non-loopback address with neither refuses to start]
    #[arg(long, value_enum)]
    pub management: Option<crate::config::Management>,

    /// TLS certificate chain (PEM) for the listener; needs --tls-key
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for the listener; needs --tls-cert
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// On SIGTERM or ctrl-c, seconds that requests in service get to finish [default: 10]
    #[arg(long)]
    pub grace_seconds: Option<u64>,

    /// On SIGTERM: readiness turns false at once and requests (and new connections) are
    /// still served for this long, so load balancers notice before the shutdown of
    /// --grace-seconds begins; a second signal exits at once [default: 0]
    #[arg(long, env = "NNSERVE_DRAIN_SECONDS")]
    pub drain_seconds: Option<u64>,

    /// When /v2/health/ready turns true: `all` versions found at start have loaded (a
    /// failed one keeps it false until its model has a version again), or `any` version
    /// of any model is available [default: all]
    #[arg(long, value_enum, env = "NNSERVE_READINESS")]
    pub readiness: Option<crate::config::Readiness>,

    /// The model's name when --repository holds one model, not a repository: a bundle
    /// (bundle.toml at its top; default: the bundle's own name), a TF Serving base path
    /// (<version>/saved_model.pb) or a bare TorchScript file (*.pt); what KServe's storage
    /// initializer leaves in /mnt/models (docs/kubernetes.md)
    #[arg(long, env = "NNSERVE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// A bare TorchScript file's input, NAME:DTYPE:DIMS (e.g. input:fp32:-1,4; -1 for a
    /// free dimension, the first one the batch); repeat for more, or `;` between them
    #[arg(long = "input", env = "NNSERVE_INPUTS", value_delimiter = ';')]
    pub inputs: Vec<String>,

    /// A bare TorchScript file's output, NAME:DTYPE:DIMS, as --input
    #[arg(long = "output", env = "NNSERVE_OUTPUTS", value_delimiter = ';')]
    pub outputs: Vec<String>,

    /// Log filter, as RUST_LOG (e.g. info, debug, nnserve=debug) [default: info]
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as `text`, or as `json`: one object per line (timestamp, level, target,
    /// fields) for everything the process writes, the native libraries' stderr included
    #[arg(long, value_enum, env = "NNSERVE_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::logging::Format,
}

impl ServeArgs {
    /// The config file (if any) with the flags applied over it.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(r) = &self.repository {
            c.repository = r.clone();
        }
        if let Some(d) = &self.cache_dir {
            c.cache_dir = Some(d.clone());
        }
        if let Some(p) = self.poll_interval_ms {
            c.poll_interval_ms = p;
        }
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(g) = self.grpc_listen {
            c.grpc_listen = Some(g);
        }
        if let Some(t) = self.request_timeout_ms {
            c.request_timeout_ms = t;
        }
        if let Some(t) = self.torch_threads {
            c.torch_intra_op_threads = Some(t);
        }
        if let Some(t) = self.torch_interop_threads {
            c.torch_inter_op_threads = t;
        }
        if let Some(t) = &self.admin_token {
            c.admin_token = Some(crate::config::Secret(t.clone()));
            c.admin_token_file = None;
        }
        if let Some(f) = &self.admin_token_file {
            c.admin_token_file = Some(f.clone());
            c.admin_token = None;
        }
        if let Some(m) = self.management {
            c.management = Some(m);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls_cert = Some(cert.clone());
            c.tls_key = Some(key.clone());
        }
        if let Some(g) = self.grace_seconds {
            c.grace_seconds = g;
        }
        if let Some(d) = self.drain_seconds {
            c.drain_seconds = d;
        }
        if let Some(r) = self.readiness {
            c.readiness = r;
        }
        if let Some(n) = &self.model_name {
            c.model_name = Some(n.clone());
        }
        if !self.inputs.is_empty() {
            c.model_inputs = self.inputs.clone();
        }
        if !self.outputs.is_empty() {
            c.model_outputs = self.outputs.clone();
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_flags_override() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from([
            "nnserve",
            "serve",
            "--repository",
            "r",
            "--listen",
            "127.0.0.1:0",
        ]);
        let Command::Serve(args) = cli.command else {
            panic!("parsed as serve")
        };
        let c = args.to_config().unwrap();
        assert_eq!(c.repository, PathBuf::from("r"));
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.request_timeout_ms, 30_000);
    }
}
