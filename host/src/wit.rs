//! Host bindings generated from `wit/`: the world `nnserve:plugin/handler` (which imports
//! the standard `wasi:nn@0.2.0-rc-2024-10-28`) and the router world. Only `plugin` (the
//! exports and the `host` interface) and `nn` (the wasi-nn resources) use these types;
//! `api` and `routing` talk to plugins through `plugin`'s hand-written types
//! (`plugin::HttpRequest`, `plugin::RouteVariant`, ...). Generated code only: nothing
//! here is written by hand but the bindgen options.

wasmtime::component::bindgen!({
    world: "nnserve:plugin/handler",
    path: "../wit",
    imports: {
        // Compute awaits the model's execution path; everything else is quick.
        "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "wasi:nn/graph.graph": crate::nn::Graph,
        "wasi:nn/tensor.tensor": crate::nn::HostTensor,
        "wasi:nn/inference.graph-execution-context": crate::nn::ExecContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
});

// The world's `use types.{request, response, error}` puts those types at this module's
// root; the error code enum is re-exported beside them.
pub use self::nnserve::plugin::types::ErrorCode;

/// Host bindings of the world `nnserve:plugin/router`. The `host` interface is the one
/// generated above (one implementation, linked once, serves both worlds).
pub mod router {
    wasmtime::component::bindgen!({
        world: "nnserve:plugin/router",
        path: "../wit",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "nnserve:plugin/host": crate::wit::nnserve::plugin::host,
        },
    });
    pub use self::nnserve::plugin::routing::VariantStats;
}
