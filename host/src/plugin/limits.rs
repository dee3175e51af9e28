//! A plugin's limits while it runs: its memory cap ([`Limiter`], with every byte charged
//! to the server-wide [`MemoryPool`] too), its CPU budget counted in epoch ticks
//! ([`CpuMeter`]) and the epoch ticker that drives them ([`Ticker`]).
//!
//! Pure bookkeeping: it knows nothing of components, linkers or requests.

use crate::nn::{MemoryPool, PoolExhausted};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One epoch tick.
pub(super) const TICK: Duration = Duration::from_millis(1);
/// A running guest yields to tokio at least this often (in ticks), so that the
/// request's wall-clock deadline can fire and other tasks on the worker get a turn.
pub(super) const YIELD_TICKS: u64 = 5;

/// A plugin's linear memory would pass its `limits.memory_mib`.
#[derive(Debug)]
pub struct MemoryCapReached {
    pub cap_mib: u64,
}

impl std::fmt::Display for MemoryCapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it needed more than its memory cap of {} MiB (limits.memory_mib in bundle.toml)",
            self.cap_mib
        )
    }
}

impl std::error::Error for MemoryCapReached {}

/// A store's resource limiter: the plugin's memory cap, with every byte of linear
/// memory also charged to the server-wide [`MemoryPool`] until the store is dropped.
///
/// The cap holds for all of a store's memories together (a component may have two), and
/// a growth the limiter allowed that then fails gives its charge back.
pub(super) struct Limiter {
    pub(super) cap: usize,
    pub(super) charged: u64,
    /// The last growth charged, until it is known to have happened.
    pub(super) pending: u64,
    pub(super) pool: Arc<MemoryPool>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current) as u64;
        let total = self.charged.saturating_add(more);
        if total > self.cap as u64 || maximum.is_some_and(|m| desired > m) {
            return Err(wasmtime::Error::new(MemoryCapReached {
                cap_mib: (self.cap >> 20) as u64,
            }));
        }
        if !self.pool.try_charge(more) {
            return Err(wasmtime::Error::new(PoolExhausted {
                cap_mib: self.pool.cap() >> 20,
            }));
        }
        self.charged = total;
        self.pending = more;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        let undo = std::mem::take(&mut self.pending);
        self.charged -= undo;
        self.pool.release(undo);
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        32
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.pool.release(self.charged);
    }
}

/// Ticks of idleness (no plugin running) after which the epoch ticker sleeps until the
/// next plugin call, so an idle server does not wake a core a thousand times a second.
const IDLE_TICKS: u32 = 100;

/// The epoch ticker's state: how many plugin calls run, and whether it sleeps.
#[derive(Default)]
pub(super) struct Ticker {
    active: AtomicUsize,
    parked: AtomicBool,
    pub(super) stop: AtomicBool,
    pub(super) thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Ticker {
    /// Marks a plugin call as running until the guard drops; wakes the ticker if it sleeps.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        Busy(self.clone())
    }

    pub(super) fn run(&self, engine: wasmtime::EngineWeak) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            match engine.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
            if self.active.load(Ordering::SeqCst) > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle >= IDLE_TICKS {
                // Announce the sleep before the last look: a call that starts after
                // that look sees `parked` and unparks (a token park() then consumes).
                self.parked.store(true, Ordering::SeqCst);
                if self.active.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }
}

/// A plugin call in progress, for the ticker.
pub(super) struct Busy(Arc<Ticker>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The guest's CPU time, from the epoch callback's checks. Between two checks the guest
/// was given `allot` (a few ticks); time beyond that is time it spent waiting to run,
/// in tokio's queue after a yield or descheduled by the OS, and time in host calls
/// (`compute` waiting for its forward) is not the guest's either. Until session 4 the
/// budget was wall time minus host calls: with 64 clients on 2 busy cores a 0.6 ms JPEG
/// decode resumed after each yield already past its deadline, yielded again at once, and
/// was charged its whole wait, up to a 504 for a 200 ms budget.
#[derive(Debug, Clone)]
pub(super) struct CpuMeter {
    pub(super) guest: Duration,
    last: Instant,
    host_at_last: Duration,
}

/// What the epoch callback does after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// The budget is spent.
    Interrupt,
    /// The guest ran its allotment: let tokio run other tasks, then go on.
    Yield,
    /// The guest mostly waited since the last check: run before yielding again.
    Run,
}

impl CpuMeter {
    pub(super) fn new(now: Instant) -> CpuMeter {
        CpuMeter {
            guest: Duration::ZERO,
            last: now,
            host_at_last: Duration::ZERO,
        }
    }

    /// Charges the guest for the time since the last check, at most `allot`, less the
    /// host calls made meanwhile (`host`: their total so far).
    pub(super) fn check(
        &mut self,
        now: Instant,
        host: Duration,
        allot: Duration,
        budget: Duration,
    ) -> Next {
        let since = now.saturating_duration_since(self.last);
        let in_host = host.saturating_sub(self.host_at_last);
        let outside = since.saturating_sub(in_host);
        self.last = now;
        self.host_at_last = host;
        self.guest += outside.min(allot);
        if self.guest >= budget {
            Next::Interrupt
        } else if outside > allot + 2 * TICK {
            Next::Run
        } else {
            Next::Yield
        }
    }

    pub(super) fn left(&self, budget: Duration) -> Duration {
        budget.saturating_sub(self.guest)
    }
}

pub(super) fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64
}
