//! Model execution for requests: the per-version [`Runner`] (the execution path that the
//! tensor APIs and wasi-nn share) and the host side of the standard `wasi:nn` interface.
//!
//! `nn` knows the model's signature and the backend; it knows nothing of HTTP or of
//! which plugin calls it, and must not reach into `plugin`, `routing`, `lifecycle` or
//! `api`. The batcher sits inside [`Runner::forward`].
//!
//! - `runner`: the [`Runner`] and its gate;
//! - `wasi`: the `wasi:nn` host ([`NnCtx`], the resources, [`add_to_linker`]);
//! - `pool`: the server-wide [`MemoryPool`] that plugin linear memories and wasi-nn host
//!   memory are both charged to (here, not in `plugin`, so that the dependency runs one
//!   way: `plugin` → `nn`).
//!
//! ## The execution path and its hand-off
//! A version runs at most `concurrency` forwards at once: one unless the model is
//! compute-bound on the CPU, where it is one per core with the cores shared among them
//! (`backend::threading`; with batching this is `num_batch_threads`, without it a gate's
//! permits). The caller that gets its turn runs the forward itself, without handing it to
//! another thread: a cross-thread hand-off costs more than a tiny model's forward
//! (../shared/FACTS.md). The one exception is below this module: the torch backend runs a
//! CPU forward of more than one intra-op thread on its forward threads, and the caller
//! waits for it (libgomp must not grow a team on every thread that calls; see
//! `backend::torch`). Forwards that have been slow (moving average over
//! [`INLINE_LIMIT`]) run inside `tokio::task::block_in_place`, so the worker's other
//! tasks move to another thread while libtorch works; quick ones run inline, as a JSON
//! parse would.

mod pool;
mod runner;
mod wasi;

pub use self::pool::{MemoryPool, PoolExhausted};
pub use self::runner::{InferError, Runner, INLINE_LIMIT, WAITING_PER_SLOT};
pub use self::wasi::{
    add_to_linker, Blame, Dependencies, ExecContext, Graph, HostMemoryExceeded, HostTensor,
    ModelLookup, NnCtx, NnError, NnView,
};

#[cfg(test)]
mod tests;
