//! nnserve's parsers and plain types, with no runtime behind them: what the server reads
//! from the outside world before anything runs.
//!
//! - `bundle`: the manifest (`bundle.toml`) and its checks, a bundle on disk;
//! - `archive`: bundle archives (`.tar.gz`): checked, unpacked, packed, digested;
//! - `tensor`: dtypes, shapes and tensors as bytes;
//! - `codec`: tensors to and from JSON and Triton's binary extension;
//! - `target`: TF Serving's REST paths (`/v1/models/{name}/versions/{n}:predict`);
//! - `tfserving`: TF Serving's predict body (`instances`, `inputs`) and its answer;
//! - `v2`: KServe v2's inference request over HTTP (JSON and Triton's binary tail);
//! - `grpc`: the gRPC messages (prost) and the tensors of KServe's `ModelInfer` and TF
//!   Serving's `TensorProto`;
//! - `plugin_io`: a handler plugin's answer made fit for HTTP, and the BYTES framing
//!   that carries bodies to plugins over KServe v2;
//! - `names`: the naming rule, and how untrusted text is shown back.
//!
//! It depends on no engine (wasmtime, libtorch, TensorFlow, tokio), so fuzz targets
//! (`fuzz/`) build it alone in seconds; `nnserve` re-exports its modules under their
//! old paths (`nnserve::bundle`, ...).

pub mod archive;
pub mod bundle;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod names;
pub mod plugin_io;
pub mod target;
pub mod tensor;
pub mod tfserving;
pub mod v2;
