//! The lead: the caller that finds the device free takes a batch from the queue (its own
//! rows first, then the oldest queued requests that fit), waits up to the batch timeout
//! to fill it when asked to, runs the forward on its own thread, answers every caller
//! with its rows, and passes the lead on to the oldest request still queued, or frees
//! the device.
//!
//! Queueing is `queue`'s; copying rows in and out is `rows`'.

use super::queue::{Msg, State};
use super::rows::{concat_rows, slice_rows};
use super::{BatchError, Batcher, Forward, Outputs};
use crate::tensor::Tensor;
use std::time::{Duration, Instant};

impl Batcher {
    /// Runs one batch as the leader: this caller's rows first, then the oldest queued
    /// requests that fit; answers the others, passes the lead on, returns its own rows.
    /// `fill`: this leader found the device idle and counts in `State::filling`; it waits
    /// up to the batch timeout for more rows.
    pub(super) async fn lead<F: Forward>(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        queued_at: Instant,
        fill: bool,
        forward: &F,
    ) -> Outputs {
        // Whatever happens below, the lead must move on, or the queue would wedge.
        struct PassOnDrop<'a>(&'a Batcher);
        impl Drop for PassOnDrop<'_> {
            fn drop(&mut self) {
                self.0.pass_lead();
            }
        }
        let _pass = PassOnDrop(self);
        if fill {
            // Counted in `filling` by `submit`; uncounted when the wait ends or is
            // cancelled with its caller.
            struct Filling<'a>(&'a Batcher);
            impl Drop for Filling<'_> {
                fn drop(&mut self) {
                    self.0.state.lock().unwrap().filling -= 1;
                }
            }
            let _filling = Filling(self);
            self.wait_to_fill(rows).await;
        }
        let followers = self.take_batch(&inputs, self.policy.max_batch_size - rows);
        let now = Instant::now();
        self.metrics.observe_queue(now - queued_at);
        for t in &followers {
            self.metrics.observe_queue(now - t.queued_at);
        }
        let mut counts = vec![rows];
        counts.extend(followers.iter().map(|t| t.rows));
        let total: usize = counts.iter().sum();
        let padded = self.policy.padded(total);
        // With variable-length inputs, each request's own sizes, to cut its outputs to.
        let mut owns = None;
        let batch = if followers.is_empty() && padded == rows {
            inputs // a batch of one: no copy at all
        } else {
            let mut parts: Vec<&[Tensor]> = vec![&inputs];
            parts.extend(followers.iter().map(|t| &t.inputs[..]));
            let resized = self.policy.padding.as_ref().and_then(|p| {
                let resized = p.pad(&parts)?;
                owns = Some(parts.iter().map(|r| p.own_sizes(r)).collect::<Vec<_>>());
                Some(resized)
            });
            match resized {
                Some(resized) => {
                    let parts: Vec<&[Tensor]> = resized.iter().map(|r| &r[..]).collect();
                    concat_rows(&parts, padded)
                }
                None => concat_rows(&parts, padded),
            }
        };
        let mut results = self
            .run_batch(batch, &counts, padded, owns, forward)
            .into_iter();
        let own = results.next().expect("the leader's own result");
        for (task, result) in followers.into_iter().zip(results) {
            let _ = task.tx.send(Msg::Done(result));
        }
        own
    }

    /// With `batch_timeout_micros`, an idle device waits up to that long for a batch of
    /// `max_batch_size` rows (its leader's `own` rows and the queued ones), and runs as
    /// soon as there are that many. It sleeps until a request is queued while more than
    /// 2 ms are left; tokio's timer counts in whole milliseconds, so the last stretch
    /// yields in a loop instead, for a deadline kept to the microsecond.
    async fn wait_to_fill(&self, own: usize) {
        let until = Instant::now() + self.policy.batch_timeout;
        loop {
            let notified = self.queued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().unwrap().queued_rows + own >= self.policy.max_batch_size {
                return;
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            let left = until - now;
            if left > Duration::from_millis(2) {
                let _ = tokio::time::timeout(left - Duration::from_millis(1), notified).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Queued requests go to the slots that are free, oldest first, while no leader is
    /// filling its batch; `one_anyway`: the first free slot is taken even while one is
    /// (a slot freed by a finished batch). Requests whose caller went away are dropped.
    /// With no batch timeout, nothing queues while a slot is free: this hands a freed
    /// slot to the oldest queued request, or finds nothing to do.
    pub(super) fn lead_on_free_slots(&self, st: &mut State, mut one_anyway: bool) {
        while st.leaders < self.policy.num_batch_threads && (one_anyway || st.filling == 0) {
            let Some(t) = st.queue.pop_front() else { break };
            st.queued_rows -= t.rows;
            if t.tx.send(Msg::Lead(t.inputs, t.rows, t.queued_at)).is_ok() {
                st.leaders += 1;
                one_anyway = false;
            }
        }
    }

    /// Hands the lead, with its inputs, to the oldest queued request whose caller is still
    /// there; with none, frees the device.
    pub(super) fn pass_lead(&self) {
        let mut st = self.state.lock().unwrap();
        st.leaders -= 1;
        // The oldest queued request takes this slot at once, even while another slot's
        // leader waits to fill its batch: a free slot never idles beside queued work.
        self.lead_on_free_slots(&mut st, true);
        self.metrics.set_queue_depth(st.queue.len());
    }

    /// One forward over a batch of `padded` rows made of requests of `counts` rows;
    /// every request gets its own rows of every output, or the error.
    fn run_batch<F: Forward>(
        &self,
        batch: Vec<Tensor>,
        counts: &[usize],
        padded: usize,
        owns: Option<Vec<Vec<Option<i64>>>>,
        forward: &F,
    ) -> Vec<Outputs> {
        {
            let mut s = self.stats.lock().unwrap();
            s.batches += 1;
            s.rows += counts.iter().sum::<usize>() as u64;
            s.padded_rows += padded as u64;
        }
        self.metrics.observe_batch(counts.iter().sum(), padded);
        let fail = |msg: String| {
            counts
                .iter()
                .map(|_| Err(BatchError::Model(msg.clone())))
                .collect()
        };
        let outputs = match forward.forward(batch) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        if let Some((name, t)) = outputs
            .iter()
            .find(|(_, t)| t.shape.first().copied() != Some(padded as i64))
        {
            return fail(format!(
                "output '{name}' has shape {:?}, not {padded} rows: the model's outputs must keep the batch dimension to be batched",
                t.shape
            ));
        }
        if counts.len() == 1 && counts[0] == padded {
            return vec![Ok(outputs)];
        }
        let mut start = 0;
        let cut = self.policy.padding.as_ref().zip(owns.as_ref());
        counts
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                let out = outputs
                    .iter()
                    .map(|(n, t)| {
                        let rows = slice_rows(t, start, rows);
                        match cut {
                            Some((p, owns)) => (n.clone(), p.cut(n, rows, &owns[i])),
                            None => (n.clone(), rows),
                        }
                    })
                    .collect();
                start += rows;
                Ok(out)
            })
            .collect()
    }
}
