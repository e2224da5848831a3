//! The runtime over real loopback sockets, with a stand-in executor: a tiny
//! Python program that echoes each task's payload back, or exits when the
//! payload is `die`. No distripool Python package is needed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use distripool_runtime::executor::{ExecutorSpec, Share};
use distripool_runtime::{run_agent, AgentConfig, Orchestrator, OrchestratorConfig, Outcome, Security};

const ECHO_EXECUTOR: &str = r#"
import os, socket, struct
H = struct.Struct("<IBQQ")
s = socket.socket(fileno=int(os.environ["DISTRIPOOL_EXECUTOR_FD"]))
s.sendall(H.pack(17, 6, os.getpid(), 0))
f = s.makefile("rb")
while True:
    h = f.read(H.size)
    if len(h) < H.size:
        break
    n, kind, a, b = H.unpack(h)
    p = f.read(n - 17)
    if kind == 2:
        if p == b"die":
            os._exit(7)
        s.sendall(H.pack(17 + len(p), 4, a, 0) + p)
"#;

fn echo_spec(dir: &std::path::Path) -> ExecutorSpec {
    std::fs::write(dir.join("echo_executor.py"), ECHO_EXECUTOR).unwrap();
    ExecutorSpec {
        python: "python3".into(),
        module: "echo_executor".into(),
        env: vec![("PYTHONPATH".into(), dir.display().to_string())],
        max_frame: distripool_runtime::DEFAULT_MAX_FRAME,
        memory: None,
        share: Share::Nothing,
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct AgentThread {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentThread {
    fn start(addr: String, security: Security, processes: usize, spec: ExecutorSpec) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let config = AgentConfig {
            connect: vec![addr],
            security,
            processes,
            executor: spec,
            timing: Default::default(),
            labels: Vec::new(),
            idle_timeout: None,
            time_limit: None,
            ready_file: None,
            leave: None,
            serve_peers: true,
        };
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(run_agent(config, rx)).unwrap();
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for AgentThread {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn collect(client: &distripool_runtime::Client, n: usize) -> Vec<distripool_runtime::Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} completions arrived", out.len());
        out.extend(client.recv(Duration::from_millis(100)).unwrap());
    }
    out
}

#[test]
fn tasks_round_trip_through_an_agent_exactly_once() {
    let dir = tempdir();
    let key = b"loopback key".to_vec();
    let orch = Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security: Security { key: key.clone(), ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    let addr = orch.local_addrs()[0].to_string();
    let _agent = AgentThread::start(addr, keyed(&key), 2, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);

    let client = orch.open_client().unwrap();
    let job = client.new_job();
    let tasks = (0..1000u32).map(|i| (i, i.to_le_bytes().to_vec().into())).collect();
    client.submit(job, b"function".to_vec().into(), Vec::new(), tasks, None).unwrap();
    let mut seen = vec![false; 1000];
    for c in collect(&client, 1000) {
        assert_eq!(c.job, job);
        let Outcome::Done(bytes) = c.outcome else { panic!("task {} failed", c.index) };
        assert_eq!(&bytes[..], &c.index.to_le_bytes());
        assert!(!std::mem::replace(&mut seen[c.index as usize], true), "duplicate {}", c.index);
    }
    assert!(client.recv(Duration::from_millis(50)).unwrap().is_empty());
    assert_eq!(orch.stats().tasks_done.load(Ordering::Relaxed), 1000);
}

#[test]
fn a_task_that_kills_its_executor_fails_after_the_crash_limit() {
    let dir = tempdir();
    let orch = Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        max_crashes: 3,
        ..Default::default()
    })
    .unwrap();
    let _agent = AgentThread::start(orch.local_addrs()[0].to_string(), keyed(b""), 1, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);
    let client = orch.open_client().unwrap();
    let job = client.new_job();
    client
        .submit(
            job,
            b"f".to_vec().into(),
            Vec::new(),
            vec![(0, b"die".to_vec().into()), (1, b"fine".to_vec().into())],
            None,
        )
        .unwrap();
    let mut done = collect(&client, 2);
    done.sort_by_key(|c| c.index);
    match &done[0].outcome {
        Outcome::Failed { reason, .. } => {
            assert!(reason.contains("after 3 attempts"), "{reason}");
            assert!(reason.contains("exited with code 7"), "{reason}");
        }
        other => panic!("poison task should fail, got {other:?}"),
    }
    assert!(matches!(&done[1].outcome, Outcome::Done(b) if &b[..] == b"fine"));
    assert_eq!(orch.stats().crashes.load(Ordering::Relaxed), 3);
}

#[test]
fn an_agent_with_the_wrong_key_is_refused() {
    let dir = tempdir();
    let orch = Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security: Security { key: b"right".to_vec(), ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    let _agent = AgentThread::start(orch.local_addrs()[0].to_string(), keyed(b"wrong"), 1, echo_spec(&dir));
    wait_for("the refusal", || orch.stats().auth_failures.load(Ordering::Relaxed) >= 1);
    assert_eq!(orch.stats().workers.load(Ordering::Relaxed), 0);
}

#[test]
fn listening_beyond_loopback_needs_a_key() {
    let err =
        Orchestrator::start(OrchestratorConfig { listen: vec!["0.0.0.0:0".into()], ..Default::default() })
            .err()
            .expect("must be refused");
    assert!(err.to_string().contains("DISTRIPOOL_AUTHKEY"), "{err}");
}

fn keyed(key: &[u8]) -> Security {
    Security { key: key.to_vec(), ..Default::default() }
}

fn orchestrator(security: Security) -> Orchestrator {
    Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security,
        ..Default::default()
    })
    .unwrap()
}

/// Run `n` echo tasks of `size` bytes each and check every result.
fn echo_round_trip(orch: &Orchestrator, n: u32, size: usize) {
    let client = orch.open_client().unwrap();
    let job = client.new_job();
    let payload = |i: u32| -> Vec<u8> {
        (0..size).map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8).collect()
    };
    let tasks = (0..n).map(|i| (i, payload(i).into())).collect();
    client.submit(job, b"f".to_vec().into(), Vec::new(), tasks, None).unwrap();
    for c in collect(&client, n as usize) {
        let Outcome::Done(bytes) = c.outcome else { panic!("task {} failed", c.index) };
        assert!(bytes[..] == payload(c.index)[..], "task {} came back altered", c.index);
    }
}

#[test]
fn large_payloads_stream_through_sealed_records_intact() {
    // Payloads of 1 MiB + 7 cross many 64 KiB records and end mid-record.
    let dir = tempdir();
    let orch = orchestrator(keyed(b"k"));
    let _agent = AgentThread::start(orch.local_addrs()[0].to_string(), keyed(b"k"), 2, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);
    echo_round_trip(&orch, 24, (1 << 20) + 7);
    echo_round_trip(&orch, 500, 3);
}

#[test]
fn encryption_off_works_only_when_both_sides_say_so() {
    let dir = tempdir();
    let clear = Security { key: b"k".to_vec(), encrypt: false, ..Default::default() };
    let orch = orchestrator(clear.clone());
    let addr = orch.local_addrs()[0].to_string();
    {
        let _sealed_agent = AgentThread::start(addr.clone(), keyed(b"k"), 1, echo_spec(&dir));
        wait_for("the refusal", || orch.stats().handshake_failures.load(Ordering::Relaxed) >= 1);
        assert_eq!(orch.stats().workers.load(Ordering::Relaxed), 0);
    }
    let _agent = AgentThread::start(addr, clear, 1, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);
    echo_round_trip(&orch, 50, 100_000);
}

#[test]
fn an_agent_of_another_cluster_is_refused() {
    let dir = tempdir();
    let orch = orchestrator(Security { key: b"k".to_vec(), cluster: "blue".into(), ..Default::default() });
    let green = Security { key: b"k".to_vec(), cluster: "green".into(), ..Default::default() };
    let _agent = AgentThread::start(orch.local_addrs()[0].to_string(), green, 1, echo_spec(&dir));
    wait_for("the refusal", || orch.stats().handshake_failures.load(Ordering::Relaxed) >= 1);
    assert_eq!(orch.stats().workers.load(Ordering::Relaxed), 0);
    assert_eq!(orch.stats().auth_failures.load(Ordering::Relaxed), 0, "refused before any key was used");
}

/// A directory of the test's own, removed when it ends (declared before
/// the agent whose executors read from it, so dropped after it).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir()
        .join(format!("distripool-rt-{}", u64::from_le_bytes(distripool_runtime::random_bytes())));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

#[test]
fn withdrawn_tasks_and_completions_account_for_every_task_once() {
    let dir = tempdir();
    let key = b"withdraw key".to_vec();
    let orch = orchestrator(keyed(&key));
    let client = orch.open_client().unwrap();

    // No worker yet: every task is withdrawn, in index order, and only once.
    let job = client.new_job();
    let tasks = (0..10u32).rev().map(|i| (i, vec![1u8].into())).collect();
    client.submit(job, b"f".to_vec().into(), Vec::new(), tasks, None).unwrap();
    assert_eq!(client.withdraw(job).unwrap(), (0..10).collect::<Vec<u32>>());
    assert!(client.withdraw(job).unwrap().is_empty());

    // With a worker busy on them, some complete and the rest are withdrawn:
    // together they are every task exactly once, and nothing else arrives.
    let addr = orch.local_addrs()[0].to_string();
    let _agent = AgentThread::start(addr, keyed(&key), 1, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);
    let n = 5000u32;
    let job = client.new_job();
    let tasks = (0..n).map(|i| (i, i.to_le_bytes().to_vec().into())).collect();
    client.submit(job, b"f".to_vec().into(), Vec::new(), tasks, None).unwrap();
    let mut seen = vec![false; n as usize];
    let first = collect(&client, 1);
    let withdrawn = client.withdraw(job).unwrap();
    assert!(!withdrawn.is_empty(), "the agent took all {n} tasks at once");
    assert!(withdrawn.windows(2).all(|w| w[0] < w[1]), "sorted, each once: {withdrawn:?}");
    for i in &withdrawn {
        seen[*i as usize] = true;
    }
    let rest = collect(&client, n as usize - withdrawn.len() - first.len());
    for c in first.into_iter().chain(rest) {
        assert_eq!(c.job, job);
        assert!(!std::mem::replace(&mut seen[c.index as usize], true), "task {} twice", c.index);
    }
    // Every index seen once: the withdrawn ones never completed, nothing more comes.
    assert!(client.recv(Duration::from_millis(100)).unwrap().is_empty());
}

#[test]
fn an_idle_agent_is_heard_from_through_its_heartbeats() {
    // Heartbeats stop at the agent's session (the core never sees them), yet
    // they keep its `last_heard` fresh; the orchestrator's own pings keep
    // the agent's side of the link from falling silent.
    let dir = tempdir();
    let timing = distripool_runtime::Timing {
        heartbeat: Duration::from_millis(100),
        silence: Duration::from_millis(1000),
        ..Default::default()
    };
    let orch = Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        timing,
        ..Default::default()
    })
    .unwrap();
    let addr = orch.local_addrs()[0].to_string();
    let _agent = AgentThread::start(addr, Security::default(), 1, echo_spec(&dir));
    wait_for("the agent", || orch.stats().workers.load(Ordering::Relaxed) == 1);
    // Several silence limits pass with nothing to do.
    let worker = || orch.snapshot().unwrap().workers.remove(0);
    wait_for("three silence limits", || worker().connected_for >= 3 * timing.silence);
    let w = worker();
    assert!(w.last_heard < timing.silence / 2, "last heard {:?} ago", w.last_heard);
    assert_eq!(orch.stats().workers.load(Ordering::Relaxed), 1);
    assert_eq!(orch.stats().workers_lost.load(Ordering::Relaxed), 0, "no session ended");
}
