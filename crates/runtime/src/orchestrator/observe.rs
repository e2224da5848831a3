//! What the core keeps only while someone watches (a dashboard, metrics):
//! how long tasks ran, and each described job's progress and errors. An
//! orchestrator without a dashboard has no [`Observer`], and pays nothing
//! for it per task.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::{ClientId, JobId};

/// Upper bounds, in seconds, of the task-duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    60.0, 300.0,
];
/// Jobs kept; past it the oldest finished one goes first.
pub const JOBS_KEPT: usize = 256;
/// Errors kept per job, and characters kept per error.
pub const ERRORS_KEPT: usize = 20;
const ERROR_CHARS: usize = 8192;

/// Counts of task running times, per bucket of [`DURATION_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// One count per bucket, plus one for the times above the last bound.
    pub counts: [u64; DURATION_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let i = DURATION_BUCKETS.partition_point(|&b| b < seconds);
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// `(upper bound, observations in this bucket alone)`, the last bound
    /// `+Inf`: what the metrics encoder takes (it adds them up itself).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        bounds.zip(self.counts).collect()
    }
}

/// A task that ended in an error, with what the user should read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub index: u32,
    /// The remote traceback, or why the task was given up.
    pub text: String,
}

/// One `map`, `apply`, `imap`, ... as its pool described it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub client: ClientId,
    pub job: JobId,
    /// `map`, `starmap`, `apply`, `imap`, `submit`, ...
    pub kind: String,
    /// The function's name.
    pub name: String,
    /// Items of the input, when known (an `imap` of a generator has none).
    pub items: Option<u64>,
    /// Tasks (chunks) submitted so far.
    pub tasks: u64,
    /// Tasks that returned a value.
    pub done: u64,
    /// Tasks that raised, or were given up.
    pub failed: u64,
    /// Tasks run again after their executor died.
    pub retried: u64,
    /// Tasks neither done nor failed, nor withdrawn or cancelled.
    pub pending: u64,
    pub errors: Vec<TaskError>,
    /// Since it was described.
    pub age: Duration,
    /// From its description to its last completion, once nothing is pending.
    pub elapsed: Option<Duration>,
}

struct JobEntry {
    info: JobInfo,
    started: Instant,
    last: Instant,
}

/// The core's watched state. See the module's text.
#[derive(Default)]
pub(crate) struct Observer {
    pub(crate) durations: Histogram,
    jobs: HashMap<(ClientId, JobId), JobEntry>,
    order: VecDeque<(ClientId, JobId)>,
}

impl Observer {
    pub(crate) fn task_ran(&mut self, micros: u64) {
        self.durations.observe(micros as f64 / 1e6);
    }

    pub(crate) fn describe(
        &mut self,
        client: ClientId,
        job: JobId,
        kind: String,
        name: String,
        items: Option<u64>,
        now: Instant,
    ) {
        let key = (client, job);
        if self.jobs.contains_key(&key) {
            return;
        }
        if self.jobs.len() >= JOBS_KEPT {
            self.evict();
        }
        let info = JobInfo {
            client,
            job,
            kind,
            name,
            items,
            tasks: 0,
            done: 0,
            failed: 0,
            retried: 0,
            pending: 0,
            errors: Vec::new(),
            age: Duration::ZERO,
            elapsed: None,
        };
        self.jobs.insert(key, JobEntry { info, started: now, last: now });
        self.order.push_back(key);
    }

    /// The oldest finished job goes, or else the oldest.
    fn evict(&mut self) {
        let pos = self.order.iter().position(|k| self.jobs.get(k).is_none_or(|e| e.info.pending == 0));
        if let Some(key) = self.order.remove(pos.unwrap_or(0)) {
            self.jobs.remove(&key);
        }
    }

    fn entry(&mut self, client: ClientId, job: JobId) -> Option<&mut JobEntry> {
        self.jobs.get_mut(&(client, job))
    }

    pub(crate) fn submitted(&mut self, client: ClientId, job: JobId, tasks: usize) {
        if let Some(e) = self.entry(client, job) {
            e.info.tasks += tasks as u64;
            e.info.pending += tasks as u64;
        }
    }

    /// A task of the job left the core: `Ok` done, `Err` failed with a text
    /// (`None`: it went without a result: withdrawn or cancelled).
    pub(crate) fn ended(
        &mut self,
        client: ClientId,
        job: JobId,
        outcome: Option<Result<(), TaskError>>,
        now: Instant,
    ) {
        if let Some(e) = self.entry(client, job) {
            e.info.pending = e.info.pending.saturating_sub(1);
            e.last = now;
            match outcome {
                Some(Ok(())) => e.info.done += 1,
                Some(Err(err)) => {
                    e.info.failed += 1;
                    push_error(&mut e.info.errors, err);
                }
                None => {}
            }
        }
    }

    /// A task that returned turned out to be an exception the function
    /// raised (the pool reports it once it has unpickled the outcome).
    pub(crate) fn raised(&mut self, client: ClientId, job: JobId, err: TaskError) {
        if let Some(e) = self.entry(client, job) {
            e.info.done = e.info.done.saturating_sub(1);
            e.info.failed += 1;
            push_error(&mut e.info.errors, err);
        }
    }

    pub(crate) fn retried(&mut self, client: ClientId, job: JobId) {
        if let Some(e) = self.entry(client, job) {
            e.info.retried += 1;
        }
    }

    /// Every kept job, oldest first.
    pub(crate) fn jobs(&self, now: Instant) -> Vec<JobInfo> {
        self.order
            .iter()
            .filter_map(|k| self.jobs.get(k))
            .map(|e| {
                let mut info = e.info.clone();
                info.age = now.saturating_duration_since(e.started);
                if info.pending == 0 && info.tasks > 0 {
                    info.elapsed = Some(e.last.saturating_duration_since(e.started));
                }
                info
            })
            .collect()
    }
}

fn push_error(errors: &mut Vec<TaskError>, mut err: TaskError) {
    if errors.len() < ERRORS_KEPT {
        if err.text.len() > ERROR_CHARS {
            let mut cut = ERROR_CHARS;
            while !err.text.is_char_boundary(cut) {
                cut -= 1;
            }
            err.text.truncate(cut);
            err.text.push_str("\n[...]");
        }
        errors.push(err);
    }
}

/// Why a connection was refused before it became a worker: the label of
/// `distripool_worker_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A key that differs, or none on one side.
    Auth,
    /// Another protocol version.
    Version,
    /// Another cluster name.
    Cluster,
    /// Encryption on at one end, off at the other.
    Encryption,
    /// Not the protocol, or a broken handshake.
    Protocol,
    /// TLS refused it.
    Tls,
    /// The handshake ran past its deadline.
    Timeout,
    /// Too many handshakes at once: the oldest was dropped.
    Overload,
    /// The connection failed during the handshake.
    Io,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Auth,
        Refusal::Version,
        Refusal::Cluster,
        Refusal::Encryption,
        Refusal::Protocol,
        Refusal::Tls,
        Refusal::Timeout,
        Refusal::Overload,
        Refusal::Io,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Auth => "auth",
            Refusal::Version => "version",
            Refusal::Cluster => "cluster",
            Refusal::Encryption => "encryption",
            Refusal::Protocol => "protocol",
            Refusal::Tls => "tls",
            Refusal::Timeout => "timeout",
            Refusal::Overload => "overload",
            Refusal::Io => "io",
        }
    }

    pub(crate) fn of(e: &crate::Error) -> Refusal {
        use distripool_protocol::HandshakeError as H;
        match e {
            crate::Error::Handshake(h) if h.is_auth_failure() => Refusal::Auth,
            crate::Error::Handshake(H::VersionMismatch { .. }) => Refusal::Version,
            crate::Error::Handshake(H::WrongCluster { .. } | H::RejectedCluster { .. }) => Refusal::Cluster,
            crate::Error::Handshake(H::SealingMismatch { .. }) => Refusal::Encryption,
            crate::Error::Handshake(_) | crate::Error::Frame(_) | crate::Error::Cipher(_) => {
                Refusal::Protocol
            }
            crate::Error::Tls(_) => Refusal::Tls,
            crate::Error::Timeout(_) => Refusal::Timeout,
            _ => Refusal::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_each_time_in_its_bucket() {
        let mut h = Histogram::default();
        for s in [0.00005, 0.0001, 0.003, 1000.0] {
            h.observe(s);
        }
        // At or below each bound, as Prometheus shows them.
        let mut total = 0;
        let c: Vec<(f64, u64)> = h
            .buckets()
            .into_iter()
            .map(|(b, n)| {
                total += n;
                (b, total)
            })
            .collect();
        assert_eq!(c.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(c[0], (0.0001, 2), "a bound is inclusive");
        assert_eq!(c[5], (0.005, 3));
        assert_eq!(c[DURATION_BUCKETS.len() - 1].1, 3);
        assert_eq!(*c.last().unwrap(), (f64::INFINITY, 4));
        assert_eq!(h.count, 4);
    }

    #[test]
    fn a_job_counts_its_tasks_and_keeps_its_first_errors() {
        let mut o = Observer::default();
        let (c, j, t) = (ClientId(1), JobId(2), Instant::now());
        o.describe(c, j, "map".into(), "f".into(), Some(100), t);
        o.submitted(c, j, 30);
        for i in 0..25 {
            o.ended(c, j, Some(Err(TaskError { index: i, text: "x".repeat(10_000) })), t);
        }
        o.ended(c, j, Some(Ok(())), t);
        o.ended(c, j, Some(Ok(())), t);
        o.raised(c, j, TaskError { index: 26, text: "ValueError".into() });
        o.ended(c, j, None, t);
        let jobs = o.jobs(t);
        let info = &jobs[0];
        assert_eq!((info.tasks, info.done, info.failed, info.pending), (30, 1, 26, 2));
        assert_eq!(info.errors.len(), ERRORS_KEPT);
        assert!(info.errors[0].text.ends_with("[...]") && info.errors[0].text.len() < 8300);
        assert!(info.elapsed.is_none(), "two tasks are pending");
    }

    #[test]
    fn the_table_drops_finished_jobs_first() {
        let mut o = Observer::default();
        let t = Instant::now();
        for j in 0..JOBS_KEPT as u64 {
            o.describe(ClientId(1), JobId(j), "apply".into(), "f".into(), Some(1), t);
            o.submitted(ClientId(1), JobId(j), 1);
        }
        o.ended(ClientId(1), JobId(7), Some(Ok(())), t);
        o.describe(ClientId(1), JobId(999), "map".into(), "g".into(), None, t);
        let jobs = o.jobs(t);
        assert_eq!(jobs.len(), JOBS_KEPT);
        assert!(jobs.iter().all(|j| j.job != JobId(7)), "the finished job went first");
        assert_eq!(jobs[0].job, JobId(0), "running jobs stay");
    }
}
