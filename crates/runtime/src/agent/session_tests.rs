//! The session without processes or sockets: a fake set of executors records
//! what they are sent, and time is whatever the test says it is. Each test
//! ends by checking that nothing it did not look at was sent.

use super::*;

#[derive(Default)]
struct Fake {
    sent: VecDeque<FromAgent>,
    /// `(slot, generation)` of every executor started.
    started: VecDeque<(usize, u64)>,
    /// Frames given to executors, as `(slot, "task 3" | "function 9" | "forget 9")`.
    exec: VecDeque<(usize, String)>,
    /// Starting an executor fails with this.
    broken: Option<String>,
    /// Fetches asked for, as `(function, from)`.
    fetches: VecDeque<(u64, String)>,
    /// Functions served to other agents.
    shelf: HashSet<u64>,
    /// Pieces of functions served as they come: `(function, bytes)`.
    pieces: Vec<(u64, usize)>,
}

impl AgentComm for Fake {
    fn send(&mut self, out: Outgoing<FromAgent>) {
        self.sent.push_back(out.msg);
    }
    fn start_executor(&mut self, slot: usize, generation: Generation) -> Result<u32, String> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.started.push_back((slot, generation.0));
        Ok(1000 + generation.0 as u32)
    }
    fn to_executor(&mut self, slot: usize, msg: ExecIn) {
        let what = match msg {
            ExecIn::Task { task, .. } => format!("task {task}"),
            ExecIn::Function { fn_id, needs, .. } if needs.is_empty() => format!("function {fn_id}"),
            ExecIn::Function { fn_id, needs, .. } => format!("function {fn_id} needs {needs:?}"),
            ExecIn::Forget { fn_id } => format!("forget {fn_id}"),
        };
        self.exec.push_back((slot, what));
    }
    fn fetch(&mut self, fn_id: FnId, _needs: Vec<FnId>, from: String) {
        self.fetches.push_back((fn_id.0, from));
    }
    fn shelve_piece(&mut self, fn_id: FnId, _total: usize, piece: Bytes) {
        self.pieces.push((fn_id.0, piece.len()));
    }
    fn shelve(&mut self, fn_id: FnId, bytes: Option<Bytes>) {
        match bytes {
            Some(_) => self.shelf.insert(fn_id.0),
            None => self.shelf.remove(&fn_id.0),
        };
    }
}

struct Harness {
    s: Session,
    comm: Fake,
    t0: Instant,
}

const FN: u64 = 9;

impl Harness {
    /// A session with `processes` executors, all ready, that holds function [`FN`].
    fn new(processes: usize) -> Self {
        let mut comm = Fake::default();
        let s = Session::start(processes, &mut comm).expect("starts");
        let mut h = Self { s, comm, t0: Instant::now() };
        assert_eq!(h.started(), (0..processes).map(|slot| (slot, slot as u64 + 1)).collect::<Vec<_>>());
        for slot in 0..processes {
            h.exec_event(ExecEvent::Ready { slot, generation: Generation(slot as u64 + 1) }, 0).unwrap();
        }
        h.message(ToAgent::Function { fn_id: FN, needs: Vec::new() }, 0).unwrap();
        h
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn message(&mut self, msg: ToAgent, ms: u64) -> Step {
        let now = self.at(ms);
        self.s.on_message(msg, Bytes::new(), now, &mut self.comm)
    }

    fn task(&mut self, task: u64, timeout_ms: u64, ms: u64) {
        self.message(ToAgent::Task { task, attempt: 1, fn_id: FN, timeout_ms }, ms).unwrap();
    }

    fn exec_event(&mut self, ev: ExecEvent, ms: u64) -> Step {
        let now = self.at(ms);
        self.s.on_executor(ev, now, &mut self.comm)
    }

    fn result(&mut self, slot: usize, generation: u64, task: u64, ms: u64) {
        self.exec_event(
            ExecEvent::Result {
                slot,
                generation: Generation(generation),
                task: TaskId(task),
                payload: Bytes::new().into(),
            },
            ms,
        )
        .unwrap();
    }

    fn timer(&mut self, ms: u64) -> Step {
        let now = self.at(ms);
        self.s.on_timer(now, &mut self.comm)
    }

    fn sent(&mut self) -> Vec<FromAgent> {
        self.comm.sent.drain(..).collect()
    }

    fn started(&mut self) -> Vec<(usize, u64)> {
        self.comm.started.drain(..).collect()
    }

    fn exec(&mut self) -> Vec<(usize, String)> {
        self.comm.exec.drain(..).collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(self.comm.sent.is_empty(), "frames not looked at: {:?}", self.comm.sent);
            assert!(self.comm.started.is_empty(), "starts not looked at: {:?}", self.comm.started);
            assert!(self.comm.exec.is_empty(), "executor frames not looked at: {:?}", self.comm.exec);
            assert!(self.comm.fetches.is_empty(), "fetches not looked at: {:?}", self.comm.fetches);
        }
    }
}

fn s(slot: usize, what: &str) -> (usize, String) {
    (slot, what.to_string())
}

#[test]
fn tasks_go_one_to_each_executor_then_a_second_each() {
    let mut h = Harness::new(2);
    for t in 1..=5 {
        h.task(t, 0, 0);
    }
    assert_eq!(
        h.exec(),
        [
            s(0, "function 9"),
            s(0, "task 1"),
            s(1, "function 9"),
            s(1, "task 2"),
            s(0, "task 3"),
            s(1, "task 4")
        ]
    );
    assert_eq!(h.s.held(), 5, "the fifth waits in the agent");
    h.result(0, 1, 1, 50);
    assert_eq!(h.sent(), [FromAgent::Result { task: 1, attempt: 1, micros: 50000 }]);
    assert_eq!(h.exec(), [s(0, "task 5")]);
}

#[test]
fn a_crash_reports_the_running_task_and_requeues_the_prefetched_one() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    assert_eq!(h.exec().len(), 3);
    let reason = "executor (pid 1001) was killed by signal 9 (SIGKILL)".to_string();
    h.exec_event(ExecEvent::Exited { slot: 0, generation: Generation(1), reason: reason.clone() }, 10)
        .unwrap();
    assert_eq!(h.sent(), [FromAgent::Crashed { task: 1, attempt: 1, reason }]);
    assert_eq!(h.started(), [(0, 2)]);
    // The new executor gets the function again and the task that never ran.
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 2")]);
    // A late event of the dead executor is ignored.
    h.result(0, 1, 2, 11);
    assert!(h.sent().is_empty());
    assert_eq!(h.s.held(), 1);
}

#[test]
fn executors_that_never_start_end_the_session_for_good() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    assert_eq!(h.exec().len(), 2);
    // The first executor was ready; it dies running task 1 (a crash), and
    // then every replacement dies before it is ready.
    h.exec_event(ExecEvent::Exited { slot: 0, generation: Generation(1), reason: "exit 1".into() }, 1)
        .unwrap();
    assert!(matches!(h.sent()[..], [FromAgent::Crashed { task: 1, .. }]));
    h.task(2, 0, 2);
    let mut end = None;
    for generation in 2..=MAX_START_FAILURES as u64 + 1 {
        assert_eq!(h.started(), [(0, generation)]);
        assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 2")]);
        let exited = ExecEvent::Exited {
            slot: 0,
            generation: Generation(generation),
            reason: "No module named distripool".into(),
        };
        if let Err(e) = h.exec_event(exited, 3) {
            end = Some(e);
            break;
        }
    }
    let end = end.expect("the session gives up");
    assert!(end.is_fatal(), "{end}");
    assert!(end.to_string().contains("No module named distripool"), "{end}");
    assert!(h.sent().is_empty(), "a task whose executor never started did not crash");
}

#[test]
fn an_executor_that_cannot_be_spawned_ends_the_session_for_good() {
    let mut comm = Fake { broken: Some("no such file: python9".into()), ..Default::default() };
    let Err(end) = Session::start(2, &mut comm) else { panic!("started") };
    assert!(end.is_fatal());
    assert!(end.to_string().contains("python9"));
}

#[test]
fn a_task_past_its_time_limit_is_killed_and_reported_once() {
    let mut h = Harness::new(1);
    h.task(1, 100, 0);
    h.task(2, 0, 0);
    assert_eq!(h.exec().len(), 3);
    assert_eq!(h.s.next_deadline(), Some(h.at(100)));
    // Woken early: nothing is due.
    h.timer(60).unwrap();
    assert!(h.sent().is_empty());
    h.timer(100).unwrap();
    let sent = h.sent();
    let [FromAgent::TimedOut { task: 1, attempt: 1, reason }] = &sent[..] else { panic!("{sent:?}") };
    assert!(reason.contains("100ms") && reason.contains("pid 1001"), "{reason}");
    assert_eq!(h.started(), [(0, 2)]);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 2")]);
    assert_eq!(h.s.next_deadline(), None, "task 2 has no limit");
}

#[test]
fn the_time_limit_counts_from_when_the_task_starts_not_when_it_arrives() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 100, 0);
    h.exec();
    assert_eq!(h.s.next_deadline(), None, "task 2 waits behind task 1");
    h.result(0, 1, 1, 500);
    assert_eq!(h.sent(), [FromAgent::Result { task: 1, attempt: 1, micros: 500000 }]);
    assert_eq!(h.s.next_deadline(), Some(h.at(600)));
}

#[test]
fn short_tasks_deepen_the_queue_and_a_long_one_shallows_it_at_once() {
    let mut h = Harness::new(1);
    for t in 1..=40 {
        h.task(t, 0, 0);
    }
    h.exec();
    // Tasks of 0 ms each: the slot may hold DEEP.
    h.result(0, 1, 1, 0);
    let sent = h.sent();
    assert_eq!(sent[0], FromAgent::Result { task: 1, attempt: 1, micros: 0 });
    assert_eq!(sent[1], FromAgent::Capacity { tasks: DEEP as u32 });
    assert_eq!(h.exec().len(), DEEP - 1, "topped up to DEEP");
    // Task 2 runs long: at the budget the slot goes back to DEPTH.
    assert_eq!(h.s.next_deadline(), Some(h.at(0) + QUEUE_BUDGET));
    h.timer(5).unwrap();
    assert_eq!(h.sent(), [FromAgent::Capacity { tasks: DEPTH as u32 }]);
}

#[test]
fn a_cancelled_running_task_stops_its_executor_and_reports_nothing() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    h.task(3, 0, 0);
    h.exec();
    h.message(ToAgent::Cancel { tasks: vec![1, 3] }, 1).unwrap();
    assert_eq!(h.started(), [(0, 2)]);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 2")]);
    assert_eq!(h.s.held(), 1);
    h.exec_event(ExecEvent::Exited { slot: 0, generation: Generation(1), reason: "killed".into() }, 2)
        .unwrap();
    assert!(h.sent().is_empty());
}

#[test]
fn a_forgotten_function_leaves_every_executor_that_has_it() {
    let mut h = Harness::new(2);
    h.task(1, 0, 0);
    h.exec();
    h.message(ToAgent::Forget { fn_id: FN }, 1).unwrap();
    assert_eq!(h.exec(), [s(0, "forget 9")]);
    // A task that needs it now is a protocol error, not a hang.
    let end = h.message(ToAgent::Task { task: 2, attempt: 1, fn_id: FN, timeout_ms: 0 }, 2).unwrap_err();
    assert!(matches!(end, SessionEnd::Protocol(_)), "{end}");
}

#[test]
fn pings_are_answered_and_a_second_limits_is_refused() {
    let mut h = Harness::new(1);
    h.message(ToAgent::Ping { seq: 4 }, 0).unwrap();
    assert_eq!(h.sent(), [FromAgent::Pong { seq: 4 }]);
    let end = h
        .message(ToAgent::Limits { max_frame: 1, heartbeat_ms: 1000, silence_ms: 10000, usage_ms: 0 }, 0)
        .unwrap_err();
    assert!(matches!(end, SessionEnd::Protocol(_)));
}

#[test]
fn a_retiring_executor_is_replaced_without_a_crash() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    h.exec();
    h.exec_event(ExecEvent::Retiring { slot: 0, generation: Generation(1) }, 1).unwrap();
    h.result(0, 1, 1, 2);
    assert_eq!(h.sent(), [FromAgent::Result { task: 1, attempt: 1, micros: 2000 }]);
    h.task(3, 0, 3);
    assert!(h.exec().is_empty(), "a retiring executor gets nothing new");
    h.exec_event(ExecEvent::Exited { slot: 0, generation: Generation(1), reason: "exit 0".into() }, 4)
        .unwrap();
    assert_eq!(h.started(), [(0, 2)]);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 2"), s(0, "task 3")]);
    assert!(h.sent().is_empty());
}

#[test]
fn a_drained_session_finishes_what_it_holds_then_says_goodbye() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    h.task(3, 0, 0);
    h.exec();
    h.message(ToAgent::Drain, 1).unwrap();
    h.result(0, 1, 1, 2);
    h.result(0, 1, 2, 3);
    assert_eq!(h.exec(), [s(0, "task 3")]);
    let end = h
        .exec_event(
            ExecEvent::Result {
                slot: 0,
                generation: Generation(1),
                task: TaskId(3),
                payload: Bytes::new().into(),
            },
            4,
        )
        .unwrap_err();
    assert_eq!(end, SessionEnd::Drained);
    assert!(!end.is_fatal());
    let sent = h.sent();
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[3], FromAgent::Goodbye { reason: "drained".into() });
}

#[test]
fn an_idle_session_says_goodbye_as_soon_as_it_is_drained() {
    let mut h = Harness::new(2);
    assert_eq!(h.message(ToAgent::Drain, 0).unwrap_err(), SessionEnd::Drained);
    assert_eq!(h.sent(), [FromAgent::Goodbye { reason: "drained".into() }]);
}

#[test]
fn what_a_function_needs_reaches_each_executor_once_before_it() {
    let mut h = Harness::new(2);
    h.message(ToAgent::Function { fn_id: 50, needs: Vec::new() }, 0).unwrap();
    h.message(ToAgent::Function { fn_id: 51, needs: vec![50] }, 0).unwrap();
    h.message(ToAgent::Function { fn_id: 52, needs: vec![50] }, 0).unwrap();
    for (task, fn_id) in [(1, 51), (2, 51), (3, 52)] {
        h.message(ToAgent::Task { task, attempt: 1, fn_id, timeout_ms: 0 }, 0).unwrap();
    }
    assert_eq!(
        h.exec(),
        [
            s(0, "function 50"),
            s(0, "function 51 needs [FnId(50)]"),
            s(0, "task 1"),
            s(1, "function 50"),
            s(1, "function 51 needs [FnId(50)]"),
            s(1, "task 2"),
            s(0, "function 52 needs [FnId(50)]"),
            s(0, "task 3"),
        ]
    );
    // A replaced executor holds nothing: it gets the need again.
    h.exec_event(ExecEvent::Exited { slot: 1, generation: Generation(2), reason: "killed".into() }, 1)
        .unwrap();
    assert_eq!(h.started(), [(1, 3)]);
    let crashed = h.sent();
    assert!(matches!(crashed[..], [FromAgent::Crashed { task: 2, .. }]), "{crashed:?}");
    h.message(ToAgent::Task { task: 4, attempt: 1, fn_id: 52, timeout_ms: 0 }, 2).unwrap();
    assert_eq!(h.exec(), [s(1, "function 50"), s(1, "function 52 needs [FnId(50)]"), s(1, "task 4")]);
}

#[test]
fn leaving_finishes_what_is_held_then_says_goodbye() {
    let mut h = Harness::new(1);
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 1"), s(0, "task 2")]);
    let now = h.at(10);
    h.s.leave("SIGTERM".into(), SessionEnd::Drained, now, &mut h.comm).unwrap();
    assert_eq!(h.sent(), [FromAgent::Capacity { tasks: 0 }], "no new task, please");
    // A task the orchestrator sent before it heard that still runs.
    h.task(3, 0, 11);
    h.result(0, 1, 1, 20);
    h.result(0, 1, 2, 30);
    assert_eq!(h.exec(), [s(0, "task 3")]);
    assert_eq!(
        h.sent(),
        [
            FromAgent::Result { task: 1, attempt: 1, micros: 20000 },
            FromAgent::Result { task: 2, attempt: 1, micros: 10000 }
        ]
    );
    let end = h.exec_event(
        ExecEvent::Result {
            slot: 0,
            generation: Generation(1),
            task: TaskId(3),
            payload: Bytes::new().into(),
        },
        40,
    );
    assert_eq!(end, Err(SessionEnd::Drained));
    assert_eq!(
        h.sent(),
        [
            FromAgent::Result { task: 3, attempt: 1, micros: 10000 },
            FromAgent::Goodbye { reason: "SIGTERM".into() }
        ]
    );
}

#[test]
fn an_idle_session_leaves_after_its_idle_limit_and_work_resets_it() {
    let mut h = Harness::new(1);
    let limit = Duration::from_secs(60);
    h.s.set_idle_limit(Some(limit), h.at(0));
    assert_eq!(h.s.next_deadline(), Some(h.at(60_000)));
    h.task(1, 0, 30_000);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 1")]);
    assert_eq!(h.s.next_deadline(), None, "busy: no idle deadline");
    h.result(0, 1, 1, 50_000);
    assert_eq!(h.sent(), [FromAgent::Result { task: 1, attempt: 1, micros: 20000000 }]);
    assert_eq!(h.s.next_deadline(), Some(h.at(110_000)), "idle again since the result");
    h.timer(109_999).unwrap();
    assert_eq!(h.timer(110_000), Err(SessionEnd::Idle(limit)));
    assert_eq!(
        h.sent(),
        [FromAgent::Capacity { tasks: 0 }, FromAgent::Goodbye { reason: "idle for 60 s".into() }]
    );
}

#[test]
fn near_its_time_limit_a_session_takes_no_task_that_would_not_finish_and_leaves() {
    let mut h = Harness::new(1);
    h.s.set_time_limit(Some(h.at(100_000)));
    assert_eq!(h.s.next_deadline(), Some(h.at(100_000)), "no task seen yet: the limit itself");
    h.task(1, 0, 0);
    h.task(2, 0, 0);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 1"), s(0, "task 2")]);
    // Tasks of 10 s: two held per executor must start by 80 s.
    h.result(0, 1, 1, 10_000);
    assert_eq!(h.sent(), [FromAgent::Result { task: 1, attempt: 1, micros: 10000000 }]);
    assert_eq!(h.s.next_deadline(), Some(h.at(80_000)));
    h.task(3, 0, 10_000);
    assert_eq!(h.exec(), [s(0, "task 3")]);
    h.timer(79_999).unwrap();
    assert_eq!(h.sent(), []);
    h.timer(80_000).unwrap();
    assert_eq!(h.sent(), [FromAgent::Capacity { tasks: 0 }], "no new task, please");
    // What it holds still finishes, then it leaves, nothing lost.
    h.result(0, 1, 2, 85_000);
    let end = h.exec_event(
        ExecEvent::Result {
            slot: 0,
            generation: Generation(1),
            task: TaskId(3),
            payload: Bytes::new().into(),
        },
        95_000,
    );
    assert_eq!(end, Err(SessionEnd::TimeLimit));
    assert_eq!(
        h.sent(),
        [
            FromAgent::Result { task: 2, attempt: 1, micros: 75000000 },
            FromAgent::Result { task: 3, attempt: 1, micros: 10000000 },
            FromAgent::Goodbye { reason: "its time limit is near".into() }
        ]
    );
}

#[test]
fn at_its_time_limit_a_session_leaves_with_what_it_still_holds() {
    let mut h = Harness::new(1);
    h.s.set_time_limit(Some(h.at(5_000)));
    h.task(1, 0, 0);
    assert_eq!(h.exec(), [s(0, "function 9"), s(0, "task 1")]);
    assert_eq!(h.s.next_deadline(), Some(h.at(5_000)));
    h.timer(4_999).unwrap();
    // The task runs on at the limit: the goodbye hands it back.
    assert_eq!(h.timer(5_000), Err(SessionEnd::TimeLimit));
    assert_eq!(h.sent(), [FromAgent::Goodbye { reason: "its time limit came with tasks held".into() }]);
}

#[test]
fn tasks_of_a_function_another_agent_sends_wait_for_it_and_it_is_served_in_turn() {
    let mut h = Harness::new(1);
    let (big, other) = (21, 22);
    let from = "10.0.0.2:4000".to_string();
    h.message(ToAgent::Fetch { fn_id: big, needs: Vec::new(), from: Some(from.clone()) }, 0).unwrap();
    h.message(ToAgent::Task { task: 1, attempt: 1, fn_id: big, timeout_ms: 0 }, 0).unwrap();
    h.message(ToAgent::Task { task: 2, attempt: 1, fn_id: big, timeout_ms: 0 }, 0).unwrap();
    // Tasks of functions it holds pass the waiting ones.
    h.task(3, 0, 0);
    assert_eq!(h.comm.fetches.drain(..).collect::<Vec<_>>(), vec![(big, from)]);
    assert_eq!(h.exec(), vec![(0, "function 9".into()), (0, "task 3".into())]);
    assert_eq!(h.s.held(), 3);
    // Cancelled while it waits: never run.
    h.message(ToAgent::Cancel { tasks: vec![2] }, 1).unwrap();
    let blob = Bytes::from(vec![7u8; SPREAD_AT_LEAST]);
    h.s.on_fetched(FnId(big), Ok(blob), h.at(2), &mut h.comm).unwrap();
    assert_eq!(h.sent(), vec![FromAgent::Holds { fn_id: big }]);
    assert!(h.comm.shelf.contains(&big));
    h.result(0, 1, 3, 3);
    assert_eq!(h.exec(), vec![(0, format!("function {big}")), (0, "task 1".into())]);
    assert!(matches!(h.sent()[..], [FromAgent::Result { task: 3, .. }, ..]));

    // A fetch that fails is said so; the orchestrator then sends it itself.
    h.message(ToAgent::Fetch { fn_id: other, needs: Vec::new(), from: None }, 4).unwrap();
    h.message(ToAgent::Task { task: 4, attempt: 1, fn_id: other, timeout_ms: 0 }, 4).unwrap();
    assert!(h.comm.fetches.is_empty(), "no agent named yet");
    h.message(ToAgent::Fetch { fn_id: other, needs: Vec::new(), from: Some("10.0.0.3:1".into()) }, 5)
        .unwrap();
    assert_eq!(h.comm.fetches.len(), 1);
    h.comm.fetches.clear();
    h.s.on_fetched(FnId(other), Err("refused".into()), h.at(6), &mut h.comm).unwrap();
    assert_eq!(h.sent(), vec![FromAgent::NotFetched { fn_id: other, reason: "refused".into() }]);
    h.result(0, 1, 1, 7);
    assert!(matches!(h.sent()[..], [FromAgent::Result { task: 1, .. }, ..]));
    assert!(h.exec().is_empty(), "task 4 still waits");
    h.message(ToAgent::Function { fn_id: other, needs: Vec::new() }, 8).unwrap();
    assert_eq!(h.exec(), vec![(0, format!("function {other}")), (0, "task 4".into())]);
    // A late answer to a fetch of something it holds changes nothing.
    h.s.on_fetched(FnId(other), Ok(Bytes::new()), h.at(9), &mut h.comm).unwrap();
    h.message(ToAgent::Forget { fn_id: big }, 10).unwrap();
    assert!(!h.comm.shelf.contains(&big), "what it forgets it serves no more");
    assert_eq!(h.exec(), vec![(0, format!("forget {big}"))]);
}

#[test]
fn a_function_sent_in_pieces_is_served_as_they_come_and_runs_once_whole() {
    let mut h = Harness::new(1);
    let (big, total) = (31, 10);
    let piece = |h: &mut Harness, bytes: &'static [u8], ms| {
        let msg = ToAgent::Piece { fn_id: big, needs: Vec::new(), total };
        h.s.on_message(msg, Bytes::from_static(bytes), h.at(ms), &mut h.comm)
    };
    piece(&mut h, b"0123", 0).unwrap();
    h.message(ToAgent::Task { task: 1, attempt: 1, fn_id: big, timeout_ms: 0 }, 0).unwrap();
    assert!(h.exec().is_empty(), "the task waits for the rest");
    piece(&mut h, b"4567", 1).unwrap();
    assert!(!h.comm.shelf.contains(&big));
    piece(&mut h, b"89", 2).unwrap();
    assert_eq!(h.comm.pieces, vec![(big, 4), (big, 4), (big, 2)]);
    assert!(h.comm.shelf.contains(&big), "served whole once whole");
    assert_eq!(h.exec(), vec![(0, format!("function {big}")), (0, "task 1".into())]);
    // More than it said (sent again, after a `Forget`): the orchestrator
    // is broken, the session ends.
    h.message(ToAgent::Forget { fn_id: big }, 3).unwrap();
    assert_eq!(h.exec(), vec![(0, format!("forget {big}"))]);
    piece(&mut h, b"0123", 3).unwrap();
    let end = piece(&mut h, b"4567890", 4).unwrap_err();
    assert!(matches!(end, SessionEnd::Protocol(ref why) if why.contains("more than its 10 bytes")), "{end}");
}
