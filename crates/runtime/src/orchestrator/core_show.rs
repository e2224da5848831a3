//! What the core shows of itself, on request: the snapshot of its workers
//! and clients, the figures `/metrics` needs, the jobs and the events. None
//! of it is kept up per task beyond the counters; each is computed when
//! asked.

use std::time::Instant;

use distripool_scheduler::IdMap;

use super::super::observe::{Histogram, JobInfo};
use super::super::snapshot::{ClientInfo, Event, Snapshot, WorkerInfo};
use super::Core;
use crate::ids::ClientId;

/// What `/metrics` needs of the core beyond the [`Stats`] counters.
#[derive(Debug, Clone, Default)]
pub struct CoreMetrics {
    /// Executors running a task (a worker holding at least as many tasks as
    /// it has executors has them all busy), and the others.
    pub executors_busy: usize,
    pub executors_idle: usize,
    pub tasks_queued: usize,
    pub tasks_running: usize,
    /// Running times of the tasks that returned (empty without an observer).
    pub durations: Histogram,
}

impl Core {
    /// Everything the core knows, for `stats()`, `workers_info()` and the
    /// dashboard. Costs nothing unless asked for.
    pub(crate) fn snapshot(&self, now: Instant) -> Snapshot {
        let mut workers: Vec<WorkerInfo> = self
            .agents
            .iter()
            .map(|(&id, l)| WorkerInfo {
                id,
                name: l.name.clone(),
                peer: l.peer.clone(),
                labels: l.labels.clone(),
                slots: l.slots,
                state: l.state,
                running: self.sched.worker_load(id).unwrap_or(0),
                tasks_done: l.tasks_done,
                crashes: l.crashes,
                connected_for: now.saturating_duration_since(l.joined),
                last_heard: now.saturating_duration_since(l.last_heard),
                usage: l.usage,
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let mut clients: IdMap<ClientId, ClientInfo> =
            self.clients.keys().map(|&c| (c, ClientInfo { client: c, queued: 0, running: 0 })).collect();
        for (&task, m) in &self.meta {
            if let Some(c) = clients.get_mut(&m.client) {
                if self.sched.is_running(task) {
                    c.running += 1;
                } else {
                    c.queued += 1;
                }
            }
        }
        let mut clients: Vec<ClientInfo> = clients.into_values().collect();
        clients.sort_by_key(|c| c.client);
        Snapshot { workers, clients }
    }

    /// What `/metrics` needs besides the counters: O(workers), not O(tasks).
    pub(crate) fn metrics(&self) -> CoreMetrics {
        let mut m = CoreMetrics::default();
        for (&id, l) in &self.agents {
            let busy = self.sched.worker_load(id).unwrap_or(0).min(l.slots);
            m.executors_busy += busy;
            m.executors_idle += l.slots - busy;
        }
        m.tasks_queued = self.sched.queued();
        m.tasks_running = self.sched.pending() - m.tasks_queued;
        if let Some(o) = &self.observer {
            m.durations = o.durations.clone();
        }
        m
    }

    /// The jobs a dashboard shows, oldest first (none without an observer).
    pub(crate) fn jobs(&self, now: Instant) -> Vec<JobInfo> {
        self.observer.as_ref().map_or_else(Vec::new, |o| o.jobs(now))
    }

    /// The events numbered `since` and after that are still kept.
    pub(crate) fn events_since(&self, since: u64) -> Vec<Event> {
        self.events.since(since)
    }
}
