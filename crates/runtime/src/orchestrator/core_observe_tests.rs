//! The core's observer: described jobs, task times, usage reports, and the
//! counters `/metrics` reads.

use super::*;

#[test]
fn a_watched_core_counts_each_described_job_and_the_metrics_need_no_task_walk() {
    let mut h = Harness::new();
    h.join(7, 2);
    h.input(Input::Describe {
        client: CLIENT,
        job: JobId(1),
        kind: "map".into(),
        name: "square".into(),
        items: Some(40),
    });
    h.submit(1, b"f", 4);
    let sent = h.tasks_sent();
    assert_eq!(sent.len(), 4, "two executors, two tasks each");
    let m = h.core.metrics();
    assert_eq!((m.executors_busy, m.executors_idle, m.tasks_queued, m.tasks_running), (2, 0, 0, 4));
    // One returns, one crashes once (and is retried), one raises.
    h.agent_says(7, FromAgent::Result { task: sent[0].1, attempt: 1, micros: 1500 }, b"r");
    h.agent_says(7, FromAgent::Crashed { task: sent[1].1, attempt: 1, reason: "signal 9".into() }, b"");
    h.agent_says(7, FromAgent::Result { task: sent[2].1, attempt: 1, micros: 80 }, b"e");
    h.input(Input::Raised { client: CLIENT, job: JobId(1), index: 2, text: "ValueError: 2".into() });
    h.agent_says(7, FromAgent::Usage { executors: 2, cpu_milli: 1500, memory: 3 << 20 }, b"");
    assert_eq!(h.delivered().len(), 2);
    let retry = h.tasks_sent();
    assert_eq!(retry, [(7, sent[1].1, 2)]);

    let jobs = h.core.jobs(h.now());
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!((j.kind.as_str(), j.name.as_str(), j.items), ("map", "square", Some(40)));
    assert_eq!((j.tasks, j.done, j.failed, j.retried, j.pending), (4, 1, 1, 1, 2));
    assert_eq!(j.errors, [TaskError { index: 2, text: "ValueError: 2".into() }]);
    let s = &h.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    assert_eq!((load(&s.tasks_submitted), load(&s.tasks_retried), load(&s.tasks_raised)), (4, 1, 1));
    let m = h.core.metrics();
    assert_eq!(m.durations.count, 2);
    assert!((m.durations.sum - 0.00158).abs() < 1e-9, "{}", m.durations.sum);
    let usage = h.core.snapshot(h.now()).workers[0].usage.expect("reported");
    assert_eq!((usage.executors, usage.cpu, usage.memory), (2, 1.5, 3 << 20));

    // The rest finish; the job is done, with its time.
    h.agent_says(7, FromAgent::Result { task: sent[3].1, attempt: 1, micros: 10 }, b"r");
    h.agent_says(7, FromAgent::Result { task: sent[1].1, attempt: 2, micros: 10 }, b"r");
    assert_eq!(h.delivered().len(), 2);
    let j = &h.core.jobs(h.now())[0];
    assert_eq!((j.done, j.failed, j.pending), (3, 1, 0));
    assert!(j.elapsed.is_some());
}

#[test]
fn an_unwatched_core_keeps_no_jobs_and_no_times_but_counts() {
    let stats = Arc::new(Stats::default());
    let mut core = Core::new(3, stats.clone(), Instant::now(), false);
    let now = Instant::now();
    core.handle(Input::ClientOpened { client: CLIENT }, now);
    core.handle(
        Input::Describe { client: CLIENT, job: JobId(1), kind: "map".into(), name: "f".into(), items: None },
        now,
    );
    core.handle(
        Input::Submit {
            client: CLIENT,
            job: JobId(1),
            fn_id: FnId(1),
            function: Bytes::from_static(b"f"),
            needs: Vec::new(),
            tasks: vec![(0, Bytes::new().into())],
            timeout_ms: 0,
        },
        now,
    );
    assert!(core.jobs(now).is_empty());
    assert_eq!(core.metrics().durations.count, 0);
    assert_eq!(core.metrics().tasks_queued, 1);
    assert_eq!(stats.tasks_submitted.load(Ordering::Relaxed), 1);
}
