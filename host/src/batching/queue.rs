//! The queue a request waits in: a request that finds a forward slot free leads at once;
//! the others queue (bounded by `max_enqueued_batches`, else refused as overload) and
//! wait for their rows or for the lead to be handed to them ([`Waiting`]), and leave the
//! queue as soon as their caller goes away.
//!
//! Forming and running a batch is `lead`'s; cutting rows is `rows`'.

use super::rows::compatible;
use super::{BatchError, Batcher, Forward, Outputs};
use crate::tensor::Tensor;
use std::collections::VecDeque;
use std::time::Instant;
use tokio::sync::oneshot;

/// What a queued request is told: its outputs, or that it now leads (with its own
/// inputs handed back, since it left the queue).
pub(super) enum Msg {
    Done(Outputs),
    Lead(Vec<Tensor>, usize, Instant),
}

pub(super) struct Task {
    pub(super) inputs: Vec<Tensor>,
    pub(super) rows: usize,
    pub(super) queued_at: Instant,
    pub(super) tx: oneshot::Sender<Msg>,
}

pub(super) struct State {
    pub(super) queue: VecDeque<Task>,
    pub(super) queued_rows: usize,
    /// Leaders running now (at most `num_batch_threads`).
    pub(super) leaders: usize,
    /// Leaders waiting to fill their batch (`batch_timeout_micros`): at most one. While
    /// one waits, new requests queue for it instead of taking another free slot.
    pub(super) filling: usize,
}

/// A queued request's wait for its answer or the lead. A leader may send the lead in the
/// instant between the caller going away and the task leaving the queue: the send
/// succeeds, nobody receives it, and with the lead lost the version would never run
/// another batch (`wrk` stopping 64 connections at once did it within a few rounds). So
/// a wait dropped before it got its message closes the channel and passes on a lead
/// that arrived.
struct Waiting<'a> {
    batcher: &'a Batcher,
    rx: Option<oneshot::Receiver<Msg>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Msg::Lead(..)) = rx.try_recv() {
                self.batcher.pass_lead();
            }
            // The request leaves the queue now, not when a leader next looks: rows of
            // callers that are gone must not fill the queue and turn others away (429).
            self.batcher.drop_cancelled();
        }
    }
}

impl Batcher {
    pub(super) async fn submit<F: Forward>(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        forward: &F,
    ) -> Outputs {
        let queued = {
            let mut st = self.state.lock().unwrap();
            if st.leaders < self.policy.num_batch_threads && st.filling == 0 {
                // The device is free: lead at once, no queueing, no hand-off. With a
                // batch timeout, an idle device may wait to fill this batch; while it
                // does, the requests that arrive queue for it (the branch below) rather
                // than each taking a free slot and waiting on its own.
                st.leaders += 1;
                let fill =
                    !self.policy.batch_timeout.is_zero() && rows < self.policy.max_batch_size;
                if fill {
                    st.filling += 1;
                }
                Ok((inputs, fill))
            } else {
                let limit = self.policy.max_enqueued_batches * self.policy.max_batch_size;
                if st.queued_rows + rows > limit {
                    return Err(BatchError::QueueFull(format!(
                        "the model's queue is full ({} rows waiting, max_enqueued_batches = {}); retry shortly",
                        st.queued_rows, self.policy.max_enqueued_batches
                    )));
                }
                let (tx, rx) = oneshot::channel();
                st.queue.push_back(Task {
                    inputs,
                    rows,
                    queued_at: Instant::now(),
                    tx,
                });
                st.queued_rows += rows;
                self.metrics.set_queue_depth(st.queue.len());
                if !self.policy.batch_timeout.is_zero() {
                    self.queued.notify_waiters();
                }
                Err(rx)
            }
        };
        match queued {
            Ok((inputs, fill)) => self.lead(inputs, rows, Instant::now(), fill, forward).await,
            Err(rx) => {
                // Dropping this future (the client went away) drops the wait: leaders then
                // skip the task, and a lead that reached it in the meantime is passed on.
                let mut waiting = Waiting {
                    batcher: self,
                    rx: Some(rx),
                };
                let msg = waiting.rx.as_mut().expect("set above").await;
                waiting.rx = None;
                match msg {
                    Ok(Msg::Done(out)) => out,
                    // A lead passed on from a finished batch: the device is free and this
                    // request was queued, so it runs at once, without the batch timeout.
                    Ok(Msg::Lead(inputs, rows, queued_at)) => {
                        self.lead(inputs, rows, queued_at, false, forward).await
                    }
                    Err(_) => Err(BatchError::Model("the batcher dropped the request".into())),
                }
            }
        }
    }

    /// Removes the queued requests whose caller has gone away.
    pub(super) fn drop_cancelled(&self) {
        let mut st = self.state.lock().unwrap();
        let mut freed = 0;
        st.queue.retain(|t| {
            let gone = t.tx.is_closed();
            if gone {
                freed += t.rows;
            }
            !gone
        });
        if freed > 0 {
            st.queued_rows -= freed;
            self.metrics.set_queue_depth(st.queue.len());
        }
    }

    /// Takes the oldest queued tasks that fit beside `first`: at most `room` rows, with
    /// `first`'s dtypes and non-batch dimensions. Tasks whose caller is gone are dropped.
    pub(super) fn take_batch(&self, first: &[Tensor], room: usize) -> Vec<Task> {
        let mut st = self.state.lock().unwrap();
        let mut batch: Vec<Task> = Vec::new();
        let mut rows = 0;
        let mut budget = self
            .policy
            .padding
            .as_ref()
            .map(|_| super::pad::PadBudget::new(first));
        while let Some(front) = st.queue.front() {
            if front.tx.is_closed() {
                let t = st.queue.pop_front().unwrap();
                st.queued_rows -= t.rows;
                continue;
            }
            let fits = match &self.policy.padding {
                Some(p) => p.compatible(first, &front.inputs),
                None => compatible(first, &front.inputs),
            };
            if rows + front.rows > room || !fits {
                break;
            }
            if budget.as_mut().is_some_and(|b| !b.admits(&front.inputs)) {
                // Padding it in would cost more than MAX_PAD_FACTOR: it leads a batch
                // of its own later.
                break;
            }
            let t = st.queue.pop_front().unwrap();
            st.queued_rows -= t.rows;
            rows += t.rows;
            batch.push(t);
        }
        self.lead_on_free_slots(&mut st, false);
        self.metrics.set_queue_depth(st.queue.len());
        batch
    }
}
