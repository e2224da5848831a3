//! One session's state machine: orchestrator messages, executor events and
//! the passing of time in; frames for the orchestrator and commands for
//! executors out, through an [`AgentComm`]. It starts no process and reads no
//! clock, so it is tested without either (see `session_tests.rs`).

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_protocol::{FromAgent, ToAgent};

use super::functions::Functions;
use super::peers::SPREAD_AT_LEAST;
use crate::conn::{Outgoing, SessionEnd};
use crate::executor::{ExecEvent, ExecIn};
use crate::ids::{FnId, Generation, TaskId};

/// Tasks held by one executor at once: one running, the rest prefetched.
pub const DEPTH: usize = 2;
/// Most tasks held by one executor. With tasks of a few microseconds it would
/// otherwise idle on the round trip through the agent and the orchestrator.
pub const DEEP: usize = 32;
/// Work an executor holds, in its recent tasks' time: the depth is the
/// power of two nearest below `QUEUE_BUDGET / typical task`, from [`DEPTH`]
/// to [`DEEP`]. Long tasks keep [`DEPTH`], so that few wait behind one
/// another while another executor is free, and the work left queued at the
/// end of a map stays under about this long per executor.
pub(crate) const QUEUE_BUDGET: Duration = Duration::from_millis(2);
/// Recent task durations the time limit judges by (see
/// [`Session::set_time_limit`]).
const RECENT: usize = 16;
/// Executors of one slot that may die in a row before they are ready, before
/// the session gives up (a broken Python installation, say).
pub(crate) const MAX_START_FAILURES: u32 = 5;

/// Where a session's output goes.
pub(crate) trait AgentComm {
    /// A frame for the orchestrator.
    fn send(&mut self, out: Outgoing<FromAgent>);
    /// Start the executor `generation` of `slot`, killing the one the slot
    /// had. Returns its pid, or why it could not be started.
    fn start_executor(&mut self, slot: usize, generation: Generation) -> Result<u32, String>;
    /// A frame for the executor of `slot`.
    fn to_executor(&mut self, slot: usize, msg: ExecIn);
    /// Fetch function `fn_id` (which names `needs`) from the agent serving
    /// at `from`; the outcome comes back through [`Session::on_fetched`].
    fn fetch(&mut self, fn_id: FnId, needs: Vec<FnId>, from: String);
    /// Serve this function to other agents from now on (None: no longer).
    fn shelve(&mut self, fn_id: FnId, bytes: Option<Bytes>);
    /// The next piece of a function `total` bytes long, which other agents
    /// may be served as it arrives.
    fn shelve_piece(&mut self, fn_id: FnId, total: usize, piece: Bytes);
}

struct Inflight {
    task: TaskId,
    attempt: u32,
    cancelled: bool,
    /// When the executor started on it (it reached the front of the slot).
    started: Option<Instant>,
}

pub(crate) struct Queued {
    task: TaskId,
    attempt: u32,
    pub(super) fn_id: FnId,
    payload: Bytes,
    timeout: Option<Duration>,
}

struct Slot {
    pid: u32,
    generation: Generation,
    /// The executor announced a clean exit; it gets no more tasks.
    retiring: bool,
    /// The executor said it is up; before that, its death is not its task's fault.
    ready: bool,
    /// Executors of this slot that died before they were ready, in a row.
    start_failures: u32,
    /// Running time of this slot's recent tasks (moving average).
    typical_task: Option<Duration>,
    inflight: VecDeque<(Inflight, Queued)>,
    fns: HashSet<FnId>,
}

impl Slot {
    /// Tasks this slot's executor may hold: more while its tasks are short.
    fn depth(&self) -> usize {
        match self.typical_task {
            Some(t) => {
                let fits = (QUEUE_BUDGET.as_nanos() / t.as_nanos().max(1)).min(DEEP as u128) as usize;
                // Whole powers of two, so that small changes in task time do
                // not change the capacity announced.
                if fits <= DEPTH {
                    DEPTH
                } else {
                    1 << fits.ilog2()
                }
            }
            None => DEPTH,
        }
    }
}

type Step = Result<(), SessionEnd>;

pub(crate) struct Session {
    slots: Vec<Slot>,
    queue: VecDeque<Queued>,
    /// Functions (and what each needs first) and the blobs they need; the
    /// tasks waiting for one that another agent sends.
    fns: Functions,
    /// The last executor generation handed out.
    generations: Generation,
    /// The capacity last announced to the orchestrator.
    advertised: usize,
    /// The orchestrator asked for a drain, or this side is leaving: leave
    /// once nothing is held.
    draining: bool,
    /// This side leaves, saying this, and ending so (see [`Session::leave`]).
    leaving: Option<(String, SessionEnd)>,
    /// Leave after holding nothing for this long (a launcher's idle timeout).
    idle_limit: Option<Duration>,
    /// Since when nothing has been held.
    idle_since: Option<Instant>,
    /// Be gone by then (a launcher's time limit, a job's end).
    time_limit: Option<Instant>,
    /// How long the most recent tasks ran, newest last.
    recent: VecDeque<Duration>,
}

impl Session {
    /// Start `processes` executors. The orchestrator was told `processes`
    /// slots in `Ready`, and takes [`DEPTH`] tasks per slot until told
    /// otherwise.
    pub(crate) fn start(processes: usize, comm: &mut impl AgentComm) -> Result<Self, SessionEnd> {
        let mut s = Session {
            slots: Vec::with_capacity(processes),
            queue: VecDeque::new(),
            fns: Functions::default(),
            generations: Generation(0),
            advertised: processes * DEPTH,
            draining: false,
            leaving: None,
            idle_limit: None,
            idle_since: None,
            time_limit: None,
            recent: VecDeque::with_capacity(RECENT),
        };
        for slot in 0..processes {
            let (pid, generation) = s.start_executor(slot, comm)?;
            s.slots.push(Slot {
                pid,
                generation,
                retiring: false,
                ready: false,
                start_failures: 0,
                typical_task: None,
                inflight: VecDeque::new(),
                fns: HashSet::new(),
            });
        }
        Ok(s)
    }

    /// Tasks held: queued here, or given to an executor.
    pub(crate) fn held(&self) -> usize {
        self.queue.len() + self.fns.waiting() + self.slots.iter().map(|s| s.inflight.len()).sum::<usize>()
    }

    /// Slots whose executor holds no task: when the session ends, these may
    /// leave in their own time (see `driver::run_session`).
    pub(crate) fn idle_slots(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].inflight.is_empty()).collect()
    }

    /// The earliest moment a running task goes past its time limit, runs
    /// long enough to show that its slot holds too many tasks, or the
    /// session has been idle for its idle limit. Call
    /// [`on_timer`](Self::on_timer) then.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let tasks = self.slots.iter().filter_map(|s| {
            let (i, q) = s.inflight.front()?;
            let started = i.started?;
            let review = (s.depth() > DEPTH).then(|| started + QUEUE_BUDGET);
            let limit = q.timeout.map(|t| started + t);
            [review, limit].into_iter().flatten().min()
        });
        tasks.chain(self.idle_deadline()).chain(self.time_limit_deadline()).min()
    }

    /// Be gone by `at`: from the moment a slot's tasks, judged by the
    /// longest of the recent ones, would no longer all finish before it,
    /// take no new task and finish what is held; at `at`, say goodbye with
    /// whatever is still held (it goes elsewhere, not lost) and end with
    /// [`SessionEnd::TimeLimit`].
    pub(crate) fn set_time_limit(&mut self, at: Option<Instant>) {
        self.time_limit = at;
    }

    /// When to stop taking tasks so that the held ones finish by the time
    /// limit (once leaving: the limit itself).
    fn time_limit_deadline(&self) -> Option<Instant> {
        let at = self.time_limit?;
        if self.leaving.is_some() {
            return Some(at);
        }
        let longest = self.recent.iter().max().copied().unwrap_or_default();
        let depth = self.slots.iter().map(Slot::depth).max().unwrap_or(DEPTH);
        let needed = longest.saturating_mul(depth as u32);
        Some(at.checked_sub(needed).unwrap_or(at))
    }

    /// When an idle session leaves: its idle limit after it last held a task.
    fn idle_deadline(&self) -> Option<Instant> {
        if self.leaving.is_some() {
            return None;
        }
        Some(self.idle_since? + self.idle_limit?)
    }

    /// Leave on this side's initiative (a SIGTERM, the idle limit): take no
    /// new task, finish what is held, then say goodbye with `reason` and end
    /// with `end`. The first call decides.
    pub(crate) fn leave(
        &mut self,
        reason: String,
        end: SessionEnd,
        now: Instant,
        comm: &mut impl AgentComm,
    ) -> Step {
        if self.leaving.is_none() {
            self.leaving = Some((reason, end));
            self.draining = true;
            self.advertised = 0;
            comm.send(Outgoing::new(FromAgent::Capacity { tasks: 0 }));
        }
        self.feed(now, comm)
    }

    /// Leave once nothing has been held for `limit`.
    pub(crate) fn set_idle_limit(&mut self, limit: Option<Duration>, now: Instant) {
        self.idle_limit = limit;
        self.idle_since = (self.held() == 0).then_some(now);
    }

    /// A message from the orchestrator.
    pub(crate) fn on_message(
        &mut self,
        msg: ToAgent,
        payload: Bytes,
        now: Instant,
        comm: &mut impl AgentComm,
    ) -> Step {
        match msg {
            ToAgent::Function { fn_id, needs } => {
                let fn_id = FnId(fn_id);
                if payload.len() >= SPREAD_AT_LEAST {
                    comm.shelve(fn_id, Some(payload.clone()));
                }
                let ready = self.fns.arrived(fn_id, payload, needs.into_iter().map(FnId).collect());
                self.queue.extend(ready);
            }
            ToAgent::Piece { fn_id, needs, total } => {
                self.on_piece(FnId(fn_id), needs, total, payload, comm)?
            }
            ToAgent::Fetch { fn_id, needs, from } => {
                let (fn_id, needs): (_, Vec<FnId>) = (FnId(fn_id), needs.into_iter().map(FnId).collect());
                self.fns.expect(fn_id, needs.clone());
                if let Some(from) = from {
                    comm.fetch(fn_id, needs, from);
                }
            }
            ToAgent::Forget { fn_id } => {
                let fn_id = FnId(fn_id);
                self.fns.forget(fn_id);
                comm.shelve(fn_id, None);
                for (slot, s) in self.slots.iter_mut().enumerate() {
                    if s.fns.remove(&fn_id) {
                        comm.to_executor(slot, ExecIn::Forget { fn_id });
                    }
                }
            }
            ToAgent::Task { task, attempt, fn_id, timeout_ms } => {
                let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
                let q = Queued { task: TaskId(task), attempt, fn_id: FnId(fn_id), payload, timeout };
                if let Some(q) = self.fns.hold_if_coming(q) {
                    self.queue.push_back(q);
                }
            }
            ToAgent::Cancel { tasks } => {
                let cancel: HashSet<TaskId> = tasks.into_iter().map(TaskId).collect();
                self.queue.retain(|q| !cancel.contains(&q.task));
                self.fns.cancel(|q| cancel.contains(&q.task));
                for slot in 0..self.slots.len() {
                    let mut hit = false;
                    for (i, _) in self.slots[slot].inflight.iter_mut() {
                        if cancel.contains(&i.task) {
                            i.cancelled = true;
                            hit = true;
                        }
                    }
                    if hit {
                        self.restart(slot, comm)?;
                    }
                }
            }
            ToAgent::Limits { .. } => {
                return Err(SessionEnd::Protocol("the orchestrator sent its limits twice".into()));
            }
            ToAgent::Ping { seq } => comm.send(Outgoing::new(FromAgent::Pong { seq })),
            ToAgent::Drain => self.draining = true,
        }
        self.feed(now, comm)
    }

    /// Something an executor did.
    pub(crate) fn on_executor(&mut self, ev: ExecEvent, now: Instant, comm: &mut impl AgentComm) -> Step {
        match ev {
            ExecEvent::Result { slot, generation, task, payload } => {
                let s = &mut self.slots[slot];
                if s.generation != generation {
                    return Ok(());
                }
                let Some((done, _)) = s.inflight.pop_front() else {
                    return Err(SessionEnd::Protocol(format!(
                        "executor in slot {slot} answered a task it was not given"
                    )));
                };
                if done.task != task {
                    return Err(SessionEnd::Protocol(format!(
                        "executor in slot {slot} answered task {task}, expected {}",
                        done.task
                    )));
                }
                let took = done.started.map(|t0| now.saturating_duration_since(t0));
                if !done.cancelled {
                    let micros = took.map_or(0, |t| t.as_micros().min(u64::MAX as u128) as u64);
                    comm.send(Outgoing::with_payload(
                        FromAgent::Result { task: task.0, attempt: done.attempt, micros },
                        payload,
                    ));
                }
                // Learn how long this slot's tasks take, then start the next.
                if let Some(took) = took {
                    s.typical_task = Some(s.typical_task.map_or(took, |avg| (avg * 3 + took) / 4));
                    // Only a time limit reads them: nothing is paid per task without one.
                    if self.time_limit.is_some() {
                        if self.recent.len() == RECENT {
                            self.recent.pop_front();
                        }
                        self.recent.push_back(took);
                    }
                }
                if let Some((next, _)) = s.inflight.front_mut() {
                    next.started = Some(now);
                }
                self.announce_capacity(comm);
            }
            ExecEvent::Ready { slot, generation } => {
                let s = &mut self.slots[slot];
                if s.generation == generation {
                    s.ready = true;
                    s.start_failures = 0;
                    if let Some((running, _)) = s.inflight.front_mut() {
                        running.started = Some(now);
                    }
                }
            }
            ExecEvent::Retiring { slot, generation } => {
                let s = &mut self.slots[slot];
                if s.generation == generation {
                    s.retiring = true;
                }
            }
            ExecEvent::Exited { slot, generation, reason } => {
                let s = &mut self.slots[slot];
                if s.generation != generation {
                    return Ok(());
                }
                if s.retiring {
                    // A clean recycle: whatever it still held was never started.
                } else if !s.ready {
                    // It died starting up: what it held never ran. Retry,
                    // unless executors cannot start at all here.
                    s.start_failures += 1;
                    if s.start_failures >= MAX_START_FAILURES {
                        return Err(SessionEnd::Executors(format!(
                            "{MAX_START_FAILURES} executors in a row died before they started; the last: {reason}"
                        )));
                    }
                    tracing::warn!("executor died while starting: {reason}");
                } else if let Some((running, _)) = s.inflight.pop_front() {
                    if !running.cancelled {
                        tracing::warn!("task {} crashed: {reason}", running.task);
                        comm.send(Outgoing::new(FromAgent::Crashed {
                            task: running.task.0,
                            attempt: running.attempt,
                            reason,
                        }));
                    }
                }
                self.restart(slot, comm)?;
            }
        }
        self.feed(now, comm)
    }

    /// The moment [`next_deadline`](Self::next_deadline) named has come (or
    /// passed).
    pub(crate) fn on_timer(&mut self, now: Instant, comm: &mut impl AgentComm) -> Step {
        if let Some(limit) = self.time_limit {
            if now >= limit {
                // Out of time: what is still held goes elsewhere.
                let reason = "its time limit came with tasks held".to_string();
                comm.send(Outgoing::new(FromAgent::Goodbye { reason }));
                return Err(SessionEnd::TimeLimit);
            }
            if self.time_limit_deadline().is_some_and(|at| now >= at) {
                let reason = "its time limit is near".to_string();
                return self.leave(reason, SessionEnd::TimeLimit, now, comm);
            }
        }
        if let (Some(at), Some(limit)) = (self.idle_deadline(), self.idle_limit) {
            if now >= at {
                let reason = format!("idle for {} s", limit.as_secs_f64());
                return self.leave(reason, SessionEnd::Idle(limit), now, comm);
            }
        }
        self.review_depths(now, comm);
        self.expire_timeouts(now, comm)?;
        self.feed(now, comm)
    }

    /// Tell the orchestrator how many tasks to send, when that changes.
    fn announce_capacity(&mut self, comm: &mut impl AgentComm) {
        if self.leaving.is_some() {
            return; // it said 0 once
        }
        let want: usize = self.slots.iter().map(Slot::depth).sum();
        if want != self.advertised {
            self.advertised = want;
            comm.send(Outgoing::new(FromAgent::Capacity { tasks: want as u32 }));
        }
    }

    /// A slot deep enough for short tasks whose running task has taken longer
    /// than the whole budget goes back to [`DEPTH`] now, not when that task
    /// ends, so that the orchestrator keeps the tasks behind it (they can go
    /// to another executor, or be withdrawn).
    fn review_depths(&mut self, now: Instant, comm: &mut impl AgentComm) {
        for s in &mut self.slots {
            if s.depth() <= DEPTH {
                continue;
            }
            if let Some(started) = s.inflight.front().and_then(|(i, _)| i.started) {
                let running = now.saturating_duration_since(started);
                if running >= QUEUE_BUDGET {
                    s.typical_task = Some(running);
                }
            }
        }
        self.announce_capacity(comm);
    }

    /// Kill the executors whose running task is past its time limit.
    fn expire_timeouts(&mut self, now: Instant, comm: &mut impl AgentComm) -> Step {
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let expired = matches!(
                s.inflight.front(),
                Some((i, q)) if !i.cancelled && matches!((i.started, q.timeout), (Some(t0), Some(t)) if now >= t0 + t)
            );
            if !expired {
                continue;
            }
            let (running, q) = s.inflight.pop_front().expect("front exists");
            let reason = format!(
                "ran longer than its time limit of {:?}; its executor (pid {}) was killed",
                q.timeout.unwrap_or_default(),
                s.pid
            );
            tracing::warn!("task {} {reason}", running.task);
            comm.send(Outgoing::new(FromAgent::TimedOut {
                task: running.task.0,
                attempt: running.attempt,
                reason,
            }));
            self.restart(slot, comm)?;
        }
        Ok(())
    }

    fn start_executor(
        &mut self,
        slot: usize,
        comm: &mut impl AgentComm,
    ) -> Result<(u32, Generation), SessionEnd> {
        self.generations.0 += 1;
        let generation = self.generations;
        let pid = comm.start_executor(slot, generation).map_err(SessionEnd::Executors)?;
        Ok((pid, generation))
    }

    /// Replace the executor of `slot`; the old one's process group is killed.
    fn restart(&mut self, slot: usize, comm: &mut impl AgentComm) -> Step {
        let (pid, generation) = self.start_executor(slot, comm)?;
        let s = &mut self.slots[slot];
        s.pid = pid;
        s.generation = generation;
        s.retiring = false;
        s.ready = false;
        s.fns.clear();
        // Whatever was prefetched behind the running task goes back in line.
        let requeue: Vec<_> = s.inflight.drain(..).filter(|(i, _)| !i.cancelled).map(|(_, q)| q).collect();
        for q in requeue.into_iter().rev() {
            self.queue.push_front(q);
        }
        Ok(())
    }

    /// Give queued tasks to executors: first one each, then a second each,
    /// and so on up to each slot's depth. A draining session that holds
    /// nothing any more says goodbye and ends.
    fn feed(&mut self, now: Instant, comm: &mut impl AgentComm) -> Step {
        self.fill(now, comm)?;
        let held = self.held();
        if self.draining && held == 0 {
            let (reason, end) = self.leaving.take().unwrap_or(("drained".into(), SessionEnd::Drained));
            comm.send(Outgoing::new(FromAgent::Goodbye { reason }));
            return Err(end);
        }
        if held > 0 {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
        Ok(())
    }

    fn fill(&mut self, now: Instant, comm: &mut impl AgentComm) -> Step {
        for depth in 1..=DEEP {
            for slot in 0..self.slots.len() {
                if self.queue.is_empty() {
                    return Ok(());
                }
                let s = &self.slots[slot];
                if s.retiring || s.inflight.len() >= depth || depth > s.depth() {
                    continue;
                }
                let q = self.queue.pop_front().expect("queue is not empty");
                let s = &mut self.slots[slot];
                if !s.fns.contains(&q.fn_id) {
                    let Some((bytes, needs)) = self.fns.get(&q.fn_id) else {
                        return Err(SessionEnd::Protocol(format!(
                            "task {} needs function {:x}, which was never sent",
                            q.task, q.fn_id.0
                        )));
                    };
                    for need in needs {
                        if s.fns.insert(*need) {
                            let Some((blob, _)) = self.fns.get(need) else {
                                return Err(SessionEnd::Protocol(format!(
                                    "function {:x} needs {:x}, which was never sent",
                                    q.fn_id.0, need.0
                                )));
                            };
                            let msg =
                                ExecIn::Function { fn_id: *need, needs: Vec::new(), bytes: blob.clone() };
                            comm.to_executor(slot, msg);
                        }
                    }
                    s.fns.insert(q.fn_id);
                    let msg = ExecIn::Function { fn_id: q.fn_id, needs: needs.clone(), bytes: bytes.clone() };
                    comm.to_executor(slot, msg);
                }
                comm.to_executor(
                    slot,
                    ExecIn::Task { task: q.task, fn_id: q.fn_id, payload: q.payload.clone() },
                );
                let started = (s.ready && s.inflight.is_empty()).then_some(now);
                s.inflight
                    .push_back((Inflight { task: q.task, attempt: q.attempt, cancelled: false, started }, q));
            }
        }
        Ok(())
    }
}

#[path = "session_fetched.rs"]
mod fetched;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
