//! Where a client's completions wait to be picked up.
//!
//! The core hands each client its completions in batches. Most go to one
//! queue that the pool's result thread drains; a job a caller has said it will
//! wait for itself (`expect`) gets its completion put aside for that caller,
//! who is woken directly — a synchronous `apply` then costs one thread
//! wake-up fewer than a trip through the result thread. A job *offered* to
//! its caller (`apply_async`, `submit`) is put aside only while a caller
//! waits for it; arriving with nobody waiting, it goes to the queue, so that
//! its callbacks run and `join` sees it done without anyone asking.

use std::collections::hash_map::Entry;
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
    /// Jobs a caller waits (or may wait) for, with their completion once it
    /// is put aside.
    expected: HashMap<JobId, Expected>,
    closed: bool,
}

struct Expected {
    completion: Option<Completion>,
    /// Put the completion aside even while nobody waits (`expect`: the
    /// caller is about to); else only while `waiting` callers are there.
    hold: bool,
    waiting: u32,
}

/// What waiting for an offered job came to.
#[derive(Debug)]
pub enum Waited {
    /// The completion, now the caller's alone.
    Done(Completion),
    /// Not in yet; the job stays offered.
    TimedOut,
    /// Not for this caller: it went to the queue, or another caller took
    /// it, or the job was forgotten.
    Elsewhere,
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
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.expected.is_empty() {
                // Nobody waits for anything: no lookup per completion.
                queued = !batch.is_empty();
                st.queue.extend(batch);
            } else {
                for c in batch {
                    match st.expected.entry(c.job) {
                        Entry::Occupied(mut e) if e.get().hold || e.get().waiting > 0 => {
                            e.get_mut().completion = Some(c);
                            direct = true;
                        }
                        entry => {
                            if let Entry::Occupied(e) = entry {
                                // Offered, and nobody waits: the result thread's.
                                e.remove();
                            }
                            st.queue.push(c);
                            queued = true;
                        }
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
        self.lock().expected.insert(job, Expected { completion: None, hold: true, waiting: 0 });
    }

    /// A caller may wait for `job` itself (`wait_offered`); its completion
    /// goes to the queue if it arrives while nobody does. Call before
    /// submitting it.
    pub fn offer(&self, job: JobId) {
        self.lock().expected.insert(job, Expected { completion: None, hold: false, waiting: 0 });
    }

    /// Wait up to `timeout` for an expected job's completion: `Ok(None)` if
    /// it is not in yet (the job stays expected), `Err(Closed)` if it never
    /// will be.
    pub fn wait(&self, job: JobId, timeout: Duration) -> Result<Option<Completion>> {
        match self.wait_offered(job, timeout)? {
            Waited::Done(c) => Ok(Some(c)),
            Waited::TimedOut => Ok(None),
            Waited::Elsewhere => Err(Error::Closed),
        }
    }

    /// Wait up to `timeout` for an offered (or expected) job's completion.
    /// `Err(Closed)` if it never will come.
    pub fn wait_offered(&self, job: JobId, timeout: Duration) -> Result<Waited> {
        let start = Instant::now();
        let deadline = start + timeout;
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            match st.expected.get_mut(&job) {
                Some(e) => e.waiting += 1,
                None if st.closed => return Err(Error::Closed),
                None => return Ok(Waited::Elsewhere),
            }
        }
        // A short task's completion is often back within a few tens of
        // microseconds: look for it for a while before going to sleep, which
        // saves the wake-up (expensive on virtual machines).
        // One caller at a time does so, so that many threads waiting at once
        // do not take the CPU from the executors.
        if !self.spinning.swap(true, Ordering::Acquire) {
            while start.elapsed() < SPIN.min(timeout) {
                if let Ok(st) = self.state.try_lock() {
                    if st.closed || !matches!(st.expected.get(&job), Some(e) if e.completion.is_none()) {
                        break;
                    }
                }
                std::hint::spin_loop();
            }
            self.spinning.store(false, Ordering::Release);
        }
        let mut st = self.lock();
        let waited = loop {
            let state = &mut *st;
            match state.expected.get_mut(&job) {
                Some(e) => {
                    if let Some(c) = e.completion.take() {
                        state.expected.remove(&job);
                        return Ok(Waited::Done(c));
                    }
                }
                None if state.closed => return Err(Error::Closed),
                None => return Ok(Waited::Elsewhere),
            }
            if st.closed {
                st.expected.remove(&job);
                return Err(Error::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Waited::TimedOut;
            }
            st = self.direct.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        };
        if let Some(e) = st.expected.get_mut(&job) {
            e.waiting -= 1;
        }
        Ok(waited)
    }

    /// The caller gave up on `job`: its completion, already in or still to
    /// come, goes to the queue like any other, and whoever waits for it
    /// directly stops (`Waited::Elsewhere`).
    pub fn forget(&self, job: JobId) {
        let arrived = self.lock().expected.remove(&job).and_then(|e| e.completion);
        self.direct.notify_all();
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

    /// Until `n` callers wait for `job` (a test's handshake, no sleep).
    fn until_waiting(mb: &Mailbox, job: JobId, n: u32) {
        while mb.lock().expected.get(&job).map_or(0, |e| e.waiting) != n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn an_offered_job_is_put_aside_only_while_a_caller_waits() {
        let mb = Arc::new(Mailbox::default());
        // Nobody waits: it goes to the queue, and a later wait is told so.
        mb.offer(JobId(1));
        mb.deliver(vec![done(1)]);
        assert!(matches!(mb.wait_offered(JobId(1), Duration::from_secs(30)), Ok(Waited::Elsewhere)));
        assert_eq!(mb.recv(Duration::ZERO).unwrap()[0].job, JobId(1));
        // A caller waits: it is the caller's, and the queue never sees it.
        mb.offer(JobId(2));
        let waiter = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.wait_offered(JobId(2), Duration::from_secs(30)))
        };
        until_waiting(&mb, JobId(2), 1);
        mb.deliver(vec![done(2)]);
        assert!(matches!(waiter.join().unwrap(), Ok(Waited::Done(c)) if c.job == JobId(2)));
        assert!(mb.recv(Duration::ZERO).unwrap().is_empty());
        // A caller that gave up leaves it offered: it arrives on the queue.
        mb.offer(JobId(3));
        assert!(matches!(mb.wait_offered(JobId(3), Duration::from_millis(1)), Ok(Waited::TimedOut)));
        mb.deliver(vec![done(3)]);
        assert_eq!(mb.recv(Duration::ZERO).unwrap()[0].job, JobId(3));
        assert!(mb.lock().expected.is_empty());
    }

    #[test]
    fn forgetting_an_offered_job_sends_its_waiter_elsewhere() {
        let mb = Arc::new(Mailbox::default());
        mb.offer(JobId(4));
        let waiter = {
            let mb = mb.clone();
            std::thread::spawn(move || mb.wait_offered(JobId(4), Duration::from_secs(30)))
        };
        until_waiting(&mb, JobId(4), 1);
        mb.forget(JobId(4));
        assert!(matches!(waiter.join().unwrap(), Ok(Waited::Elsewhere)));
        mb.close();
        assert!(matches!(mb.wait_offered(JobId(4), Duration::ZERO), Err(Error::Closed)));
    }
}
