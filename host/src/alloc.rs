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

/// `mi_option_allow_thp` (v3's `include/mimalloc.h`; a test checks its default of 1).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the environment sets it
/// (mimalloc has read it already: `MIMALLOC_PURGE_DELAY`, in any case, or its old name
/// `MIMALLOC_RESET_DELAY`; -1 never purges, 0 at once).
///
/// And turns transparent huge pages off for the process, as `MIMALLOC_ALLOW_THP=0` does
/// (unless the environment sets that): mimalloc asks for them on its arenas, and a 2 MiB
/// page with one live block left in it stays resident whole. With them, storms of large
/// transient bodies left the soak's RSS 8-14 % above its start for good, and a MiniLM
/// server held 200 MiB of its 715 in huge pages; without them the soak's RSS after four
/// storms stays within 5 % of its level before them, the server starts about 70 MiB
/// smaller, and the forward did not lose (docs/configuration.md; bench/README.md,
/// session 15). `MIMALLOC_ALLOW_THP=1` gives them back.
pub fn tune() {
    if !set_in_environment(&["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]) {
        // SAFETY: mimalloc's options are plain integers, read on each purge decision.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) }
    }
    if !set_in_environment(&["MIMALLOC_ALLOW_THP"]) {
        // SAFETY: as above; mimalloc reads it before each madvise(MADV_HUGEPAGE) of new
        // OS memory. PR_SET_THP_DISABLE changes only this process's later faults (it is
        // what mimalloc does itself when the environment says 0).
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
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

/// Whether the environment sets one of these mimalloc options (it reads names in any case).
fn set_in_environment(names: &[&str]) -> bool {
    std::env::vars_os().any(|(k, _)| {
        k.to_str()
            .is_some_and(|k| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_tuned_are_the_purge_delay_and_huge_pages() {
        if set_in_environment(&[
            "MIMALLOC_PURGE_DELAY",
            "MIMALLOC_RESET_DELAY",
            "MIMALLOC_ALLOW_THP",
        ]) {
            return;
        }
        // SAFETY: reading options.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(
            get(MI_OPTION_PURGE_DELAY),
            1000,
            "mimalloc's option {MI_OPTION_PURGE_DELAY} is not the purge delay (1000 ms by default)"
        );
        assert_eq!(
            get(MI_OPTION_ALLOW_THP),
            1,
            "mimalloc's option {MI_OPTION_ALLOW_THP} is not allow_thp (1 by default)"
        );
        tune();
        assert_eq!(get(MI_OPTION_PURGE_DELAY) as i64, PURGE_DELAY_MS);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 0);
        // SAFETY: reads this process's flag.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1
        );
    }
}
