//! The process's allocator: mimalloc, also as libtorch's `malloc` (host/Cargo.toml).
//!
//! mimalloc gives memory that stayed free for its purge delay (1 s by default in its v3)
//! back to the kernel. A ResNet-18 batch's activations are tens of MB in blocks large
//! enough to come straight from mimalloc's arenas; between bursts, or when batches of
//! another size run for a second, they were purged and the next forward faulted them
//! back in, as 2 MB transparent huge pages zeroed by the kernel (2 % of the server's CPU
//! at saturation in `perf`). With a 10 s delay, `nnserve-bench raw` at batch 8 (2 x 1
//! thread) ran 52.1-52.8 rows/s against 49.4-50.9 and the server at 16 clients 44.3-46.6
//! against 41.2-43.8 req/s (bench/README.md, session 5); the cost is that memory freed
//! after a burst stays resident for at least 10 s instead of 1 s (+137 MB on the
//! benchmark's three ResNet-18 versions).

/// `mi_option_purge_delay` in mimalloc's `include/mimalloc.h` (the Rust binding has no
/// constant for it). The index is the same in v2, whose default is 10 ms; a test checks
/// that it holds v3's 1000 ms default, so a build of the other version fails it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay the server and `nnserve-bench` run with, in ms.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the environment sets it
/// (mimalloc has read it already: `MIMALLOC_PURGE_DELAY`, in any case, or its old name
/// `MIMALLOC_RESET_DELAY`; -1 never purges, 0 at once).
pub fn tune() {
    if !set_in_environment() {
        // SAFETY: mimalloc's options are plain integers, read on each purge decision.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) }
    }
}

/// For a thread about to exit after heavy allocation (a model load compiles its plugins
/// with Cranelift): gives its freed memory back now. A heap abandoned by an exiting thread
/// kept its pages, and each upload of a bundle with a handler left about 45 MB resident.
pub fn release_thread_memory() {
    // SAFETY: mi_collect only frees what no allocation uses.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

static COLLECT_PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives memory freed after a large transient allocation (a big JSON body's values) back
/// to the kernel once the purge delay has passed. mimalloc purges only when it is called
/// again, so on a server that goes idle after such a request the memory stayed resident:
/// 2.2 GB after one 60 MiB body of numbers, for good. At most one collection is pending
/// at a time; it runs on a blocking thread. Call from within the runtime.
pub fn collect_after_delay() {
    use std::sync::atomic::Ordering;
    if COLLECT_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        let delay = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(PURGE_DELAY_MS as u64);
        tokio::time::sleep(std::time::Duration::from_millis(delay + 500)).await;
        COLLECT_PENDING.store(false, Ordering::Release);
        // SAFETY: mi_collect only frees what no allocation uses.
        tokio::task::spawn_blocking(|| unsafe { libmimalloc_sys::mi_collect(true) });
    });
}

/// Whether the environment sets the purge delay, as mimalloc reads it.
fn set_in_environment() -> bool {
    std::env::vars_os().any(|(k, _)| {
        k.to_str().is_some_and(|k| {
            k.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY")
                || k.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_tuned() {
        if set_in_environment() {
            return;
        }
        // SAFETY: reading an option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            get(),
            1000,
            "mimalloc's option {MI_OPTION_PURGE_DELAY} is not the purge delay (1000 ms by default)"
        );
        tune();
        assert_eq!(get() as i64, PURGE_DELAY_MS);
    }
}
