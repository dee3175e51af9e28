//! All plugin memory together ([`MemoryPool`]): what every running plugin instance's
//! linear memory and its wasi-nn resources' host memory are charged to, and the error
//! when it is full ([`PoolExhausted`]).
//!
//! Plain accounting: it knows no store, no component and no request.

use std::sync::atomic::Ordering;

/// All plugin memory together: every running instance's linear memory and the host
/// memory its wasi-nn resources hold are charged here while they exist, so that 256
/// instance slots of up to 512 MiB each are not the bound; `plugin_memory_total_mib` is.
#[derive(Debug)]
pub struct MemoryPool {
    used: std::sync::atomic::AtomicU64,
    cap: u64,
}

impl MemoryPool {
    pub fn new(cap: u64) -> MemoryPool {
        MemoryPool {
            used: Default::default(),
            cap,
        }
    }

    /// Charges `bytes`, or refuses (charging nothing) when the pool would go past its cap.
    pub fn try_charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.cap)
            })
            .is_ok()
    }

    pub fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// All plugins together hold the server's whole plugin memory: not this plugin's fault,
/// a 503 to retry.
#[derive(Debug)]
pub struct PoolExhausted {
    pub cap_mib: u64,
}

impl std::fmt::Display for PoolExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the plugins running now hold all of the server's plugin memory ({} MiB, plugin_memory_total_mib); retry shortly",
            self.cap_mib
        )
    }
}

impl std::error::Error for PoolExhausted {}
