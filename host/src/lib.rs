//! nnserve: a model server. libtorch runs the models behind the standard `wasi:nn`
//! interface; sandboxed WebAssembly components do per-model pre- and post-processing;
//! clients speak TF Serving REST or KServe v2 over HTTP.
//!
//! The modules follow a request's journey and a model's life (ARCHITECTURE.md):
//! `api` → `routing` → `plugin` → `nn` → `backend`, and `repository` → `lifecycle`, which keeps the
//! registry of loaded versions that `api` reads. `connections` owns the listener's
//! connections (timeouts, the cap, TLS, shutdown) beneath `api`. `bundle`, `tensor` and
//! `names` (the naming rule and how untrusted text is shown back) are shared
//! vocabulary; `wit` holds the generated bindings.
//!
//! The smallest use is the binary: `nnserve serve --repository DIR`. As a library:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = nnserve::config::ServerConfig::default();
//! nnserve::server::run(config).await
//! # }
//! ```

// The parsers and plain types, in a light crate of their own (`core/`, nnserve-core) so
// that fuzz targets build them without wasmtime, libtorch or TensorFlow; re-exported under
// their old paths.
pub use nnserve_core::{archive, bundle, names, tensor};

pub mod alloc;
pub mod api;
pub mod backend;
pub mod batching;
pub mod bundle_run;
pub mod bundle_tool;
pub mod cli;
pub mod config;
pub mod connections;
pub mod dev;
pub mod grpc;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod nn;
pub mod plugin;
pub mod repository;
pub mod routing;
pub mod scaffold;
mod scaffold_names;
pub mod server;
pub mod single_model;
pub mod wit;

#[cfg(test)]
mod layout_tests;
