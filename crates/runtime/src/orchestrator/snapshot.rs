//! What the core shows of itself: a [`Snapshot`] taken on request, and a
//! bounded log of [`Event`]s (workers joining, leaving and lost, tasks
//! retried and failed). Neither costs anything per completed task.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use distripool_protocol::Labels;

use crate::ids::{ClientId, JobId, WorkerId};

/// Events kept; older ones are dropped first.
pub const EVENTS_KEPT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Takes tasks.
    Connected,
    /// Finishing what it holds; takes nothing new.
    Draining,
    /// Said goodbye; its connection is closing.
    Leaving,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Connected => "connected",
            WorkerState::Draining => "draining",
            WorkerState::Leaving => "leaving",
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// `host (address, agent pid N)`.
    pub name: String,
    /// The address it connected from, or `local`.
    pub peer: String,
    pub labels: Labels,
    /// Executors.
    pub slots: usize,
    pub state: WorkerState,
    /// Tasks it holds now (running or prefetched).
    pub running: usize,
    pub tasks_done: u64,
    /// Its executors that died running a task.
    pub crashes: u64,
    pub connected_for: Duration,
    /// Time since the last frame that reached the core (results, or the
    /// heartbeat answers of an idle agent).
    pub last_heard: Duration,
    /// Its executors' CPU and memory, when a dashboard asked for them.
    pub usage: Option<Usage>,
}

/// What a worker's executors use, summed over them, as it last reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub executors: u32,
    /// CPUs busy over the last interval (1.0: one CPU all the time).
    pub cpu: f64,
    /// Resident memory, in bytes.
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client: ClientId,
    /// Tasks waiting for a worker.
    pub queued: usize,
    /// Tasks on a worker.
    pub running: usize,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub workers: Vec<WorkerInfo>,
    pub clients: Vec<ClientInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    WorkerJoined {
        worker: WorkerId,
        name: String,
    },
    WorkerDraining {
        worker: WorkerId,
        name: String,
    },
    /// Left on purpose, after saying goodbye.
    WorkerLeft {
        worker: WorkerId,
        name: String,
        reason: String,
    },
    /// Went away without a goodbye; `tasks` it held were put back in line.
    WorkerLost {
        worker: WorkerId,
        name: String,
        reason: String,
        tasks: usize,
    },
    TaskRetried {
        client: ClientId,
        job: JobId,
        index: u32,
        reason: String,
    },
    TaskFailed {
        client: ClientId,
        job: JobId,
        index: u32,
        reason: String,
    },
    /// An agent's handshake was refused: a wrong key or cluster name, another
    /// protocol version. (Connections that merely fail are only counted.)
    ConnectionRefused {
        peer: String,
        reason: String,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::WorkerJoined { .. } => "worker_joined",
            EventKind::WorkerDraining { .. } => "worker_draining",
            EventKind::WorkerLeft { .. } => "worker_left",
            EventKind::WorkerLost { .. } => "worker_lost",
            EventKind::TaskRetried { .. } => "task_retried",
            EventKind::TaskFailed { .. } => "task_failed",
            EventKind::ConnectionRefused { .. } => "connection_refused",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    /// Numbered from 0, without gaps, for the life of the orchestrator.
    pub seq: u64,
    pub at: Instant,
    pub kind: EventKind,
}

#[derive(Debug, Default)]
pub(crate) struct EventLog {
    next: u64,
    kept: VecDeque<Event>,
}

impl EventLog {
    pub(crate) fn push(&mut self, at: Instant, kind: EventKind) {
        if self.kept.len() == EVENTS_KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(Event { seq: self.next, at, kind });
        self.next += 1;
    }

    #[cfg(test)]
    pub(crate) fn next_seq(&self) -> u64 {
        self.next
    }

    /// Events numbered `since` or later that are still kept, oldest first.
    pub(crate) fn since(&self, since: u64) -> Vec<Event> {
        let first = self.kept.front().map_or(self.next, |e| e.seq);
        let skip = since.saturating_sub(first) as usize;
        self.kept.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest_events_and_numbers_them_without_gaps() {
        let mut log = EventLog::default();
        let t = Instant::now();
        for i in 0..EVENTS_KEPT as u64 + 10 {
            log.push(t, EventKind::WorkerJoined { worker: WorkerId(i), name: String::new() });
        }
        assert_eq!(log.next_seq(), EVENTS_KEPT as u64 + 10);
        let all = log.since(0);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert_eq!(all[0].seq, 10, "the oldest ten were dropped");
        let tail = log.since(EVENTS_KEPT as u64 + 8);
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [EVENTS_KEPT as u64 + 8, EVENTS_KEPT as u64 + 9]
        );
        assert!(log.since(u64::MAX).is_empty());
    }
}
