//! The nnserve plugin SDK: write a handler plugin in a few lines.
//!
//! A handler plugin is a WebAssembly component that nnserve calls once per request to
//! `POST /v1/models/{model}:infer`. It decodes the body, runs the bundle's model through
//! the standard `wasi:nn` interface and encodes the answer. This crate hides the
//! generated bindings: you implement [`Handler`] and export it with [`export_handler!`].
//!
//! Router plugins (world `router`, for endpoints) use the sibling crate
//! `nnserve-router-sdk` in `sdk/router`: a component implements one world, and the
//! bindings of both in one crate would leak each world's types into the other.
//!
//! ```no_run
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
//! # fn main() {}
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the component is
//! `target/wasm32-wasip2/release/<crate>.wasm`, where a `-` in the crate's name becomes
//! `_` (cargo's rule for library files): `my-plugin` builds `my_plugin.wasm`. The
//! bundle's `[handler] path` names it.
//!
//! Depend on the SDK by path (`nnserve-sdk = { path = "/path/to/nnserve/sdk" }`) or by
//! git (`nnserve-sdk = { git = "https://github.com/nnserve/nnserve" }`); it carries
//! the plugin contract (`wit/`) inside the crate.
//!
//! What a plugin can reach is fixed by the host: `wasi:nn` (only the bundle's own
//! model), the [`host`] functions (log, config, read-only assets) and the WASI that Rust's
//! std needs, with no files, no network and an empty environment.

#![deny(missing_docs)]

#[allow(missing_docs)] // generated; the WIT's own comments are its docs
pub mod bindings {
    //! The generated bindings of the `nnserve:plugin/handler-with-init` world (the
    //! `handler` world and its `init` export). Plugin code should not need these; they
    //! are public for the export macro and for advanced uses.
    wit_bindgen::generate!({
        world: "handler-with-init",
        path: "wit",
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
pub use tensor::{bf16, f16, Element, Model, Tensor, TensorType};

/// The one trait a handler plugin implements.
pub trait Handler {
    /// Serves one request. Return an [`Error`] to answer with its status and
    /// `{"error": message}`; a panic becomes a 500 that names the plugin.
    fn handle(request: Request) -> Result<Response, Error>;

    /// One-time setup, run once when the version loads: whatever it leaves in memory
    /// (typically a `static` [`std::sync::OnceLock`] it fills) is there at the start of
    /// every request, which then skips that work. The server snapshots the instance
    /// after `init` (Wizer) and starts each request's fresh instance from it, so requests
    /// stay isolated from each other.
    ///
    /// It may read [`config`] and [`host::asset`]s and log; it has no model. An error or
    /// a panic fails the version's load with its message. Write `handle` so that it also
    /// works when `init` has not run (`OnceLock::get_or_init`): `nnserve bundle run`
    /// and the SDK's own tests call `handle` alone.
    ///
    /// ```no_run
    /// use std::sync::OnceLock;
    /// # use nnserve_sdk::{Error, Handler, Request, Response, host};
    /// static WORDS: OnceLock<Vec<String>> = OnceLock::new();
    ///
    /// fn words() -> Result<&'static Vec<String>, Error> {
    ///     if let Some(w) = WORDS.get() {
    ///         return Ok(w);
    ///     }
    ///     let text = String::from_utf8_lossy(&host::asset("assets/words.txt")?).into_owned();
    ///     Ok(WORDS.get_or_init(|| text.lines().map(str::to_string).collect()))
    /// }
    ///
    /// struct Plugin;
    /// impl Handler for Plugin {
    ///     fn init() -> Result<(), Error> {
    ///         words().map(|_| ())
    ///     }
    ///     fn handle(req: Request) -> Result<Response, Error> {
    ///         Response::json(&words()?.len())
    ///     }
    /// }
    /// ```
    fn init() -> Result<(), Error> {
        Ok(())
    }
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
                    $crate::__install_panic_hook();
                    <$t as $crate::Handler>::handle(request)
                }

                fn init() {
                    $crate::__install_panic_hook();
                    if let ::core::result::Result::Err(e) = <$t as $crate::Handler>::init() {
                        ::core::panic!("init failed: {}", e.message);
                    }
                }
            }
            $crate::bindings::__export_handler_world!(__NnserveHandlerExport);
        };
    };
}

/// Reports a panic to the host before the plugin traps, so that the client's 500 says
/// what went wrong (its first line, without the location) and the server log has it
/// whole. [`export_handler!`] installs it; plugin code need not call it.
#[doc(hidden)]
pub fn __install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload_as_str()
                .unwrap_or("a panic whose payload is not text");
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            bindings::nnserve::plugin::host::panicked(message, location.as_deref());
        }))
    });
}

/// The plugin's whole config table (`[handler] config` in bundle.toml) as `T`, through
/// serde: a struct whose fields are the keys, with lists and tables as `Vec`s, maps
/// and nested structs. A missing field or a wrong type is a [`ConfigError`] that names
/// the key; `?` in a handler turns it into a 500 (a bundle error, not the client's).
///
/// ```no_run
/// #[derive(serde::Deserialize)]
/// struct Config {
///     top_k: usize,
///     classes: Vec<String>,
///     #[serde(default)]
///     scale: Option<f32>,
/// }
/// # fn f() -> Result<(), nnserve_sdk::Error> {
/// let config: Config = nnserve_sdk::config()?;
/// # Ok(()) }
/// ```
pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, ConfigError> {
    config_from_json(&bindings::nnserve::plugin::host::config_json())
}

/// [`config`] from the JSON object the host hands over (for tests of a plugin's config
/// type outside the server).
pub fn config_from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError {
        key: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// A config table that does not fit the type asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Where: `top_k`, `scale.std[1]`, or `.` for the table itself.
    pub key: String,
    /// What: serde's words, e.g. ``invalid type: string "5", expected usize``.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bundle config `{}`: {} (fix the plugin's config table in bundle.toml)",
            self.key, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::internal(e.to_string())
    }
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

    /// A value of the manifest's `[handler] config` table, if set: a string as it is,
    /// any other value as JSON (`5`, `true`, `["a","b"]`). For typed access to the whole
    /// table use [`crate::config`].
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Scale {
        mean: f32,
        std: Vec<f32>,
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Config {
        top_k: usize,
        classes: Vec<String>,
        scale: Scale,
        #[serde(default)]
        extra: BTreeMap<String, i64>,
    }

    #[test]
    fn typed_config_takes_lists_and_tables() {
        let json = r#"{"top_k":5,"classes":["cat","dog"],"scale":{"mean":0.5,"std":[1,2]}}"#;
        let c: Config = config_from_json(json).unwrap();
        assert_eq!(c.top_k, 5);
        assert_eq!(c.classes, ["cat", "dog"]);
        assert_eq!(c.scale.std, [1.0, 2.0]);
        assert!(c.extra.is_empty());
    }

    #[test]
    fn a_wrong_type_or_a_missing_key_names_the_key() {
        let wrong = r#"{"top_k":"5","classes":[],"scale":{"mean":0.5,"std":[]}}"#;
        let e = config_from_json::<Config>(wrong).unwrap_err();
        assert_eq!(e.key, "top_k");
        assert!(e.message.contains("invalid type: string"), "{e}");
        let nested = r#"{"top_k":5,"classes":[],"scale":{"mean":0.5,"std":[1,"x"]}}"#;
        assert_eq!(
            config_from_json::<Config>(nested).unwrap_err().key,
            "scale.std[1]"
        );
        let missing = r#"{"top_k":5,"scale":{"mean":0.5,"std":[]}}"#;
        let e = config_from_json::<Config>(missing).unwrap_err();
        assert!(e.message.contains("missing field `classes`"), "{e}");
        assert!(e.to_string().contains("bundle.toml"));
    }
}
