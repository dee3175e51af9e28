//! Every open connection and its [`State`], changed by compare-and-swap: the [`Table`]
//! admits a connection under the cap (evicting the ones that wait, oldest first), reaps
//! the ones past their timeouts, and closes them at shutdown.
//!
//! The policy only: the bytes that move a connection along are `progress`'s, hyper and
//! the listener are `serve`'s (this folder's mod.rs).

use super::Limits;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Where a connection is in its request (module doc).
pub(super) struct State;

impl State {
    pub(super) const IDLE: u8 = 0;
    pub(super) const HEAD: u8 = 1;
    pub(super) const BUSY: u8 = 2;
    pub(super) const CLOSING: u8 = 3;
}

/// One connection, as the policy sees it.
pub(super) struct Conn {
    pub(super) state: AtomicU8,
    /// When the current state's clock began (ms since the table's epoch): the first byte
    /// of a head, or the end of the last answer.
    pub(super) since: AtomicU64,
    /// The last byte read or written (ms since the epoch).
    pub(super) last_io: AtomicU64,
    /// In `BUSY`: the request has been read whole.
    pub(super) body_done: AtomicBool,
    pub(super) close: Notify,
    pub(super) graceful: Notify,
}

impl Conn {
    /// Moves `from` -> `to`; false when the state was not `from`.
    pub(super) fn shift(&self, from: u8, to: u8) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Marks the connection closing (from whatever state it is in but `CLOSING`) and
    /// tells its task; false when it was closing already.
    fn close_now(&self) -> bool {
        if self.state.swap(State::CLOSING, Ordering::AcqRel) == State::CLOSING {
            return false;
        }
        self.close.notify_one();
        true
    }

    /// Moves to `CLOSING` only if the state is still `seen` (a decision made on `seen`
    /// must not close a connection that has moved on).
    pub(super) fn close_if(&self, seen: u8) -> bool {
        if self.shift(seen, State::CLOSING) {
            self.close.notify_one();
            true
        } else {
            false
        }
    }

    /// The most recent of its clock and its last byte: an order for "waited longest".
    fn quiet_since(&self) -> u64 {
        self.since
            .load(Ordering::Acquire)
            .max(self.last_io.load(Ordering::Relaxed))
    }
}

/// Every open connection.
pub(super) struct Table {
    pub(super) epoch: Instant,
    pub(super) conns: Mutex<HashMap<u64, Arc<Conn>>>,
    pub(super) next_id: AtomicU64,
    pub(super) limits: Limits,
    /// Signalled when the last connection leaves (for shutdown).
    pub(super) emptied: Notify,
    pub(super) refusals: RateLimited,
}

impl Table {
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes up to `n` connections that give way at the cap (module doc), oldest
    /// activity first; how many it closed. Batches amortise the scan when many
    /// connections are open: at the cap, 1/64 of them give way at once.
    pub(super) fn evict(conns: &mut HashMap<u64, Arc<Conn>>, n: usize) -> usize {
        let mut candidates: Vec<(u8, u64, u64)> = conns
            .iter()
            .filter_map(|(&id, c)| {
                let s = c.state.load(Ordering::Acquire);
                let rank = match s {
                    State::IDLE | State::HEAD => 0,
                    State::BUSY if !c.body_done.load(Ordering::Acquire) => 1,
                    _ => return None,
                };
                Some((rank, c.quiet_since(), id))
            })
            .collect();
        let n = n.min(candidates.len());
        if n == 0 {
            return 0;
        }
        if n < candidates.len() {
            candidates.select_nth_unstable(n - 1);
        }
        let mut closed = 0;
        for &(_, _, id) in &candidates[..n] {
            if let Some(c) = conns.get(&id) {
                let seen = c.state.load(Ordering::Acquire);
                let still = matches!(seen, State::IDLE | State::HEAD)
                    || seen == State::BUSY && !c.body_done.load(Ordering::Acquire);
                if still && c.close_if(seen) {
                    conns.remove(&id);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Closes the connection that has waited longest; false when none gives way.
    pub(super) fn evict_one(&self) -> bool {
        Self::evict(&mut self.conns.lock().unwrap(), 1) > 0
    }

    /// Registers a new connection, making room at the cap (the third value says whether
    /// it closed any); `None` when no connection gives way.
    pub(super) fn admit(&self) -> Option<(u64, Arc<Conn>, bool)> {
        let now = self.now();
        let mut conns = self.conns.lock().unwrap();
        let mut evicted = false;
        if conns.len() >= self.limits.max_connections {
            let batch = (self.limits.max_connections / 64).max(1);
            if Self::evict(&mut conns, batch) == 0 {
                return None;
            }
            evicted = true;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            // A fresh connection is about to send a request: it gets the header timeout.
            state: AtomicU8::new(State::HEAD),
            since: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            body_done: AtomicBool::new(true),
            close: Notify::new(),
            graceful: Notify::new(),
        });
        conns.insert(id, conn.clone());
        Some((id, conn, evicted))
    }

    pub(super) fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap();
        conns.remove(&id);
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Closes waiting connections past their timeouts, as of `now`.
    pub(super) fn reap(&self, now: u64) {
        let (header, idle) = (
            self.limits.header_read_timeout.as_millis() as u64,
            self.limits.keep_alive_timeout.as_millis() as u64,
        );
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|_, c| {
            let seen = c.state.load(Ordering::Acquire);
            let expired = match seen {
                State::HEAD => now.saturating_sub(c.since.load(Ordering::Acquire)) > header,
                // Idle since the last answer or the last byte (an answer may still be
                // flushing after its body ended).
                State::IDLE => now.saturating_sub(c.quiet_since()) > idle,
                _ => false,
            };
            !(expired && c.close_if(seen))
        });
        if conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Shutdown's first step: closes connections in `HEAD` or still sending a body; asks
    /// the others to finish gracefully. Returns (closed, left).
    pub(super) fn begin_shutdown(&self) -> (usize, usize) {
        let mut conns = self.conns.lock().unwrap();
        let mut closed = 0;
        conns.retain(|_, c| {
            let seen = c.state.load(Ordering::Acquire);
            let half_sent =
                seen == State::HEAD || seen == State::BUSY && !c.body_done.load(Ordering::Acquire);
            if half_sent && c.close_if(seen) {
                closed += 1;
                return false;
            }
            c.graceful.notify_one();
            true
        });
        (closed, conns.len())
    }

    /// Shutdown's last step: closes whatever is left; returns how many.
    pub(super) fn close_all(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.values().filter(|c| c.close_now()).count();
        conns.clear();
        self.emptied.notify_waiters();
        n
    }

    pub(super) fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// A warning logged at most once per interval, with the count of the ones held back.
pub(crate) struct RateLimited {
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> RateLimited {
        RateLimited {
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    pub(crate) fn warn(&self, message: std::fmt::Arguments<'_>) {
        let mut last = self.last.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let held = self.held.swap(0, Ordering::Relaxed);
        if held > 0 {
            tracing::warn!("{message} ({held} more like it in the last 10 s)");
        } else {
            tracing::warn!("{message}");
        }
    }
}
