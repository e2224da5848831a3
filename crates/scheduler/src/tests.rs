use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

type S = Scheduler<&'static str, u32>;

fn drain(s: &mut S) -> Vec<Command<&'static str, u32>> {
    std::iter::from_fn(|| s.poll_command()).collect()
}

fn dispatched(cmds: &[Command<&'static str, u32>]) -> Vec<(u64, u64, u32)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Dispatch { worker, task, attempt, .. } => Some((worker.0, task.0, *attempt)),
            _ => None,
        })
        .collect()
}

#[test]
fn tasks_wait_for_a_worker_then_respect_its_capacity() {
    let mut s = S::new(Config::default());
    for t in 0..5 {
        s.submit(TaskId(t), GroupId(1), "x");
    }
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.queued(), 5);
    s.worker_joined(WorkerId(10), 2);
    assert_eq!(dispatched(&drain(&mut s)), vec![(10, 0, 1), (10, 1, 1)]);
    assert!(s.task_finished(WorkerId(10), TaskId(0), 1, 100));
    let cmds = drain(&mut s);
    assert_eq!(cmds[0], Command::Deliver { task: TaskId(0), group: GroupId(1), result: 100 });
    assert_eq!(dispatched(&cmds), vec![(10, 2, 1)]);
}

#[test]
fn a_worker_can_ask_for_more_or_fewer_tasks() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 1);
    for t in 0..4 {
        s.submit(TaskId(t), GroupId(1), "x");
    }
    assert_eq!(dispatched(&drain(&mut s)).len(), 1);
    s.worker_joined(WorkerId(1), 3); // its tasks turned out short: it takes more
    assert_eq!(dispatched(&drain(&mut s)), vec![(1, 1, 1), (1, 2, 1)]);
    s.worker_joined(WorkerId(1), 1); // and fewer again: nothing new until it is below
    assert!(s.task_finished(WorkerId(1), TaskId(0), 1, 0));
    assert!(dispatched(&drain(&mut s)).is_empty());
}

#[test]
fn load_is_spread_over_workers() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 2);
    s.worker_joined(WorkerId(2), 2);
    for t in 0..4 {
        s.submit(TaskId(t), GroupId(1), "x");
    }
    let per: Vec<_> = dispatched(&drain(&mut s)).iter().map(|d| d.0).collect();
    assert_eq!(per.iter().filter(|&&w| w == 1).count(), 2);
    assert_eq!(per.iter().filter(|&&w| w == 2).count(), 2);
}

/// Where one-at-a-time placement puts each of `tasks` tasks: on the worker
/// with the most free slots, then the lowest id, one task after another.
fn one_at_a_time(free: &[(u64, usize)], tasks: usize) -> Vec<u64> {
    let mut free: BTreeMap<u64, usize> = free.iter().copied().collect();
    (0..tasks)
        .map_while(|_| {
            let (&id, f) =
                free.iter_mut().filter(|(_, f)| **f > 0).max_by_key(|(id, f)| (**f, Reverse(**id)))?;
            *f -= 1;
            Some(id)
        })
        .collect()
}

/// The worker of each dispatched task, in the order of the tasks; and each
/// worker's tasks must come to it in queue order.
fn placement(d: &[(u64, u64, u32)]) -> Vec<u64> {
    let mut last: HashMap<u64, u64> = HashMap::new();
    for &(w, t, _) in d {
        if let Some(before) = last.insert(w, t) {
            assert!(before < t, "worker {w} got task {t} after task {before}");
        }
    }
    let mut by_task: Vec<(u64, u64)> = d.iter().map(|&(w, t, _)| (t, w)).collect();
    by_task.sort_unstable();
    by_task.into_iter().map(|(_, w)| w).collect()
}

/// Submits `tasks` tasks (ids `first..`) to workers of these free slots.
fn placed(free: &[(u64, usize)], tasks: usize) -> Vec<u64> {
    let mut s = S::new(Config::default());
    for &(w, c) in free {
        s.worker_joined(WorkerId(w), c);
    }
    // A large submission at once, as a job's tasks arrive (one schedule).
    s.defer();
    for t in 0..tasks {
        s.submit(TaskId(t as u64), GroupId(1), "x");
    }
    s.resume();
    let ahead: Vec<usize> = free.iter().map(|&(w, _)| s.dispatches_next(WorkerId(w))).collect();
    let d = dispatched(&drain(&mut s));
    // Each worker's tasks come in one run; the first run is the one ahead.
    let runs = d.iter().enumerate().filter(|&(i, x)| i == 0 || d[i - 1].0 != x.0).count();
    assert_eq!(runs, free.iter().filter(|&&(w, _)| d.iter().any(|x| x.0 == w)).count());
    let head = d.iter().take_while(|x| x.0 == d[0].0).count();
    for (&(w, _), &n) in free.iter().zip(&ahead) {
        assert_eq!(n, if d.first().is_some_and(|x| x.0 == w) { head } else { 0 }, "worker {w}");
    }
    let got = placement(&d);
    s.check_room();
    got
}

#[test]
fn each_task_goes_where_one_at_a_time_placement_puts_it() {
    for (caps, tasks) in [
        (vec![(1, 3), (2, 5), (3, 2), (4, 5)], 12),
        (vec![(7, 8), (3, 1), (5, 4)], 20),
        (vec![(1, 1)], 3),
        (vec![(9, 6), (2, 6), (4, 6)], 13),
        (vec![(5, 1), (1, 1), (3, 1), (2, 9)], 4),
    ] {
        assert_eq!(placed(&caps, tasks), one_at_a_time(&caps, tasks), "capacities {caps:?}");
        // Submitted one by one, each placed as it comes.
        let mut s = S::new(Config::default());
        for &(w, c) in &caps {
            s.worker_joined(WorkerId(w), c);
        }
        for t in 0..tasks {
            s.submit(TaskId(t as u64), GroupId(1), "x");
        }
        assert_eq!(placement(&dispatched(&drain(&mut s))), one_at_a_time(&caps, tasks));
        s.check_room();
    }
    // With a queue behind: finishing frees a slot, which the next task takes
    // at once; after a batch under `defer`, the freed slots are handed out
    // together, fullest first.
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 4);
    s.worker_joined(WorkerId(2), 4);
    for t in 0..12 {
        s.submit(TaskId(t), GroupId(1), "x");
    }
    let first = dispatched(&drain(&mut s));
    assert_eq!(placement(&first), one_at_a_time(&[(1, 4), (2, 4)], 8));
    s.defer();
    for (w, t, a) in first.iter().filter(|d| d.0 == 2).take(3) {
        assert!(s.task_finished(WorkerId(*w), TaskId(*t), *a, 0));
    }
    assert!(s.task_finished(WorkerId(1), TaskId(first[0].1), 1, 0));
    let held = drain(&mut s);
    assert!(dispatched(&held).is_empty(), "nothing handed out while deferred");
    assert_eq!(held.len(), 4, "the results are delivered at once");
    s.resume();
    let next = dispatched(&drain(&mut s));
    let mut taken: Vec<u64> = next.iter().map(|d| d.1).collect();
    taken.sort_unstable();
    assert_eq!(taken, (8..12).collect::<Vec<_>>(), "the next tasks in line");
    assert_eq!(placement(&next), one_at_a_time(&[(1, 1), (2, 3)], 4));
    s.check_room();
}

proptest! {
    #[test]
    fn a_whole_queue_goes_where_one_at_a_time_puts_it(
        free in proptest::collection::btree_map(0u64..40, 1usize..12, 1..12),
        tasks in 0usize..150,
    ) {
        let free: Vec<(u64, usize)> = free.into_iter().collect();
        prop_assert_eq!(placed(&free, tasks), one_at_a_time(&free, tasks));
    }
}

#[test]
fn stale_and_duplicate_results_are_dropped() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 1);
    s.submit(TaskId(0), GroupId(1), "x");
    drain(&mut s);
    assert!(!s.task_finished(WorkerId(2), TaskId(0), 1, 5), "wrong worker");
    assert!(!s.task_finished(WorkerId(1), TaskId(0), 2, 5), "wrong attempt");
    assert!(s.task_finished(WorkerId(1), TaskId(0), 1, 5));
    assert!(!s.task_finished(WorkerId(1), TaskId(0), 1, 5), "duplicate");
    let delivered = drain(&mut s).into_iter().filter(|c| matches!(c, Command::Deliver { .. })).count();
    assert_eq!(delivered, 1);
}

#[test]
fn a_lost_worker_gives_its_tasks_to_another_in_order() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 3);
    for t in 0..3 {
        s.submit(TaskId(t), GroupId(1), "x");
    }
    drain(&mut s);
    s.worker_lost(WorkerId(1), "connection reset");
    assert_eq!(s.queued(), 3);
    s.worker_joined(WorkerId(2), 3);
    assert_eq!(dispatched(&drain(&mut s)), vec![(2, 0, 2), (2, 1, 2), (2, 2, 2)]);
    // The old worker's late result is refused.
    assert!(!s.task_finished(WorkerId(1), TaskId(0), 1, 0));
}

#[test]
fn crash_limit_fails_the_task_with_every_reason() {
    let mut s = S::new(Config { max_crashes: 3, max_losses: 10 });
    s.worker_joined(WorkerId(1), 1);
    s.submit(TaskId(0), GroupId(7), "poison");
    s.submit(TaskId(1), GroupId(7), "fine");
    for attempt in 1..=3 {
        let d = dispatched(&drain(&mut s));
        assert_eq!(d[0], (1, 0, attempt));
        assert!(s.task_crashed(WorkerId(1), TaskId(0), attempt, "killed by signal 9"));
    }
    let cmds = drain(&mut s);
    let Command::Fail { task: TaskId(0), group: GroupId(7), failure } = &cmds[0] else { panic!("{cmds:?}") };
    assert_eq!(failure.attempts, 3);
    assert_eq!(failure.kind, FailureKind::Crashes);
    assert_eq!(failure.reasons.len(), 3);
    assert!(failure.reasons[2].contains("signal 9"));
    // The healthy task still runs.
    assert_eq!(dispatched(&cmds), vec![(1, 1, 1)]);
}

#[test]
fn a_crashed_task_is_retried_on_another_worker_when_one_has_room() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 2);
    s.worker_joined(WorkerId(2), 1);
    s.submit(TaskId(0), GroupId(1), "x");
    assert_eq!(dispatched(&drain(&mut s)), vec![(1, 0, 1)]);
    assert!(s.task_crashed(WorkerId(1), TaskId(0), 1, "killed"));
    // Worker 1 has more room, but the task just crashed there.
    assert_eq!(dispatched(&drain(&mut s)), vec![(2, 0, 2)]);
    // With no other worker free, it may go back.
    s.worker_lost(WorkerId(2), "gone");
    assert_eq!(dispatched(&drain(&mut s)), vec![(1, 0, 3)]);
}

#[test]
fn cancel_group_drops_queued_and_cancels_running_tasks() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 1);
    s.submit(TaskId(0), GroupId(1), "a");
    s.submit(TaskId(1), GroupId(1), "b");
    s.submit(TaskId(2), GroupId(2), "c");
    drain(&mut s);
    s.cancel_group(GroupId(1));
    let cmds = drain(&mut s);
    assert_eq!(cmds[0], Command::Cancel { worker: WorkerId(1), tasks: vec![TaskId(0)] });
    assert_eq!(dispatched(&cmds), vec![(1, 2, 1)]);
    assert!(!s.task_finished(WorkerId(1), TaskId(0), 1, 0), "cancelled task's result is dropped");
    assert_eq!(s.pending(), 1);
}

#[test]
fn a_timed_out_task_fails_at_once_and_frees_its_slot() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 1);
    s.submit(TaskId(0), GroupId(1), "slow");
    s.submit(TaskId(1), GroupId(1), "next");
    drain(&mut s);
    assert!(!s.task_timed_out(WorkerId(1), TaskId(0), 2, "late"), "stale attempt");
    assert!(s.task_timed_out(WorkerId(1), TaskId(0), 1, "ran past 5 s"));
    let cmds = drain(&mut s);
    let Command::Fail { task: TaskId(0), failure, .. } = &cmds[0] else { panic!("{cmds:?}") };
    assert_eq!(failure.kind, FailureKind::Timeout);
    assert!(failure.reasons[0].contains("ran past 5 s"));
    assert_eq!(dispatched(&cmds), vec![(1, 1, 1)]);
}

#[test]
fn only_undispatched_tasks_can_be_withdrawn() {
    let mut s = S::new(Config::default());
    s.worker_joined(WorkerId(1), 1);
    s.submit(TaskId(0), GroupId(1), "running");
    s.submit(TaskId(1), GroupId(1), "queued");
    drain(&mut s);
    assert!(!s.withdraw(TaskId(0)), "a dispatched task stays");
    assert!(s.withdraw(TaskId(1)));
    assert!(!s.withdraw(TaskId(1)), "already gone");
    assert_eq!(s.queued(), 0);
    assert!(s.task_finished(WorkerId(1), TaskId(0), 1, 9));
    // Nothing is dispatched for the withdrawn task once the worker is free.
    assert!(dispatched(&drain(&mut s)).is_empty());
    assert_eq!(s.pending(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Submit,
    Join(u8, u8),
    Lose(u8),
    Finish(u8),
    Duplicate(u8),
    Crash(u8),
    Timeout(u8),
    /// A result lost on the way: only losing its worker recovers the task.
    DropResult(u8),
    CancelGroup(u8),
    Withdraw(u8),
    /// Scheduling held (a batch of results), or resumed.
    Defer,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Submit),
        1 => (0u8..4, 1u8..4).prop_map(|(w, c)| Op::Join(w, c)),
        1 => (0u8..4).prop_map(Op::Lose),
        4 => any::<u8>().prop_map(Op::Finish),
        1 => any::<u8>().prop_map(Op::Duplicate),
        1 => any::<u8>().prop_map(Op::Crash),
        1 => any::<u8>().prop_map(Op::Timeout),
        1 => any::<u8>().prop_map(Op::DropResult),
        1 => (0u8..3).prop_map(Op::CancelGroup),
        1 => any::<u8>().prop_map(Op::Withdraw),
        1 => Just(Op::Defer),
    ]
}

/// Every outcome the scheduler produced, checked against its invariants.
#[derive(Default)]
struct Model {
    // Plain numbers here; the scheduler's typed ids are unwrapped as they arrive.
    outcomes: HashMap<u64, u32>,
    cancelled: BTreeSet<u64>,
    group_of: HashMap<u64, u64>,
    /// (worker, task) → attempt for every dispatched, unresolved attempt.
    inflight: BTreeMap<(u64, u64), u32>,
    live_workers: BTreeMap<u64, usize>,
    max_attempt: u32,
}

impl Model {
    fn absorb(&mut self, s: &mut Scheduler<u64, u64>) {
        s.check_room();
        while let Some(c) = s.poll_command() {
            match c {
                Command::Dispatch { worker, task, attempt, payload } => {
                    let (worker, task) = (worker.0, task.0);
                    assert_eq!(payload, task, "payload travels with its task");
                    assert!(self.live_workers.contains_key(&worker), "dispatch to a lost worker");
                    assert!(!self.outcomes.contains_key(&task), "dispatch after the outcome");
                    assert!(!self.cancelled.contains(&task), "dispatch of a cancelled or withdrawn task");
                    self.max_attempt = self.max_attempt.max(attempt);
                    self.inflight.retain(|&(_, t), _| t != task);
                    self.inflight.insert((worker, task), attempt);
                    let load = self.inflight.keys().filter(|(w, _)| *w == worker).count();
                    assert!(load <= self.live_workers[&worker], "worker over capacity");
                }
                Command::Deliver { task, result, .. } => {
                    let task = task.0;
                    assert_eq!(result, task * 10);
                    *self.outcomes.entry(task).or_default() += 1;
                    self.inflight.retain(|&(_, t), _| t != task);
                }
                Command::Fail { task, .. } => {
                    let task = task.0;
                    *self.outcomes.entry(task).or_default() += 1;
                    self.inflight.retain(|&(_, t), _| t != task);
                }
                Command::Cancel { tasks, .. } => {
                    for TaskId(t) in tasks {
                        assert!(self.cancelled.contains(&t), "cancelled a task of another group");
                        self.inflight.retain(|&(_, x), _| x != t);
                    }
                }
            }
        }
        for (t, n) in &self.outcomes {
            assert_eq!(*n, 1, "task {t} has {n} outcomes");
            assert!(!self.cancelled.contains(t) || *n == 1);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_interleaving_loses_or_duplicates_a_result(ops in proptest::collection::vec(op(), 1..200)) {
        let config = Config { max_crashes: 3, max_losses: 4 };
        let mut s: Scheduler<u64, u64> = Scheduler::new(config);
        let mut m = Model::default();
        let mut next = 0u64;
        let mut deferred = false;
        for op in ops {
            match op {
                Op::Submit => {
                    let group = next % 3;
                    m.group_of.insert(next, group);
                    s.submit(TaskId(next), GroupId(group), next);
                    next += 1;
                }
                Op::Join(w, c) => {
                    m.live_workers.insert(w as u64, c as usize);
                    s.worker_joined(WorkerId(w as u64), c as usize);
                }
                Op::Lose(w) => {
                    m.live_workers.remove(&(w as u64));
                    s.worker_lost(WorkerId(w as u64), "test");
                    m.inflight.retain(|&(wk, _), _| wk != w as u64);
                }
                Op::Finish(i) | Op::Duplicate(i) | Op::Crash(i) | Op::Timeout(i) => {
                    if m.inflight.is_empty() { continue; }
                    let (&(w, t), &a) = m.inflight.iter().nth(i as usize % m.inflight.len()).unwrap();
                    match op {
                        Op::Finish(_) => prop_assert!(s.task_finished(WorkerId(w), TaskId(t), a, t * 10)),
                        Op::Crash(_) => {
                            prop_assert!(s.task_crashed(WorkerId(w), TaskId(t), a, "boom"));
                            m.inflight.remove(&(w, t));
                        }
                        Op::Timeout(_) => {
                            prop_assert!(s.task_timed_out(WorkerId(w), TaskId(t), a, "too slow"));
                            m.inflight.remove(&(w, t));
                        }
                        _ => {
                            // A stale copy from an earlier attempt must be refused.
                            prop_assert!(!s.task_finished(WorkerId(w), TaskId(t), a.wrapping_sub(1), t * 10));
                            prop_assert!(!s.task_finished(WorkerId(w + 100), TaskId(t), a, t * 10));
                        }
                    }
                }
                Op::DropResult(i) => {
                    if m.inflight.is_empty() { continue; }
                    let key = *m.inflight.keys().nth(i as usize % m.inflight.len()).unwrap();
                    m.inflight.remove(&key);
                }
                Op::Withdraw(i) => {
                    if next == 0 { continue; }
                    let t = u64::from(i) % next;
                    let was_inflight = m.inflight.keys().any(|&(_, x)| x == t);
                    if s.withdraw(TaskId(t)) {
                        prop_assert!(!was_inflight, "withdrew a dispatched task");
                        prop_assert!(!m.outcomes.contains_key(&t), "withdrew a finished task");
                        m.cancelled.insert(t);
                    }
                }
                Op::CancelGroup(g) => {
                    for (&t, &grp) in &m.group_of {
                        if grp == g as u64 && !m.outcomes.contains_key(&t) {
                            m.cancelled.insert(t);
                        }
                    }
                    s.cancel_group(GroupId(g as u64));
                }
                Op::Defer => {
                    deferred = !deferred;
                    if deferred { s.defer() } else { s.resume() }
                }
            }
            m.absorb(&mut s);
        }
        s.resume();
        m.absorb(&mut s);
        // Quiescence: the old workers go (recovering tasks whose results were
        // lost), a healthy worker joins and finishes everything.
        for w in 0..4u64 {
            m.live_workers.remove(&w);
            s.worker_lost(WorkerId(w), "end of test");
            m.inflight.retain(|&(wk, _), _| wk != w);
            m.absorb(&mut s);
        }
        m.live_workers.insert(99, 4);
        s.worker_joined(WorkerId(99), 4);
        m.absorb(&mut s);
        let mut rounds = 0;
        while let Some((&(w, t), &a)) = m.inflight.iter().next() {
            prop_assert!(s.task_finished(WorkerId(w), TaskId(t), a, t * 10));
            m.absorb(&mut s);
            rounds += 1;
            prop_assert!(rounds < 10_000);
        }
        prop_assert_eq!(s.pending(), 0);
        for t in 0..next {
            let n = m.outcomes.get(&t).copied().unwrap_or(0);
            if m.cancelled.contains(&t) {
                prop_assert!(n <= 1);
            } else {
                prop_assert_eq!(n, 1, "task {} has {} outcomes", t, n);
            }
        }
        prop_assert!(m.max_attempt <= config.max_crashes + config.max_losses);
    }
}
