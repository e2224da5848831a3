//! Where a client's completions wait to be picked up.
//!
//! The core hands each client its completions in batches. Most go to one
//! queue that the pool's result thread drains; a job a caller has said it will
//! wait for itself (`expect`) gets its completion put aside for that caller,
//! who is woken directly — a synchronous `apply` then costs one thread
//! wake-up fewer than a trip through the result thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_scheduler::FailureKind;

use crate::ids::JobId;
use crate::{Error, Result};

/// How a task ended, as seen by its client.
#[derive(Debug)]
pub enum Outcome {
    /// The executor's pickled outcome (a value or a Python exception).
    Done(Bytes),
    /// The task could not be completed: retries exhausted, or out of time.
    Failed { kind: FailureKind, reason: String },
}

/// One finished task of a client's job.
#[derive(Debug)]
pub struct Completion {
    pub job: JobId,
    pub index: u32,
    pub outcome: Outcome,
}

/// Most completions one `recv` returns.
const RECV_MAX: usize = 4096;
/// How long `wait` looks for a completion before it sleeps.
const SPIN: Duration = Duration::from_micros(SPIN_MICROS);
const SPIN_MICROS: u64 = 200;

#[derive(Default)]
pub struct Mailbox {
    state: Mutex<State>,
    /// The result thread waits here for the queue.
    queued: Condvar,
    /// Callers wait here for the jobs they expect.
    direct: Condvar,
    /// A caller is looking for its completion before sleeping.
    spinning: AtomicBool,
}

#[derive(Default)]
struct State {
    queue: Vec<Completion>,
    /// Jobs a caller waits for, with their completion once it is in.
    expected: HashMap<JobId, Option<Completion>>,
    closed: bool,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put a batch in: expected jobs aside, the rest on the queue.
    pub fn deliver(&self, batch: Vec<Completion>) {
        let (mut queued, mut direct) = (false, false);
        {
            let mut st = self.lock();
            for c in batch {
                match st.expected.get_mut(&c.job) {
                    Some(slot) => {
                        *slot = Some(c);
                        direct = true;
                    }
                    None => {
                        st.queue.push(c);
                        queued = true;
                    }
                }
            }
        }
        if queued {
            self.queued.notify_one();
        }
        if direct {
            self.direct.notify_all();
        }
    }

    /// No more completions will come; wake everyone.
    pub fn close(&self) {
        self.lock().closed = true;
        self.queued.notify_all();
        self.direct.notify_all();
    }

    /// Completions on the queue, waiting up to `timeout` for the first.
    /// `Err(Closed)` once closed and drained.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if !st.queue.is_empty() {
                let n = st.queue.len().min(RECV_MAX);
                return Ok(st.queue.drain(..n).collect());
            }
            if st.closed {
                return Err(Error::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            st = self.queued.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The caller will wait for `job` itself; call before submitting it.
    pub fn expect(&self, job: JobId) {
        self.lock().expected.insert(job, None);
    }

    /// Wait up to `timeout` for an expected job's completion: `Ok(None)` if
    /// it is not in yet (the job stays expected), `Err(Closed)` if it never
    /// will be.
    pub fn wait(&self, job: JobId, timeout: Duration) -> Result<Option<Completion>> {
        let start = Instant::now();
        let deadline = start + timeout;
        // A short task's completion is often back within a few tens of
        // microseconds: look for it for a while before going to sleep, which
        // saves the wake-up (expensive on virtual machines).
        // One caller at a time does so, so that many threads waiting at once
        // do not take the CPU from the executors.
        if !self.spinning.swap(true, Ordering::Acquire) {
            while start.elapsed() < SPIN.min(timeout) {
                if let Ok(st) = self.state.try_lock() {
                    if st.closed || !matches!(st.expected.get(&job), Some(None)) {
                        break;
                    }
                }
                std::hint::spin_loop();
            }
            self.spinning.store(false, Ordering::Release);
        }
        let mut st = self.lock();
        loop {
            match st.expected.get_mut(&job) {
                Some(slot @ Some(_)) => {
                    let c = slot.take();
                    st.expected.remove(&job);
                    return Ok(c);
                }
                Some(None) => {}
                None => return Err(Error::Closed),
            }
            if st.closed {
                st.expected.remove(&job);
                return Err(Error::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            st = self.direct.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The caller gave up on `job`: its completion, already in or still to
    /// come, goes to the queue like any other.
    pub fn forget(&self, job: JobId) {
        let arrived = self.lock().expected.remove(&job).flatten();
        if let Some(c) = arrived {
            self.deliver(vec![c]);
        }
    }
}

/// The core's end of a client's mailbox: dropping it (the client closed, or
/// the orchestrator stopped) closes the mailbox.
pub(crate) struct MailboxTx(pub(crate) Arc<Mailbox>);

impl Drop for MailboxTx {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(job: u64) -> Completion {
        Completion { job: JobId(job), index: 0, outcome: Outcome::Done(Bytes::from_static(b"x")) }
    }

    #[test]
    fn expected_jobs_skip_the_queue_and_the_rest_queue_in_order() {
        let mb = Arc::new(Mailbox::default());
        mb.expect(JobId(2));
        let waiter = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.wait(JobId(2), Duration::from_secs(30)))
        };
        mb.deliver(vec![done(1), done(2), done(3)]);
        assert_eq!(waiter.join().unwrap().unwrap().unwrap().job, JobId(2));
        let jobs: Vec<u64> = mb.recv(Duration::ZERO).unwrap().iter().map(|c| c.job.0).collect();
        assert_eq!(jobs, [1, 3]);
        assert!(mb.recv(Duration::ZERO).unwrap().is_empty());
    }

    #[test]
    fn waiting_times_out_then_closing_wakes_everyone() {
        let mb = Arc::new(Mailbox::default());
        mb.expect(JobId(7));
        assert!(mb.wait(JobId(7), Duration::from_millis(1)).unwrap().is_none());
        let waiter = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.wait(JobId(7), Duration::from_secs(30)))
        };
        let reader = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.recv(Duration::from_secs(30)))
        };
        drop(MailboxTx(mb.clone()));
        assert!(matches!(waiter.join().unwrap(), Err(Error::Closed)));
        assert!(matches!(reader.join().unwrap(), Err(Error::Closed)));
    }

    #[test]
    fn a_forgotten_job_goes_to_the_queue_whether_in_already_or_not() {
        let mb = Mailbox::default();
        mb.expect(JobId(1));
        mb.expect(JobId(2));
        mb.deliver(vec![done(1)]);
        mb.forget(JobId(1));
        mb.forget(JobId(2));
        mb.deliver(vec![done(2)]);
        let jobs: Vec<u64> = mb.recv(Duration::ZERO).unwrap().iter().map(|c| c.job.0).collect();
        assert_eq!(jobs, [1, 2]);
        // Queued completions are still handed out after the close.
        mb.deliver(vec![done(3)]);
        mb.close();
        assert_eq!(mb.recv(Duration::ZERO).unwrap()[0].job, JobId(3));
        assert!(matches!(mb.recv(Duration::ZERO), Err(Error::Closed)));
    }
}
