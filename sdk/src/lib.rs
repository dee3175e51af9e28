//! The nnserve plugin SDK: write a handler plugin in a few lines.
//!
//! A handler plugin is a WebAssembly component that nnserve calls once per request to
//! `POST /v1/models/{model}:infer`. It decodes the body, runs the bundle's model through
//! the standard `wasi:nn` interface and encodes the answer. This crate hides the
//! generated bindings: you implement [`Handler`] and export it with [`export_handler!`].
//!
//! ```ignore
//! Router plugins (world `router`, for endpoints) use the sibling crate
//! `nnserve-router-sdk` in `sdk/router`: a component implements one world, and the
//! bindings of both in one crate would leak each world's types into the other.
//!
//! ```ignore
//! use nnserve_sdk::{export_handler, Error, Handler, Model, Request, Response, Tensor};
//!
//! struct Doubler;
//!
//! impl Handler for Doubler {
//!     fn handle(req: Request) -> Result<Response, Error> {
//!         let rows: Vec<[f32; 4]> = req.json()?;
//!         let flat: Vec<f32> = rows.iter().flatten().copied().collect();
//!         let input = Tensor::f32(&[rows.len() as u32, 4], &flat);
//!         let out = Model::load()?.infer_one("input", input)?;
//!         Response::json(&out.to_f32()?)
//!     }
//! }
//!
//! export_handler!(Doubler);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the component to put at `plugins/handler.wasm`
//! in the bundle.
//!
//! What a plugin can reach is fixed by the host: `wasi:nn` (only the bundle's own
//! model), the [`host`] functions (log, config, read-only assets) and the WASI that Rust's
//! std needs, with no files, no network and an empty environment.

pub mod bindings {
    //! The generated bindings of the `nnserve:plugin/handler` world. Plugin code should
    //! not need these; they are public for the export macro and for advanced uses.
    wit_bindgen::generate!({
        world: "handler",
        path: "../wit",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "nnserve_sdk::bindings",
    });
}

mod http;
#[cfg(feature = "image")]
pub mod image;
mod tensor;

pub use http::{Error, ErrorCode, Request, Response};
pub use tensor::{Model, Tensor, TensorType};

/// The one trait a handler plugin implements.
pub trait Handler {
    /// Serves one request. Return an [`Error`] to answer with its status and
    /// `{"error": message}`; a panic becomes a 500 that names the plugin.
    fn handle(request: Request) -> Result<Response, Error>;
}

/// Exports a [`Handler`] implementation as the plugin's `handle` function.
///
/// Use it once per plugin crate, at the top level: `export_handler!(MyPlugin);`
#[macro_export]
macro_rules! export_handler {
    ($t:ty) => {
        const _: () = {
            struct __NnserveHandlerExport;
            impl $crate::bindings::Guest for __NnserveHandlerExport {
                fn handle(
                    request: $crate::bindings::nnserve::plugin::types::Request,
                ) -> ::core::result::Result<
                    $crate::bindings::nnserve::plugin::types::Response,
                    $crate::bindings::nnserve::plugin::types::Error,
                > {
                    <$t as $crate::Handler>::handle(request)
                }
            }
            $crate::bindings::__export_handler_world!(__NnserveHandlerExport);
        };
    };
}

/// Host services: logging, the bundle's configuration and its read-only assets.
pub mod host {
    use crate::bindings::nnserve::plugin::host as raw;
    use crate::Error;

    pub use raw::LogLevel;

    /// Writes a line to the server's log, tagged with this plugin and its model.
    pub fn log(level: LogLevel, message: &str) {
        raw::log(level, message)
    }

    /// A value of the manifest's `[handler] config` table, if set.
    pub fn config(key: &str) -> Option<String> {
        raw::config(key)
    }

    /// A config value parsed as `T`, or `default` when the key is absent. A value that
    /// does not parse is a 500 naming the key, since it is a bundle error.
    pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, Error>
    where
        T::Err: std::fmt::Display,
    {
        match raw::config(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e| {
                Error::internal(format!("bundle config `{key}` = {v:?} is invalid: {e}"))
            }),
        }
    }

    /// Every `[handler] config` entry.
    pub fn config_entries() -> Vec<(String, String)> {
        raw::config_entries()
    }

    /// The bytes of a file under the bundle's `assets/` (path relative to the bundle root).
    pub fn asset(path: &str) -> Result<Vec<u8>, Error> {
        raw::read_asset(path).map_err(Error::internal)
    }
}
