//! The core without sockets: inputs in, and every frame and completion it
//! produces recorded. Each test ends by checking that nothing it did not
//! look at was sent.

use super::super::snapshot::ClientInfo;
use super::*;
use crate::ids::{ClientId, FnId, JobId, WorkerId};

#[derive(Default)]
struct Recorder {
    frames: VecDeque<(u64, ToAgent, Bytes)>,
    completions: VecDeque<(ClientId, Completion)>,
}

impl Comm for Recorder {
    fn send_agent(&mut self, worker: WorkerId, frames: Vec<Outgoing<ToAgent>>) {
        self.frames.extend(frames.into_iter().map(|f| (worker.0, f.msg, f.payload.to_bytes())));
    }
    fn deliver(&mut self, client: ClientId, completions: Vec<Completion>) {
        self.completions.extend(completions.into_iter().map(|c| (client, c)));
    }
}

struct Harness {
    core: Core,
    comm: Recorder,
    stats: Arc<Stats>,
    t0: Instant,
    ms: u64,
}

const CLIENT: ClientId = ClientId(100);

impl Harness {
    fn new() -> Self {
        let stats = Arc::new(Stats::default());
        let t0 = Instant::now();
        let mut h =
            Self { core: Core::new(3, stats.clone(), t0, true), comm: Recorder::default(), stats, t0, ms: 0 };
        h.input(Input::ClientOpened { client: CLIENT });
        h
    }

    /// The virtual clock: every input arrives `ms` after the start.
    fn now(&self) -> Instant {
        self.t0 + std::time::Duration::from_millis(self.ms)
    }

    fn input(&mut self, input: Input) {
        self.core.handle(input, self.now());
        self.core.flush(&mut self.comm);
    }

    fn join(&mut self, worker: u64, slots: usize) {
        let labels =
            Labels { host: format!("host{worker}"), pid: 40 + worker as u32, cpus: 2, extra: Vec::new() };
        self.input(Input::AgentJoined {
            worker: WorkerId(worker),
            peer: format!("10.0.0.{worker}:5000"),
            slots,
            labels,
        });
    }

    fn submit(&mut self, job: u64, function: &'static [u8], n: u32) {
        let tasks = (0..n).map(|i| (i, Bytes::from(format!("arg{i}")).into())).collect();
        let fn_id = super::super::function_id(function);
        self.input(Input::Submit {
            client: CLIENT,
            job: JobId(job),
            fn_id,
            function: Bytes::from_static(function),
            needs: Vec::new(),
            tasks,
            timeout_ms: 0,
        });
    }

    /// `n` tasks of job `job`, calling `function`, which needs `needs`.
    fn submit_needing(&mut self, job: u64, function: &'static [u8], needs: &[&'static [u8]], n: u32) {
        let tasks = (0..n).map(|i| (i, Bytes::from(format!("arg{i}")).into())).collect();
        let needs: Vec<(FnId, Bytes)> =
            needs.iter().map(|b| (super::super::function_id(b), Bytes::from_static(b))).collect();
        self.input(Input::Submit {
            client: CLIENT,
            job: JobId(job),
            fn_id: FnId(super::super::function_id(function).0 ^ 1),
            function: Bytes::from_static(function),
            needs,
            tasks,
            timeout_ms: 0,
        });
    }

    fn agent_says(&mut self, worker: u64, msg: FromAgent, payload: &'static [u8]) {
        self.input(Input::AgentMessages {
            worker: WorkerId(worker),
            msgs: vec![(msg, Bytes::from_static(payload))],
        });
    }

    /// Every frame sent since the last call, as `(worker, message)`.
    fn sent(&mut self) -> Vec<(u64, ToAgent)> {
        self.comm.frames.drain(..).map(|(w, m, _)| (w, m)).collect()
    }

    /// The tasks sent since the last call, as `(worker, task, attempt)`;
    /// fails on any other frame.
    fn tasks_sent(&mut self) -> Vec<(u64, u64, u32)> {
        self.sent()
            .into_iter()
            .filter_map(|(w, m)| match m {
                ToAgent::Task { task, attempt, .. } => Some((w, task, attempt)),
                ToAgent::Function { .. } => None,
                other => panic!("expected tasks, got {other:?}"),
            })
            .collect()
    }

    /// Answer every task among `frames` with a result, and the frames that
    /// follows, until none comes; returns the functions forgotten.
    fn answer(&mut self, mut frames: Vec<(u64, ToAgent)>) -> Vec<u64> {
        let mut forgotten = Vec::new();
        while !frames.is_empty() {
            for (w, m) in frames {
                match m {
                    ToAgent::Task { task, attempt, .. } => {
                        self.agent_says(w, FromAgent::Result { task, attempt, micros: 0 }, b"r")
                    }
                    ToAgent::Forget { fn_id } => forgotten.push(fn_id),
                    ToAgent::Function { .. } => {}
                    other => panic!("{other:?}"),
                }
            }
            frames = self.sent();
        }
        forgotten
    }

    /// Completions since the last call, as `(job, index, outcome)`.
    fn delivered(&mut self) -> Vec<(u64, u32, Outcome)> {
        self.comm
            .completions
            .drain(..)
            .map(|(client, c)| {
                assert_eq!(client, CLIENT);
                (c.job.0, c.index, c.outcome)
            })
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(self.comm.frames.is_empty(), "frames not looked at: {:?}", self.comm.frames);
            assert!(
                self.comm.completions.is_empty(),
                "completions not looked at: {:?}",
                self.comm.completions
            );
        }
    }
}

fn done(outcome: &Outcome) -> &[u8] {
    match outcome {
        Outcome::Done(b) => b,
        other => panic!("expected a result, got {other:?}"),
    }
}

#[test]
fn an_agent_gets_the_function_once_and_up_to_its_capacity_of_tasks() {
    let mut h = Harness::new();
    h.submit(1, b"f", 5);
    assert!(h.sent().is_empty(), "no agent yet");
    h.join(7, 1);
    let sent = h.sent();
    assert!(matches!(sent[0], (7, ToAgent::Function { .. })));
    assert_eq!(sent.len(), 1 + DEPTH, "one slot holds {DEPTH} tasks");
    let ToAgent::Task { task, attempt, .. } = sent[1].1 else { panic!("{sent:?}") };
    h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"r0");
    let d = h.delivered();
    assert_eq!((d[0].0, d[0].1, done(&d[0].2)), (1, 0, &b"r0"[..]));
    // The next task goes without its function: the agent has it.
    assert!(matches!(h.sent()[..], [(7, ToAgent::Task { .. })]));
    assert_eq!(h.stats.tasks_done.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.workers.load(Ordering::Relaxed), 1);
}

#[test]
fn a_larger_capacity_brings_more_tasks() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 20);
    assert_eq!(h.tasks_sent().len(), 2);
    h.agent_says(7, FromAgent::Capacity { tasks: 8 }, b"");
    assert_eq!(h.tasks_sent().len(), 6);
    // A smaller one sends nothing until the agent holds less.
    h.agent_says(7, FromAgent::Capacity { tasks: 1 }, b"");
    assert!(h.sent().is_empty());
}

#[test]
fn the_tasks_of_an_agent_that_goes_silent_go_to_another_with_the_function() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 2);
    let first = h.tasks_sent();
    assert_eq!(first.len(), 2);
    h.join(8, 1);
    assert!(h.sent().is_empty(), "nothing is left to give the second agent");
    h.input(Input::AgentLeft {
        worker: WorkerId(7),
        end: SessionEnd::Silent(std::time::Duration::from_secs(10)),
    });
    let sent = h.sent();
    assert!(matches!(sent[0], (8, ToAgent::Function { .. })), "{sent:?}");
    let retried: Vec<_> = sent[1..]
        .iter()
        .map(|(w, m)| match m {
            ToAgent::Task { task, attempt, .. } => (*w, *task, *attempt),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(retried, first.iter().map(|&(_, t, a)| (8, t, a + 1)).collect::<Vec<_>>());
    assert_eq!(h.stats.workers.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.workers_lost.load(Ordering::Relaxed), 1);
    // A late result of the lost agent's attempt is not delivered twice.
    let (_, task, attempt) = first[0];
    h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"late");
    h.agent_says(8, FromAgent::Result { task, attempt: attempt + 1, micros: 0 }, b"r");
    let d = h.delivered();
    assert_eq!(d.len(), 1);
    assert_eq!(done(&d[0].2), b"r");
    assert!(h.sent().is_empty());
}

#[test]
fn a_task_whose_executors_keep_dying_fails_with_every_reason() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 1);
    for attempt in 1..=3 {
        let sent = h.tasks_sent();
        assert_eq!(sent.len(), 1, "attempt {attempt}");
        let (_, task, a) = sent[0];
        assert_eq!(a, attempt);
        h.agent_says(7, FromAgent::Crashed { task, attempt: a, reason: format!("signal 9 #{a}") }, b"");
    }
    let d = h.delivered();
    let Outcome::Failed { kind, reason } = &d[0].2 else { panic!("{d:?}") };
    assert_eq!(*kind, FailureKind::Crashes);
    assert!(
        reason.contains("after 3 attempts")
            && reason.contains("signal 9 #3 on worker host7 (10.0.0.7:5000, agent pid 47)"),
        "{reason}"
    );
    assert_eq!(h.stats.crashes.load(Ordering::Relaxed), 3);
}

#[test]
fn a_timed_out_task_fails_at_once() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 1);
    let (_, task, attempt) = h.tasks_sent()[0];
    h.agent_says(7, FromAgent::TimedOut { task, attempt, reason: "ran longer than 1s".into() }, b"");
    let d = h.delivered();
    let Outcome::Failed { kind, reason } = &d[0].2 else { panic!("{d:?}") };
    assert_eq!(
        (*kind, reason.as_str()),
        (FailureKind::Timeout, "task ran longer than 1s on worker host7 (10.0.0.7:5000, agent pid 47)")
    );
    assert!(h.sent().is_empty(), "not retried");
}

#[test]
fn withdraw_takes_back_exactly_the_tasks_no_agent_holds() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 5);
    h.submit(2, b"f", 1);
    let held = h.tasks_sent();
    assert_eq!(held.len(), 2);
    assert_eq!(h.core.withdraw(CLIENT, JobId(1)), vec![2, 3, 4]);
    assert_eq!(h.core.withdraw(CLIENT, JobId(1)), Vec::<u32>::new(), "nothing twice");
    for &(_, task, attempt) in &held {
        h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"r");
    }
    // The other job's task was behind the withdrawn ones; it runs now.
    let (_, task, attempt) = h.tasks_sent()[0];
    h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"r");
    let jobs: Vec<(u64, u32)> = h.delivered().iter().map(|d| (d.0, d.1)).collect();
    assert_eq!(jobs, [(1, 0), (1, 1), (2, 0)]);
}

#[test]
fn a_closing_client_stops_its_running_tasks_and_gets_nothing_more() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 4);
    let held = h.tasks_sent();
    h.input(Input::ClientClosed { client: CLIENT });
    let sent = h.sent();
    let [(7, ToAgent::Cancel { tasks })] = &sent[..] else { panic!("{sent:?}") };
    let mut expected: Vec<u64> = held.iter().map(|t| t.1).collect();
    let mut tasks = tasks.clone();
    tasks.sort_unstable();
    expected.sort_unstable();
    assert_eq!(tasks, expected);
    let (_, task, attempt) = held[0];
    h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"late");
    assert!(h.delivered().is_empty());
    // The agent is free for other clients at once.
    h.input(Input::ClientOpened { client: ClientId(101) });
    h.input(Input::Submit {
        client: ClientId(101),
        job: JobId(1),
        fn_id: FnId(9),
        needs: Vec::new(),
        function: Bytes::from_static(b"g"),
        tasks: vec![(0, Bytes::new().into()), (1, Bytes::new().into())],
        timeout_ms: 0,
    });
    assert_eq!(h.tasks_sent().len(), 2);
}

#[test]
fn idle_functions_are_evicted_oldest_first_and_each_agent_told_once() {
    let mut h = Harness::new();
    h.join(7, 1);
    let functions: Vec<&'static [u8]> =
        (0..=IDLE_FUNCTIONS).map(|i| &*Box::leak(format!("fn{i}").into_bytes().into_boxed_slice())).collect();
    let mut forgotten = Vec::new();
    for (job, f) in functions.iter().enumerate() {
        h.submit(job as u64, f, 1);
        let mut task = None;
        for (_, m) in h.sent() {
            match m {
                ToAgent::Task { task: t, attempt, .. } => task = Some((t, attempt)),
                ToAgent::Forget { fn_id } => forgotten.push(fn_id),
                ToAgent::Function { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        let (task, attempt) = task.expect("a task was sent");
        h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"r");
    }
    let last = h.sent();
    forgotten.extend(last.iter().filter_map(|(_, m)| match m {
        ToAgent::Forget { fn_id } => Some(*fn_id),
        _ => None,
    }));
    assert_eq!(forgotten, vec![super::super::function_id(functions[0]).0]);
    assert_eq!(h.delivered().len(), IDLE_FUNCTIONS + 1);
    // A function used again after its eviction is sent again.
    h.submit(99, functions[0], 1);
    assert!(matches!(h.sent()[..], [(7, ToAgent::Function { .. }), (7, ToAgent::Task { .. })]));
}

#[test]
fn messages_of_an_agent_that_never_joined_change_nothing() {
    let mut h = Harness::new();
    h.agent_says(5, FromAgent::Capacity { tasks: 100 }, b"");
    h.agent_says(5, FromAgent::Result { task: 1, attempt: 1, micros: 0 }, b"r");
    h.input(Input::AgentLeft { worker: WorkerId(5), end: SessionEnd::Closed });
    h.submit(1, b"f", 1);
    assert!(h.sent().is_empty());
    assert_eq!(h.stats.workers_lost.load(Ordering::Relaxed), 0);
}

#[test]
fn a_drained_agent_finishes_what_it_holds_gets_nothing_new_and_leaves_without_a_loss() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 4);
    let held = h.tasks_sent();
    assert_eq!(held.len(), 2);
    assert!(h.core.drain(WorkerId(7)));
    h.core.flush(&mut h.comm);
    assert!(matches!(h.sent()[..], [(7, ToAgent::Drain)]));
    assert!(h.core.drain(WorkerId(7)), "draining twice is not an error");
    h.core.flush(&mut h.comm);
    assert!(h.sent().is_empty(), "Drain is sent once");
    assert!(!h.core.drain(WorkerId(99)), "no such agent");
    // It asks for more; a draining agent gets nothing new.
    h.agent_says(7, FromAgent::Capacity { tasks: 32 }, b"");
    for &(_, task, attempt) in &held {
        h.agent_says(7, FromAgent::Result { task, attempt, micros: 0 }, b"r");
    }
    assert!(h.sent().is_empty());
    assert_eq!(h.delivered().len(), 2);
    assert_eq!(h.core.snapshot(h.now()).workers[0].state, WorkerState::Draining);
    h.agent_says(7, FromAgent::Goodbye { reason: "drained".into() }, b"");
    h.input(Input::AgentLeft { worker: WorkerId(7), end: SessionEnd::Closed });
    assert_eq!(h.stats.workers_left.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.workers_lost.load(Ordering::Relaxed), 0);
    // The two tasks it never got go to the next agent, as first attempts.
    h.join(8, 1);
    assert_eq!(h.tasks_sent().iter().map(|t| (t.0, t.2)).collect::<Vec<_>>(), [(8, 1), (8, 1)]);
    let kinds: Vec<&str> = h.core.events_since(0).iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds, ["worker_joined", "worker_draining", "worker_left", "worker_joined"]);
}

#[test]
fn the_tasks_of_an_agent_that_says_goodbye_go_elsewhere_without_counting_as_lost() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 2);
    let held = h.tasks_sent();
    h.agent_says(7, FromAgent::Goodbye { reason: "the worker is stopping".into() }, b"");
    h.input(Input::AgentLeft { worker: WorkerId(7), end: SessionEnd::Closed });
    h.join(8, 1);
    // Same attempt numbers would collide with a late result; the retry is a
    // new attempt, but not a loss: ten goodbyes do not fail a task.
    let retried = h.tasks_sent();
    assert_eq!(
        retried.iter().map(|t| (t.0, t.1)).collect::<Vec<_>>(),
        held.iter().map(|t| (8, t.1)).collect::<Vec<_>>()
    );
    for _ in 0..12 {
        h.agent_says(8, FromAgent::Goodbye { reason: "stopping".into() }, b"");
        h.input(Input::AgentLeft { worker: WorkerId(8), end: SessionEnd::Closed });
        h.join(8, 1);
        h.sent();
    }
    assert!(h.delivered().is_empty(), "no task failed");
    assert_eq!(h.stats.workers_lost.load(Ordering::Relaxed), 0);
}

#[test]
fn the_snapshot_shows_workers_with_their_labels_and_each_clients_tasks() {
    let mut h = Harness::new();
    h.join(7, 2);
    h.ms = 1500;
    h.submit(1, b"f", 10);
    let sent = h.tasks_sent();
    assert_eq!(sent.len(), 4);
    h.ms = 2000;
    h.agent_says(7, FromAgent::Result { task: sent[0].1, attempt: 1, micros: 0 }, b"r");
    h.delivered();
    h.tasks_sent();
    h.agent_says(7, FromAgent::Crashed { task: sent[1].1, attempt: 1, reason: "signal 9".into() }, b"");
    h.tasks_sent();
    h.ms = 2500;
    let snap = h.core.snapshot(h.now());
    let w = &snap.workers[0];
    assert_eq!((w.id.0, w.labels.host.as_str(), w.labels.pid, w.slots), (7, "host7", 47, 2));
    assert_eq!(w.peer, "10.0.0.7:5000");
    assert_eq!((w.running, w.tasks_done, w.crashes), (4, 1, 1));
    assert_eq!(w.connected_for, std::time::Duration::from_millis(2500));
    assert_eq!(w.last_heard, std::time::Duration::from_millis(500));
    assert_eq!(snap.clients, [ClientInfo { client: CLIENT, queued: 5, running: 4 }]);
    let events = h.core.events_since(1);
    let [e] = &events[..] else { panic!("{events:?}") };
    assert_eq!(e.seq, 1);
    assert!(
        matches!(&e.kind, EventKind::TaskRetried { job: JobId(1), index: 1, reason, .. } if reason.contains("signal 9"))
    );
}

#[test]
fn a_lost_agent_and_a_failed_task_are_events() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.submit(1, b"f", 1);
    let (_, task, attempt) = h.tasks_sent()[0];
    h.input(Input::AgentLeft {
        worker: WorkerId(7),
        end: SessionEnd::Silent(std::time::Duration::from_secs(10)),
    });
    h.join(8, 1);
    let (_, task2, attempt2) = h.tasks_sent()[0];
    assert_eq!((task2, attempt2), (task, attempt + 1));
    h.agent_says(
        8,
        FromAgent::TimedOut { task, attempt: attempt2, reason: "ran longer than 1s".into() },
        b"",
    );
    h.delivered();
    let events = h.core.events_since(0);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds, ["worker_joined", "worker_lost", "worker_joined", "task_failed"]);
    assert!(
        matches!(&events[1].kind, EventKind::WorkerLost { worker: WorkerId(7), tasks: 1, reason, .. } if reason.contains("no word"))
    );
}

#[test]
fn a_refused_connection_is_an_event_and_nothing_else() {
    let mut h = Harness::new();
    h.input(Input::Refused {
        peer: "10.0.0.9:4242".into(),
        reason: "authentication failed: keys differ".into(),
    });
    let events = h.core.events_since(0);
    assert!(matches!(
        &events[..],
        [e] if matches!(&e.kind, EventKind::ConnectionRefused { peer, reason }
            if peer == "10.0.0.9:4242" && reason.contains("keys differ"))
    ));
    assert!(h.sent().is_empty());
    assert!(h.delivered().is_empty());
}

#[test]
fn what_a_function_needs_goes_first_once_per_agent_and_leaves_after_it() {
    let mut h = Harness::new();
    h.join(7, 1);
    h.join(8, 1);
    let main_id = super::super::function_id(b"main").0;
    h.submit_needing(1, b"f", &[b"main"], 3);
    let sent = h.sent();
    // Each agent: the main module, the function naming it, then its tasks.
    for worker in [7, 8] {
        let mine: Vec<_> = sent.iter().filter(|(w, _)| *w == worker).map(|(_, m)| m.clone()).collect();
        assert!(
            matches!(&mine[..], [
                ToAgent::Function { fn_id: need, needs: none },
                ToAgent::Function { needs, .. },
                ToAgent::Task { .. },
                ..
            ] if *need == main_id && none.is_empty() && needs == &vec![main_id]),
            "{mine:?}"
        );
    }
    let mut forgotten = h.answer(sent);
    // A second function with the same need: the need is not sent again.
    h.submit_needing(2, b"g", &[b"main"], 1);
    let again = h.sent();
    assert!(
        matches!(&again[..], [(_, ToAgent::Function { needs, .. }), (_, ToAgent::Task { .. })] if needs == &vec![main_id]),
        "{again:?}"
    );
    forgotten.extend(h.answer(again));
    assert_eq!(h.delivered().len(), 4);
    // Idle functions are evicted oldest first; the need after those that need it.
    for job in 0..=IDLE_FUNCTIONS as u64 {
        h.submit(100 + job, Box::leak(format!("filler{job}").into_bytes().into_boxed_slice()), 1);
        let sent = h.sent();
        forgotten.extend(h.answer(sent));
    }
    h.delivered();
    let at = |id: u64| forgotten.iter().position(|f| *f == id);
    let main_at = at(main_id).expect("the need was evicted");
    assert!(at(super::super::function_id(b"f").0 ^ 1).is_some_and(|i| i < main_at), "{forgotten:?}");
    assert!(at(super::super::function_id(b"g").0 ^ 1).is_some_and(|i| i < main_at), "{forgotten:?}");
}

/// The core while a dashboard watches it.
#[path = "core_observe_tests.rs"]
mod observe;
