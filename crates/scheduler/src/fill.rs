//! Placing a whole queue at once, worker by worker.
//!
//! One task at a time, each queued task goes to the worker with the most
//! free slots, ties to the lowest id. Over many workers with equal room
//! that deals the tasks out like cards: one to each worker, then a second
//! to each, and so on. Done literally, every task moves its worker in the
//! room index and touches that worker's state once more; over ten thousand
//! workers, each touch misses the cache.
//!
//! [`Scheduler::fill`] gives every task to the same worker as that rule
//! does, but works out the whole deal first, on small arrays, and then
//! hands each worker all of its tasks in one go: the worker's state is
//! touched once per worker, and its entry in the room index moves once.
//!
//! The deal, level by level: at level `l`, the workers with at least `l`
//! free slots (all of them down to `l` by then) each get one task, in
//! order of id; then the level drops by one and the workers with exactly
//! that many free slots join in.

use std::cmp::Reverse;

use crate::{dispatch, reindex, Scheduler, TaskId, WorkerId};

/// Scratch space of [`Scheduler::fill`], kept between calls.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The workers dealt to.
    workers: Vec<WorkerId>,
    /// Indexes into `workers` of those in the deal so far, by id.
    members: Vec<u32>,
    /// The workers joining at this level, by id.
    joining: Vec<u32>,
    merged: Vec<u32>,
    /// The worker each queued task goes to, in queue order.
    picks: Vec<u32>,
    /// `tasks[starts[i]..starts[i + 1]]` are those of `workers[i]`.
    starts: Vec<usize>,
    cursor: Vec<usize>,
    tasks: Vec<TaskId>,
}

/// A deal this large does not keep its scratch space for the next.
const KEEP: usize = 1 << 18;

impl<P: Clone, R> Scheduler<P, R> {
    /// Hand queued tasks to the workers with room, each to the one that
    /// one-at-a-time placement would choose. No queued task may avoid a
    /// worker (see `avoiding`).
    pub(crate) fn fill(&mut self) {
        debug_assert_eq!(self.avoiding, 0);
        let mut s = std::mem::take(&mut self.scratch);
        self.deal(&mut s);
        if !s.picks.is_empty() {
            self.hand_out(&mut s);
        }
        if s.picks.capacity() <= KEEP {
            self.scratch = s;
        }
    }

    /// Work out which worker each queued task goes to (`s.picks`).
    fn deal(&self, s: &mut Scratch) {
        s.workers.clear();
        s.members.clear();
        s.picks.clear();
        let n = self.queue.len();
        // Most free slots first, then the lowest id.
        let mut entries = self.room.iter().rev().map(|&(free, Reverse(id))| (free, id)).peekable();
        let Some(&(mut level, _)) = entries.peek() else {
            return;
        };
        while s.picks.len() < n && level > 0 {
            // Those that join at this level come in order of id; only the
            // lowest ids of them can be reached by the tasks left.
            let left = n - s.picks.len();
            s.joining.clear();
            while s.joining.len() < left {
                match entries.peek() {
                    Some(&(free, id)) if free == level => {
                        s.joining.push(s.workers.len() as u32);
                        s.workers.push(id);
                        entries.next();
                    }
                    _ => break,
                }
            }
            if !s.joining.is_empty() {
                merge_by_id(&s.workers, &s.members, &s.joining, &mut s.merged);
                std::mem::swap(&mut s.members, &mut s.merged);
            }
            let take = s.members.len().min(left);
            s.picks.extend_from_slice(&s.members[..take]);
            level -= 1;
        }
    }

    /// Take the dealt tasks off the queue and dispatch them, worker by worker.
    fn hand_out(&mut self, s: &mut Scratch) {
        let k = s.workers.len();
        s.starts.clear();
        s.starts.resize(k + 1, 0);
        for &p in &s.picks {
            s.starts[p as usize + 1] += 1;
        }
        for i in 0..k {
            s.starts[i + 1] += s.starts[i];
        }
        s.cursor.clear();
        s.cursor.extend_from_slice(&s.starts[..k]);
        s.tasks.clear();
        s.tasks.resize(s.picks.len(), TaskId(0));
        for (&p, task) in s.picks.iter().zip(self.queue.drain(..s.picks.len())) {
            let at = &mut s.cursor[p as usize];
            s.tasks[*at] = task;
            *at += 1;
        }
        self.out.reserve(s.picks.len());
        for (i, &worker) in s.workers.iter().enumerate() {
            let tasks = &s.tasks[s.starts[i]..s.starts[i + 1]];
            if tasks.is_empty() {
                continue;
            }
            let w = self.workers.get_mut(&worker).expect("a worker in the room index is known");
            w.tasks.reserve(tasks.len());
            for &task in tasks {
                let avoided = dispatch(&mut self.tasks, &mut self.out, worker, w, task);
                debug_assert!(!avoided, "a retry that avoids a worker is placed on its own");
            }
            reindex(&mut self.room, worker, w);
        }
    }
}

/// `a` and `b`, each in order of their workers' ids, merged into `out`.
fn merge_by_id(workers: &[WorkerId], a: &[u32], b: &[u32], out: &mut Vec<u32>) {
    out.clear();
    out.reserve(a.len() + b.len());
    let id = |i: u32| workers[i as usize];
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if id(a[i]) < id(b[j]) {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
}
