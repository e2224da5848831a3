//! The orchestrator's state machine: it owns the [`Scheduler`], the task
//! metadata and the function registry, and turns inputs (agents joining,
//! their messages, clients submitting) into frames for agents and
//! completions for clients, which it hands to a [`Comm`]. It does no I/O and
//! reads no clock, so it is tested without sockets (see `core_tests.rs`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use distripool_protocol::{FromAgent, Labels, ToAgent};
use distripool_scheduler::{Command, Config as SchedulerConfig, FailureKind, IdMap, IdSet, Scheduler};

use super::observe::{Observer, TaskError};
use super::snapshot::{EventKind, EventLog, Usage, WorkerState};
use super::spread::{Route, Spread};
use super::Stats;
use crate::agent::DEPTH;
use crate::conn::{Outgoing, SessionEnd};
use crate::ids::{ClientId, FnId, JobId, TaskId, WorkerId};
use crate::mailbox::{Completion, Outcome};
use crate::payload::Payload;

/// Functions kept after their last task, in case they are used again.
const IDLE_FUNCTIONS: usize = 64;

/// Where the core's output goes. The runtime's implementation writes to
/// channels; the tests' records everything.
pub(crate) trait Comm {
    /// Frames for one agent, in order, produced by one burst of inputs.
    fn send_agent(&mut self, worker: WorkerId, frames: Vec<Outgoing<ToAgent>>);
    /// Completions for one client, in order.
    fn deliver(&mut self, client: ClientId, completions: Vec<Completion>);
}

/// What the core is told. Withdrawing, which has an answer, is a method.
pub(crate) enum Input {
    AgentJoined {
        worker: WorkerId,
        /// Where it connected from (`local` for the in-process agent).
        peer: String,
        slots: usize,
        labels: Labels,
    },
    /// Every message an agent's reader had at hand, in order.
    AgentMessages {
        worker: WorkerId,
        msgs: Vec<(FromAgent, Bytes)>,
    },
    AgentLeft {
        worker: WorkerId,
        end: SessionEnd,
    },
    ClientOpened {
        client: ClientId,
    },
    Submit {
        client: ClientId,
        job: JobId,
        fn_id: FnId,
        function: Bytes,
        /// Blobs that executors load before the function, with their ids.
        needs: Vec<(FnId, Bytes)>,
        tasks: Vec<(u32, Payload)>,
        timeout_ms: u64,
    },
    ClientClosed {
        client: ClientId,
    },
    /// The intake refused an agent's handshake, for `reason`.
    Refused {
        peer: String,
        reason: String,
    },
    /// What a job is, for a dashboard (sent before its first submit, and
    /// only while one watches).
    Describe {
        client: ClientId,
        job: JobId,
        kind: String,
        name: String,
        items: Option<u64>,
    },
    /// A task's outcome, delivered as done, was an exception the function
    /// raised; `text` is its traceback (empty while nobody watches).
    Raised {
        client: ClientId,
        job: JobId,
        index: u32,
        text: String,
    },
}

struct TaskMeta {
    client: ClientId,
    job: JobId,
    index: u32,
    fn_id: FnId,
    timeout_ms: u64,
}

struct AgentLink {
    /// Frames for this agent produced by the current burst of inputs.
    outbox: Vec<Outgoing<ToAgent>>,
    /// Functions this agent holds.
    fns: IdSet<FnId>,
    slots: usize,
    /// `host (address, agent pid N)`, for messages.
    name: String,
    peer: String,
    labels: Labels,
    state: WorkerState,
    joined: Instant,
    last_heard: Instant,
    tasks_done: u64,
    crashes: u64,
    /// Why it said it was leaving.
    goodbye: Option<String>,
    /// Its executors' CPU and memory, as last reported.
    usage: Option<Usage>,
}

struct FnEntry {
    bytes: Bytes,
    /// Blobs that go to an agent before this function.
    needs: Vec<FnId>,
    /// Tasks not yet completed that call it (or a function that needs it).
    refs: usize,
}

pub(crate) struct Core {
    sched: Scheduler<Payload, Bytes>,
    agents: IdMap<WorkerId, AgentLink>,
    /// Each open client's completions of the current burst.
    clients: IdMap<ClientId, Vec<Completion>>,
    /// Agents and clients with something in their outbox.
    dirty_agents: Vec<WorkerId>,
    dirty_clients: Vec<ClientId>,
    meta: IdMap<TaskId, TaskMeta>,
    fns: IdMap<FnId, FnEntry>,
    idle_fns: VecDeque<FnId>,
    /// Which agent each agent gets a large function from.
    spread: Spread,
    next_task: u64,
    stats: Arc<Stats>,
    events: EventLog,
    /// Present while a dashboard watches: task times, jobs.
    observer: Option<Box<Observer>>,
    /// The time of the input being handled.
    now: Instant,
}

impl Core {
    /// With `observe`, the core also keeps what a dashboard shows (see
    /// [`Observer`]).
    pub(crate) fn new(max_crashes: u32, stats: Arc<Stats>, now: Instant, observe: bool) -> Self {
        Self {
            sched: Scheduler::new(SchedulerConfig { max_crashes, max_losses: 10 }),
            agents: IdMap::default(),
            clients: IdMap::default(),
            dirty_agents: Vec::new(),
            dirty_clients: Vec::new(),
            meta: IdMap::default(),
            fns: IdMap::default(),
            idle_fns: VecDeque::new(),
            spread: Spread::default(),
            next_task: 1,
            stats,
            events: EventLog::default(),
            observer: observe.then(Box::default),
            now,
        }
    }

    /// Hand every outbox filled since the last flush to `comm`: one batch
    /// per agent and per client, however many inputs filled it.
    pub(crate) fn flush(&mut self, comm: &mut impl Comm) {
        for worker in self.dirty_agents.drain(..) {
            if let Some(link) = self.agents.get_mut(&worker) {
                if !link.outbox.is_empty() {
                    comm.send_agent(worker, std::mem::take(&mut link.outbox));
                }
            }
        }
        for client in self.dirty_clients.drain(..) {
            if let Some(outbox) = self.clients.get_mut(&client) {
                if !outbox.is_empty() {
                    comm.deliver(client, std::mem::take(outbox));
                }
            }
        }
    }

    /// Handle one input that arrived at `now`.
    pub(crate) fn handle(&mut self, input: Input, now: Instant) {
        self.now = now;
        match input {
            Input::AgentJoined { worker, peer, slots, labels } => {
                let name = format!("{} ({peer}, agent pid {})", labels.host, labels.pid);
                self.spread.joined(worker, &peer);
                self.events.push(now, EventKind::WorkerJoined { worker, name: name.clone() });
                self.agents.insert(
                    worker,
                    AgentLink {
                        outbox: Vec::new(),
                        fns: IdSet::default(),
                        slots,
                        name,
                        peer,
                        labels,
                        state: WorkerState::Connected,
                        joined: now,
                        last_heard: now,
                        tasks_done: 0,
                        crashes: 0,
                        goodbye: None,
                        usage: None,
                    },
                );
                self.stats.workers.fetch_add(1, Ordering::Relaxed);
                self.stats.slots.fetch_add(slots, Ordering::Relaxed);
                // What the agent holds per executor until it says otherwise
                // (`Capacity`): one running, one prefetched.
                self.sched.worker_joined(worker, slots * DEPTH);
            }
            Input::AgentLeft { worker, end } => {
                for (fn_id, w, route) in self.spread.left(worker) {
                    self.give_blob(w, fn_id, route);
                }
                if let Some(link) = self.agents.remove(&worker) {
                    self.stats.workers.fetch_sub(1, Ordering::Relaxed);
                    self.stats.slots.fetch_sub(link.slots, Ordering::Relaxed);
                    if let Some(reason) = link.goodbye {
                        // It said goodbye: what it held is back in the queue already.
                        self.stats.workers_left.fetch_add(1, Ordering::Relaxed);
                        self.events.push(now, EventKind::WorkerLeft { worker, name: link.name, reason });
                    } else {
                        self.stats.workers_lost.fetch_add(1, Ordering::Relaxed);
                        let held = self.sched.worker_load(worker).unwrap_or(0);
                        self.sched.worker_lost(worker, &format!("worker {} lost: {end}", link.name));
                        let reason = end.to_string();
                        self.events.push(
                            now,
                            EventKind::WorkerLost { worker, name: link.name, reason, tasks: held },
                        );
                    }
                }
            }
            Input::AgentMessages { worker, msgs } => {
                // The slots a batch of results frees are handed out together
                // after it: to that agent, usually, in one write, rather than
                // a task at a time, each to whichever agent had most room.
                self.sched.defer();
                for (msg, payload) in msgs {
                    self.agent_message(worker, msg, payload);
                }
                self.sched.resume();
            }
            Input::ClientOpened { client } => {
                self.clients.insert(client, Vec::new());
            }
            Input::Submit { client, job, fn_id, function, needs, tasks, timeout_ms } => {
                if !self.clients.contains_key(&client) {
                    return;
                }
                let need_ids = needs.iter().map(|(id, _)| *id).collect();
                for (id, bytes) in needs {
                    let entry = self.fns.entry(id).or_insert(FnEntry { bytes, needs: Vec::new(), refs: 0 });
                    entry.refs += tasks.len();
                }
                let entry =
                    self.fns.entry(fn_id).or_insert(FnEntry { bytes: function, needs: need_ids, refs: 0 });
                entry.refs += tasks.len();
                self.stats.tasks_submitted.fetch_add(tasks.len() as u64, Ordering::Relaxed);
                if let Some(o) = &mut self.observer {
                    o.submitted(client, job, tasks.len());
                }
                self.meta.reserve(tasks.len());
                self.sched.reserve(tasks.len());
                // Placed together once all are in: worker by worker, as
                // one at a time would place them (see the scheduler's `fill`).
                self.sched.defer();
                for (index, payload) in tasks {
                    let task = TaskId(self.next_task);
                    self.next_task += 1;
                    self.meta.insert(task, TaskMeta { client, job, index, fn_id, timeout_ms });
                    self.sched.submit(task, client.group(), payload);
                }
                self.sched.resume();
            }
            Input::Refused { peer, reason } => {
                self.events.push(self.now, EventKind::ConnectionRefused { peer, reason });
            }
            Input::Describe { client, job, kind, name, items } => {
                if let Some(o) = &mut self.observer {
                    o.describe(client, job, kind, name, items, now);
                }
            }
            Input::Raised { client, job, index, text } => {
                self.stats.tasks_raised.fetch_add(1, Ordering::Relaxed);
                if let Some(o) = &mut self.observer {
                    o.raised(client, job, TaskError { index, text });
                }
            }
            Input::ClientClosed { client } => {
                if self.clients.remove(&client).is_some() {
                    self.sched.cancel_group(client.group());
                    // Running tasks come back as Cancel commands; queued ones
                    // leave the scheduler silently, so forget them here.
                    let gone: Vec<TaskId> =
                        self.meta.iter().filter(|(_, m)| m.client == client).map(|(t, _)| *t).collect();
                    for t in gone {
                        if let Some(m) = self.meta.remove(&t) {
                            self.release_function(m.fn_id);
                            self.observe_end(&m, None);
                        }
                    }
                }
            }
        }
        self.apply_commands();
    }

    /// Take back the tasks of `job` that no agent holds yet; returns their
    /// indexes, sorted. Every other task of the job completes exactly once
    /// (or is cancelled with its client).
    pub(crate) fn withdraw(&mut self, client: ClientId, job: JobId) -> Vec<u32> {
        let tasks: Vec<TaskId> =
            self.meta.iter().filter(|(_, m)| m.client == client && m.job == job).map(|(t, _)| *t).collect();
        let mut withdrawn = Vec::new();
        for t in tasks {
            if self.sched.withdraw(t) {
                let m = self.meta.remove(&t).expect("withdrawn task has metadata");
                self.release_function(m.fn_id);
                self.observe_end(&m, None);
                withdrawn.push(m.index);
            }
        }
        withdrawn.sort_unstable();
        withdrawn
    }

    /// Ask an agent to finish what it holds, take nothing new, then leave.
    /// False for an agent that is not connected (gone, or leaving already).
    pub(crate) fn drain(&mut self, worker: WorkerId) -> bool {
        let Some(link) = self.agents.get_mut(&worker) else {
            return false;
        };
        if link.state != WorkerState::Connected {
            return link.state == WorkerState::Draining;
        }
        link.state = WorkerState::Draining;
        Self::queue(&mut self.dirty_agents, worker, link, Outgoing::new(ToAgent::Drain));
        let name = link.name.clone();
        self.events.push(self.now, EventKind::WorkerDraining { worker, name });
        // Room for nothing: what it holds runs to the end, nothing is added.
        self.sched.worker_joined(worker, 0);
        self.apply_commands();
        true
    }

    fn agent_message(&mut self, worker: WorkerId, msg: FromAgent, payload: Bytes) {
        let Some(link) = self.agents.get_mut(&worker) else {
            return;
        };
        link.last_heard = self.now;
        match msg {
            FromAgent::Result { task, attempt, micros } => {
                if self.sched.task_finished(worker, TaskId(task), attempt, payload) {
                    link.tasks_done += 1;
                    self.stats.tasks_done.fetch_add(1, Ordering::Relaxed);
                    if let Some(o) = &mut self.observer {
                        o.task_ran(micros);
                    }
                }
            }
            FromAgent::Crashed { task, attempt, reason } => {
                link.crashes += 1;
                self.stats.crashes.fetch_add(1, Ordering::Relaxed);
                let reason = format!("{reason} on worker {}", link.name);
                let task = TaskId(task);
                if self.sched.task_crashed(worker, task, attempt, &reason) && self.sched.is_pending(task) {
                    self.stats.tasks_retried.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = self.meta.get(&task) {
                        let (client, job, index) = (m.client, m.job, m.index);
                        if let Some(o) = &mut self.observer {
                            o.retried(client, job);
                        }
                        self.events.push(self.now, EventKind::TaskRetried { client, job, index, reason });
                    }
                }
            }
            FromAgent::TimedOut { task, attempt, reason } => {
                let reason = format!("{reason} on worker {}", link.name);
                self.sched.task_timed_out(worker, TaskId(task), attempt, &reason);
            }
            FromAgent::Capacity { tasks } => {
                if link.state == WorkerState::Connected {
                    self.sched.worker_joined(worker, (tasks as usize).max(1));
                }
            }
            FromAgent::Goodbye { reason } => {
                tracing::info!("worker {} is leaving: {reason}", link.name);
                link.state = WorkerState::Leaving;
                link.goodbye = Some(reason);
                // What it held goes elsewhere now, without counting as a loss.
                self.sched.worker_left(worker);
            }
            FromAgent::Usage { executors, cpu_milli, memory } => {
                link.usage = Some(Usage { executors, cpu: f64::from(cpu_milli) / 1000.0, memory });
            }
            FromAgent::Serves { addr } => self.spread.serves(worker, addr),
            FromAgent::Holds { fn_id } => {
                let fn_id = FnId(fn_id);
                self.stats.functions_fetched.fetch_add(1, Ordering::Relaxed);
                for (w, route) in self.spread.fetched(fn_id, worker) {
                    self.give_blob(w, fn_id, route);
                }
            }
            FromAgent::NotFetched { fn_id, reason } => {
                tracing::warn!("worker {}: {reason}; sending the function itself", link.name);
                let fn_id = FnId(fn_id);
                self.give_blob(worker, fn_id, Route::Direct);
                for (w, route) in self.spread.not_fetched(fn_id, worker) {
                    self.give_blob(w, fn_id, route);
                }
            }
            FromAgent::Ready { .. } | FromAgent::Pong { .. } => {}
        }
    }

    /// Put `out` in `link`'s outbox; [`flush`](Self::flush) hands it on.
    fn queue(dirty: &mut Vec<WorkerId>, worker: WorkerId, link: &mut AgentLink, out: Outgoing<ToAgent>) {
        if link.outbox.is_empty() {
            dirty.push(worker);
        }
        link.outbox.push(out);
    }

    fn apply_commands(&mut self) {
        while let Some(cmd) = self.sched.poll_command() {
            match cmd {
                Command::Dispatch { worker, task, attempt, payload } => {
                    let (Some(link), Some(meta)) = (self.agents.get_mut(&worker), self.meta.get(&task))
                    else {
                        continue;
                    };
                    let first = link.outbox.is_empty();
                    if link.fns.insert(meta.fn_id) {
                        Self::give_function(
                            &mut self.dirty_agents,
                            &self.fns,
                            &mut self.spread,
                            worker,
                            link,
                            meta.fn_id,
                        );
                    }
                    if first {
                        // A worker's tasks come together: room for the run at once.
                        link.outbox.reserve(1 + self.sched.dispatches_next(worker));
                    }
                    let msg = ToAgent::Task {
                        task: task.0,
                        attempt,
                        fn_id: meta.fn_id.0,
                        timeout_ms: meta.timeout_ms,
                    };
                    Self::queue(&mut self.dirty_agents, worker, link, Outgoing::with_payload(msg, payload));
                }
                Command::Deliver { task, result, .. } => self.complete(task, Outcome::Done(result)),
                Command::Fail { task, failure, .. } => {
                    let reason = match failure.kind {
                        FailureKind::Timeout => {
                            let last = failure.reasons.last().map_or("", |r| r.as_str());
                            // Drop the "attempt N: " prefix; there is no retry to count.
                            format!("task {}", last.split_once(": ").map_or(last, |(_, r)| r))
                        }
                        _ => format!(
                            "task failed after {} attempts: {}",
                            failure.attempts,
                            failure.reasons.join("; ")
                        ),
                    };
                    self.stats.tasks_failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = self.meta.get(&task) {
                        let (client, job, index) = (m.client, m.job, m.index);
                        let event = EventKind::TaskFailed { client, job, index, reason: reason.clone() };
                        self.events.push(self.now, event);
                    }
                    self.complete(task, Outcome::Failed { kind: failure.kind, reason });
                }
                Command::Cancel { worker, tasks } => {
                    for t in &tasks {
                        if let Some(meta) = self.meta.remove(t) {
                            self.release_function(meta.fn_id);
                            self.observe_end(&meta, None);
                        }
                    }
                    if let Some(link) = self.agents.get_mut(&worker) {
                        Self::queue(
                            &mut self.dirty_agents,
                            worker,
                            link,
                            Outgoing::new(ToAgent::Cancel { tasks: tasks.iter().map(|t| t.0).collect() }),
                        );
                    }
                }
            }
        }
    }

    fn complete(&mut self, task: TaskId, outcome: Outcome) {
        let Some(meta) = self.meta.remove(&task) else {
            return;
        };
        self.release_function(meta.fn_id);
        if self.observer.is_some() {
            let ended = match &outcome {
                Outcome::Done(_) => Ok(()),
                Outcome::Failed { reason, .. } => Err(TaskError { index: meta.index, text: reason.clone() }),
            };
            self.observe_end(&meta, Some(ended));
        }
        if let Some(outbox) = self.clients.get_mut(&meta.client) {
            if outbox.is_empty() {
                self.dirty_clients.push(meta.client);
            }
            outbox.push(Completion { job: meta.job, index: meta.index, outcome });
        }
    }

    fn observe_end(&mut self, meta: &TaskMeta, outcome: Option<Result<(), TaskError>>) {
        if let Some(o) = &mut self.observer {
            o.ended(meta.client, meta.job, outcome, self.now);
        }
    }

    /// One task fewer calls `fn_id`. Functions no task calls any more are
    /// kept for a while, then evicted everywhere, oldest first.
    fn release_function(&mut self, fn_id: FnId) {
        let Some(entry) = self.fns.get_mut(&fn_id) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        let mut idled = entry.refs == 0;
        let needs = entry.needs.len();
        if idled {
            self.idle_fns.push_back(fn_id);
        }
        // What it needs is released after it, so that it is evicted after it.
        for i in 0..needs {
            let need = self.fns[&fn_id].needs[i];
            if let Some(n) = self.fns.get_mut(&need) {
                n.refs = n.refs.saturating_sub(1);
                if n.refs == 0 {
                    self.idle_fns.push_back(need);
                    idled = true;
                }
            }
        }
        if !idled {
            return;
        }
        while self.idle_fns.len() > IDLE_FUNCTIONS {
            let old = self.idle_fns.pop_front().expect("not empty");
            if self.fns.get(&old).is_some_and(|e| e.refs == 0) && !self.idle_fns.contains(&old) {
                self.fns.remove(&old);
                self.spread.forget(old);
                // Functions that name it, still cached, are forgotten by the
                // agents too, so that they come back with it.
                let naming: Vec<FnId> =
                    self.fns.iter().filter(|(_, e)| e.needs.contains(&old)).map(|(id, _)| *id).collect();
                for (&worker, link) in self.agents.iter_mut() {
                    for id in std::iter::once(old).chain(naming.iter().copied()) {
                        if link.fns.remove(&id) {
                            let forget = Outgoing::new(ToAgent::Forget { fn_id: id.0 });
                            Self::queue(&mut self.dirty_agents, worker, link, forget);
                        }
                    }
                }
            }
        }
    }
}

#[path = "core_blobs.rs"]
mod blobs;

#[path = "core_show.rs"]
mod show;
pub use show::CoreMetrics;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
