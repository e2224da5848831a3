//! The distripool scheduler as a sans-I/O state machine.
//!
//! The runtime feeds it events — a worker joined or was lost, a task was
//! submitted, finished, crashed its executor, or its group was cancelled — and
//! drains [`Command`]s: dispatch this attempt to that worker, deliver this
//! result, fail this task, cancel these tasks on that worker. There are no
//! sockets, threads or clocks in here, so every interleaving can be tested.
//!
//! Guarantees, each covered by the tests below:
//! - every submitted task ends in exactly one [`Command::Deliver`] or
//!   [`Command::Fail`], unless its group is cancelled first;
//! - a result is accepted only from the worker that holds the task's current
//!   attempt, so late or duplicated results are dropped;
//! - a task that crashes its executor `max_crashes` times, or loses its worker
//!   `max_losses` times, fails instead of being retried forever; one that runs
//!   past its time limit fails at once;
//! - nothing is dispatched to a worker after it is lost, and no worker holds
//!   more tasks than its capacity.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Defines an id: a `u64` of its own type, so that one kind of id cannot be
/// passed where another is meant. It hashes as its `u64` (see [`IdHasher`]).
#[macro_export]
macro_rules! define_id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

define_id_type!(
    /// A task: one chunk of one job, for the life of the orchestrator.
    TaskId
);
define_id_type!(
    /// A worker (one agent session).
    WorkerId
);
define_id_type!(
    /// Tasks are grouped by the client (pool) that submitted them.
    GroupId
);

/// Hashes the integer ids the runtime hands out itself (tasks, workers,
/// functions; never a key chosen by a peer) instead of SipHash. The low bits,
/// which pick the bucket, are the id itself, so ids handed out in sequence sit
/// side by side in the table (and in the cache); the top bits, which the table
/// compares as a tag, are mixed by one multiplication.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let n = self.0.rotate_left(26) ^ n;
        self.0 = n ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (0x7F << 57));
    }
}

/// A map keyed by our own integer ids.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A set of our own integer ids.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// Retry limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// A task fails after its executor died this many times while running it.
    pub max_crashes: u32,
    /// A task fails after the worker holding it was lost this many times.
    pub max_losses: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_crashes: 3, max_losses: 10 }
    }
}

/// Why a task failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// Attempts made in total.
    pub attempts: u32,
    /// How each crash or loss was reported, oldest first.
    pub reasons: Vec<String>,
}

/// What ended a task for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Its executors died `max_crashes` times.
    Crashes,
    /// Its workers were lost `max_losses` times.
    Losses,
    /// It ran past its time limit (never retried).
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P, R> {
    /// Send attempt `attempt` of `task` to `worker`.
    Dispatch { worker: WorkerId, task: TaskId, attempt: u32, payload: P },
    /// The task's outcome, to hand to its submitter. Happens at most once.
    Deliver { task: TaskId, group: GroupId, result: R },
    /// The task will not be retried any more.
    Fail { task: TaskId, group: GroupId, failure: Failure },
    /// Tell `worker` to drop or stop these tasks.
    Cancel { worker: WorkerId, tasks: Vec<TaskId> },
}

#[derive(Debug)]
struct Task<P> {
    group: GroupId,
    payload: P,
    attempt: u32,
    crashes: u32,
    losses: u32,
    worker: Option<WorkerId>,
    reasons: Vec<String>,
    /// The worker whose executor died running this task last, if any: a
    /// retry goes elsewhere when another worker has room.
    crashed_on: Option<WorkerId>,
}

#[derive(Debug)]
struct Worker {
    capacity: usize,
    tasks: IdSet<TaskId>,
    /// Its free slots as its entry in `room` says (0: no entry).
    indexed: usize,
    /// Changed since `room` was brought in step with it.
    stale: bool,
}

impl Worker {
    fn free(&self) -> usize {
        self.capacity.saturating_sub(self.tasks.len())
    }
}

#[derive(Debug)]
pub struct Scheduler<P, R> {
    config: Config,
    tasks: IdMap<TaskId, Task<P>>,
    queue: VecDeque<TaskId>,
    workers: IdMap<WorkerId, Worker>,
    /// Workers with free slots as `(free, Reverse(id))`: the last entry is
    /// the one to fill next (most free slots, then the lowest id), so
    /// choosing a worker costs O(log workers). Brought in step with
    /// `workers` before it is read: a worker that finishes many tasks at
    /// once moves in it once, not once per task.
    room: BTreeSet<(usize, Reverse<WorkerId>)>,
    /// Workers changed since `room` was last brought in step.
    stale: Vec<WorkerId>,
    /// Queued tasks that crashed an executor and so avoid its worker: while
    /// there are any, tasks are placed one worker at a time; without them,
    /// a whole queue at once ([`fill`](Self::fill)).
    avoiding: usize,
    /// Kept between [`fill`](Self::fill)s.
    scratch: fill::Scratch,
    /// Scheduling waits for [`resume`](Self::resume).
    deferred: bool,
    out: VecDeque<Command<P, R>>,
}

impl<P: Clone, R> Scheduler<P, R> {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            tasks: IdMap::default(),
            queue: VecDeque::new(),
            workers: IdMap::default(),
            room: BTreeSet::new(),
            stale: Vec::new(),
            avoiding: 0,
            scratch: fill::Scratch::default(),
            deferred: false,
            out: VecDeque::new(),
        }
    }

    /// Hold scheduling until [`resume`](Self::resume): events fed meanwhile
    /// (a batch of results from one worker) free slots without handing
    /// each one out again at once, and the queued tasks then go out
    /// together, the worker with the most free slots first, as always.
    pub fn defer(&mut self) {
        self.deferred = true;
    }

    /// Schedule what waited since [`defer`](Self::defer).
    pub fn resume(&mut self) {
        self.deferred = false;
        self.schedule();
    }

    /// Next command to carry out, if any.
    pub fn poll_command(&mut self) -> Option<Command<P, R>> {
        self.out.pop_front()
    }

    /// How many of the commands not yet polled, from the next one on, are
    /// dispatches to `worker`: the rest of its run.
    pub fn dispatches_next(&self, worker: WorkerId) -> usize {
        let to = |c: &&Command<P, R>| matches!(c, Command::Dispatch { worker: w, .. } if *w == worker);
        self.out.iter().take_while(to).count()
    }

    /// Tasks waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Tasks submitted and not yet delivered, failed or cancelled.
    pub fn pending(&self) -> usize {
        self.tasks.len()
    }

    /// Make room for `additional` more tasks at once (a large submission).
    pub fn reserve(&mut self, additional: usize) {
        self.tasks.reserve(additional);
        self.queue.reserve(additional);
    }

    pub fn submit(&mut self, task: TaskId, group: GroupId, payload: P) {
        let previous = self.tasks.insert(
            task,
            Task {
                group,
                payload,
                attempt: 0,
                crashes: 0,
                losses: 0,
                worker: None,
                reasons: Vec::new(),
                crashed_on: None,
            },
        );
        assert!(previous.is_none(), "task id {task} submitted twice");
        self.queue.push_back(task);
        if !self.room.is_empty() || !self.stale.is_empty() {
            self.schedule();
        }
    }

    /// A worker joined, or changed how many tasks it takes at once.
    pub fn worker_joined(&mut self, worker: WorkerId, capacity: usize) {
        self.workers.entry(worker).or_insert(Worker {
            capacity: 0,
            tasks: IdSet::default(),
            indexed: 0,
            stale: false,
        });
        self.update_worker(worker, |w| w.capacity = capacity);
        self.schedule();
    }

    /// A worker is gone: its tasks go back to the queue (or fail, past the limit).
    pub fn worker_lost(&mut self, worker: WorkerId, reason: &str) {
        self.remove_worker(worker, Some(reason));
    }

    /// A worker left on purpose, saying so: the tasks it held go back to the
    /// queue without counting as a loss.
    pub fn worker_left(&mut self, worker: WorkerId) {
        self.remove_worker(worker, None);
    }

    /// Tasks `worker` holds now, or `None` for a worker it does not know.
    pub fn worker_load(&self, worker: WorkerId) -> Option<usize> {
        self.workers.get(&worker).map(|w| w.tasks.len())
    }

    /// True when `task` is known and not finished: queued or running.
    pub fn is_pending(&self, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
    }

    /// True when `task` is on a worker now (not queued, not done).
    pub fn is_running(&self, task: TaskId) -> bool {
        self.tasks.get(&task).is_some_and(|t| t.worker.is_some())
    }

    fn remove_worker(&mut self, worker: WorkerId, lost: Option<&str>) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.room.remove(&(w.indexed, Reverse(worker)));
        // Requeue in reverse so that the oldest task ends up first in line.
        let mut held: Vec<TaskId> = w.tasks.into_iter().collect();
        held.sort_unstable();
        for task in held.into_iter().rev() {
            let Some(t) = self.tasks.get_mut(&task) else {
                continue;
            };
            t.worker = None;
            if let Some(reason) = lost {
                t.losses += 1;
                t.reasons.push(format!("attempt {}: worker lost ({reason})", t.attempt));
                if t.losses >= self.config.max_losses {
                    self.fail(task, FailureKind::Losses);
                    continue;
                }
            }
            self.requeue(task);
        }
        self.schedule();
    }

    /// A result arrived. Returns false (and drops it) when it is stale: the
    /// task is done, cancelled, or now belongs to another attempt.
    pub fn task_finished(&mut self, worker: WorkerId, task: TaskId, attempt: u32, result: R) -> bool {
        if !self.is_current(worker, task, attempt) {
            return false;
        }
        let t = self.tasks.remove(&task).expect("current task exists");
        self.release(worker, task);
        self.out.push_back(Command::Deliver { task, group: t.group, result });
        self.schedule();
        true
    }

    /// The executor running this attempt died. Returns false when stale.
    pub fn task_crashed(&mut self, worker: WorkerId, task: TaskId, attempt: u32, reason: &str) -> bool {
        if !self.is_current(worker, task, attempt) {
            return false;
        }
        self.release(worker, task);
        let t = self.tasks.get_mut(&task).expect("current task exists");
        t.worker = None;
        t.crashes += 1;
        t.crashed_on = Some(worker);
        t.reasons.push(format!("attempt {attempt}: {reason}"));
        if t.crashes >= self.config.max_crashes {
            self.fail(task, FailureKind::Crashes);
        } else {
            self.requeue(task);
        }
        self.schedule();
        true
    }

    /// The attempt ran past its time limit: the task fails now, without a retry.
    /// Returns false when stale.
    pub fn task_timed_out(&mut self, worker: WorkerId, task: TaskId, attempt: u32, reason: &str) -> bool {
        if !self.is_current(worker, task, attempt) {
            return false;
        }
        self.release(worker, task);
        let t = self.tasks.get_mut(&task).expect("current task exists");
        t.reasons.push(format!("attempt {attempt}: {reason}"));
        self.fail(task, FailureKind::Timeout);
        self.schedule();
        true
    }

    /// Forget every task of `group`; running ones are cancelled on their workers.
    pub fn cancel_group(&mut self, group: GroupId) {
        let tasks = &self.tasks;
        self.queue.retain(|t| tasks[t].group != group);
        self.avoiding = self.queue.iter().filter(|t| tasks[t].crashed_on.is_some()).count();
        let mut per_worker: BTreeMap<WorkerId, Vec<TaskId>> = BTreeMap::new();
        self.tasks.retain(|&id, t| {
            if t.group != group {
                return true;
            }
            if let Some(w) = t.worker {
                per_worker.entry(w).or_default().push(id);
            }
            false
        });
        for (worker, mut tasks) in per_worker {
            tasks.sort_unstable();
            self.update_worker(worker, |w| {
                for t in &tasks {
                    w.tasks.remove(t);
                }
            });
            self.out.push_back(Command::Cancel { worker, tasks });
        }
        self.schedule();
    }

    /// Take back a task that has not been dispatched yet. Returns false, and
    /// changes nothing, when it is running, finished or unknown.
    pub fn withdraw(&mut self, task: TaskId) -> bool {
        if !matches!(self.tasks.get(&task), Some(t) if t.worker.is_none()) {
            return false;
        }
        if self.tasks.remove(&task).is_some_and(|t| t.crashed_on.is_some()) {
            self.avoiding -= 1;
        }
        self.queue.retain(|&t| t != task);
        true
    }

    fn is_current(&self, worker: WorkerId, task: TaskId, attempt: u32) -> bool {
        matches!(self.tasks.get(&task), Some(t) if t.worker == Some(worker) && t.attempt == attempt)
    }

    fn release(&mut self, worker: WorkerId, task: TaskId) {
        self.update_worker(worker, |w| {
            w.tasks.remove(&task);
        });
    }

    /// Change a worker with `f`; its entry in the room index follows at the
    /// next [`sync_room`](Self::sync_room).
    fn update_worker(&mut self, worker: WorkerId, f: impl FnOnce(&mut Worker)) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        f(w);
        if !w.stale {
            w.stale = true;
            self.stale.push(worker);
        }
    }

    /// Bring the room index in step with the workers changed since.
    fn sync_room(&mut self) {
        for worker in self.stale.drain(..) {
            let Some(w) = self.workers.get_mut(&worker) else {
                continue;
            };
            w.stale = false;
            reindex(&mut self.room, worker, w);
        }
    }

    fn fail(&mut self, task: TaskId, kind: FailureKind) {
        let t = self.tasks.remove(&task).expect("failing task exists");
        self.out.push_back(Command::Fail {
            task,
            group: t.group,
            failure: Failure { kind, attempts: t.attempt, reasons: t.reasons },
        });
    }

    /// Put a task back at the front of the queue (a retry goes first).
    fn requeue(&mut self, task: TaskId) {
        if self.tasks[&task].crashed_on.is_some() {
            self.avoiding += 1;
        }
        self.queue.push_front(task);
    }

    /// Hand queued tasks to the workers with the most free slots; a task
    /// that just crashed an executor prefers any other worker with room.
    fn schedule(&mut self) {
        if self.deferred {
            return;
        }
        self.sync_room();
        // One worker at a time where that is as quick: while a retry
        // waits, with one worker to fill, or one task to place.
        while self.avoiding > 0 || self.room.len() == 1 || self.queue.len() == 1 {
            if !self.place_run() {
                return;
            }
        }
        if !self.queue.is_empty() && !self.room.is_empty() {
            self.fill();
        }
    }

    /// Give the task at the front of the queue to the worker with the most
    /// free slots (another, if it crashed there and another has room), and
    /// the tasks behind it too while that worker stays the one to fill.
    /// False when nothing could be placed.
    fn place_run(&mut self) -> bool {
        let Some(&task) = self.queue.front() else {
            return false;
        };
        let avoid = self.tasks[&task].crashed_on;
        let mut best = self.room.iter().rev().copied();
        // `rival` is the best entry of another worker: while `worker`
        // stays ahead of it, the next tasks would go to `worker` too, so
        // they do without moving its entry each time; it moves once, after.
        let (worker, rival) = match (best.next(), best.next()) {
            (None, _) => return false,
            (Some(first), Some(second)) if Some(first.1 .0) == avoid => (second.1 .0, Some(first)),
            (Some(first), second) => (first.1 .0, second),
        };
        let w = self.workers.get_mut(&worker).expect("a worker in the room index is known");
        loop {
            let task = self.queue.pop_front().expect("a task is queued");
            if dispatch(&mut self.tasks, &mut self.out, worker, w, task) {
                self.avoiding -= 1;
            }
            let free = w.free();
            let stays_best = |next: &TaskId| {
                free > 0
                    && self.tasks[next].crashed_on.is_none()
                    && rival.is_none_or(|r| (free, Reverse(worker)) > r)
            };
            if !self.queue.front().is_some_and(stays_best) {
                break;
            }
        }
        reindex(&mut self.room, worker, w);
        true
    }

    /// The room index matches the workers (for tests).
    #[cfg(test)]
    fn check_room(&mut self) {
        self.sync_room();
        let expected: BTreeSet<_> = self
            .workers
            .iter()
            .filter(|(_, w)| w.free() > 0)
            .map(|(&id, w)| (w.free(), Reverse(id)))
            .collect();
        assert_eq!(self.room, expected, "room index out of step");
        let avoiding = self.queue.iter().filter(|t| self.tasks[t].crashed_on.is_some()).count();
        assert_eq!(self.avoiding, avoiding, "count of queued retries out of step");
        assert!(
            self.deferred || self.queue.is_empty() || self.room.is_empty(),
            "tasks wait while a worker has room"
        );
    }
}

/// Give `task` to `worker` (`w`): its next attempt, dispatched. True when
/// it was a retry that avoided a worker.
fn dispatch<P: Clone, R>(
    tasks: &mut IdMap<TaskId, Task<P>>,
    out: &mut VecDeque<Command<P, R>>,
    worker: WorkerId,
    w: &mut Worker,
    task: TaskId,
) -> bool {
    w.tasks.insert(task);
    let t = tasks.get_mut(&task).expect("queued task exists");
    t.attempt += 1;
    t.worker = Some(worker);
    out.push_back(Command::Dispatch { worker, task, attempt: t.attempt, payload: t.payload.clone() });
    t.crashed_on.is_some()
}

/// Move `worker`'s entry in the room index to its free slots now.
fn reindex(room: &mut BTreeSet<(usize, Reverse<WorkerId>)>, worker: WorkerId, w: &mut Worker) {
    let free = w.free();
    if free != w.indexed {
        if w.indexed > 0 {
            room.remove(&(w.indexed, Reverse(worker)));
        }
        if free > 0 {
            room.insert((free, Reverse(worker)));
        }
        w.indexed = free;
    }
}

mod fill;
#[cfg(test)]
mod tests;
