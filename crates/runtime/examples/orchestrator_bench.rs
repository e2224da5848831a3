//! The orchestrator alone: how many tasks per second it dispatches and
//! completes when executors answer at once, and what connected agents cost it.
//!
//! The orchestrator (listener, core task, one client) runs in this process.
//! Stand-in agents run in a child process (this program again, with
//! `--agents`): each connects over loopback TCP, authenticates and seals like
//! a real agent, and answers every task with an empty result as soon as it
//! reads it. So the figures cover the whole orchestrator path — scheduling,
//! framing, sealing, the sockets — and none of Python's.
//!
//! ```text
//! cargo run --release -p distripool-runtime --example orchestrator_bench [AGENTS ...]
//! ```
//!
//! With agent counts given, only those throughput runs are made.
//!
//! 1. Throughput: one million tasks, with 1 to 256 connected agents sharing
//!    256 slots (so the work in flight stays the same), in tasks/s and
//!    µs per task. Each agent asks for the queue depth a real agent asks for
//!    when its tasks are short. Then the same with every agent the same
//!    size (8 slots each, a typical worker machine), so that the work in
//!    flight grows with the agents.
//! 2. Idle agents: the orchestrator's resident memory before and after 1 000
//!    agents connect and sit idle (heartbeats only).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_protocol::{FromAgent, ToAgent, DEFAULT_MAX_FRAME};
use distripool_runtime::conn::{client_handshake, FrameReader, FrameWriter};
use distripool_runtime::{Orchestrator, OrchestratorConfig, Outcome, Security, Timing};
use tokio::net::TcpStream;

const KEY: &[u8] = b"orchestrator bench key";
const TASKS: u32 = 1_000_000;
const TOTAL_SLOTS: usize = 256;
/// Slots of every agent in the runs where all agents are the same size.
const SLOTS_EACH: usize = 8;

/// One stand-in agent: answer every task at once, heartbeat while idle.
async fn fake_agent(addr: String, slots: u32) {
    let security = Security { key: KEY.to_vec(), ..Default::default() };
    // Like a real agent, retry with a growing backoff when the orchestrator
    // sheds handshakes (a thousand agents connecting at once overflow its
    // list of pending handshakes).
    let mut backoff = Duration::from_millis(100);
    let (stream, keys) = loop {
        let attempt = async {
            let mut stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (_, keys) = client_handshake(&mut stream, KEY, &security.binding()).await?;
            Ok::<_, distripool_runtime::Error>((stream, keys))
        };
        match attempt.await {
            Ok(ok) => break ok,
            Err(_) => {
                let jitter = u64::from(distripool_runtime::random_bytes::<1>()[0]);
                tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd, DEFAULT_MAX_FRAME).with_opener(Some(keys.recv));
    let mut writer = FrameWriter::new(wr, DEFAULT_MAX_FRAME).with_sealer(Some(keys.send));
    let labels =
        distripool_protocol::Labels { host: "bench".into(), pid: std::process::id(), ..Default::default() };
    let ready = FromAgent::Ready { slots, labels };
    writer.write(&ready, b"").await.expect("ready");
    // As a real agent does once it sees its tasks are short: hold DEEP per slot.
    let capacity = FromAgent::Capacity { tasks: slots * distripool_runtime::agent::DEEP as u32 };
    writer.write(&capacity, b"").await.expect("capacity");
    writer.flush().await.expect("flush");
    let mut heartbeat = tokio::time::interval(Timing::default().heartbeat);
    loop {
        tokio::select! {
            frame = reader.read_frame() => {
                let Ok(Some(frame)) = frame else { return };
                if let Ok(ToAgent::Task { task, attempt, .. }) = frame.message::<ToAgent>() {
                    writer.write(&FromAgent::Result { task, attempt, micros: 0 }, b"").await.expect("result");
                }
                // Answer everything already read before flushing once.
                if reader.has_buffered_frame() {
                    continue;
                }
                writer.flush().await.expect("flush");
            }
            _ = heartbeat.tick() => {
                writer.write(&FromAgent::Pong { seq: 0 }, b"").await.expect("pong");
                writer.flush().await.expect("flush");
            }
        }
    }
}

fn run_agents(addr: String, count: usize, slots: u32) {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let agents: Vec<_> = (0..count).map(|_| tokio::spawn(fake_agent(addr.clone(), slots))).collect();
        for a in agents {
            let _ = a.await;
        }
    });
}

fn spawn_agents(addr: &str, count: usize, slots: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--agents", addr, &count.to_string(), &slots.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the agents' process")
}

fn wait_for_workers(orch: &Orchestrator, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while orch.stats().workers.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} agents joined",
            orch.stats().workers.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_orchestrator() -> Orchestrator {
    let security = Security { key: KEY.to_vec(), ..Default::default() };
    Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security,
        ..Default::default()
    })
    .expect("orchestrator")
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Wall time and this process's CPU time to push `TASKS` tasks through
/// `workers` stand-in agents of `slots` slots each.
fn throughput(workers: usize, slots: usize) -> (Duration, Duration) {
    let orch = start_orchestrator();
    let addr = orch.local_addrs()[0].to_string();
    let mut child = spawn_agents(&addr, workers, slots);
    wait_for_workers(&orch, workers);
    let client = orch.open_client().unwrap();
    let job = client.new_job();
    let payload = Bytes::from_static(b"args");
    let tasks: Vec<(u32, Bytes)> = (0..TASKS).map(|i| (i, payload.clone())).collect();
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    client.submit(job, Bytes::from_static(b"function"), Vec::new(), tasks, None).unwrap();
    let mut done = 0u32;
    while done < TASKS {
        for c in client.recv(Duration::from_secs(30)).unwrap() {
            assert!(matches!(c.outcome, Outcome::Done(_)), "task {} failed", c.index);
            done += 1;
        }
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    drop(client);
    drop(orch);
    let _ = child.kill();
    let _ = child.wait();
    (elapsed, cpu)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--agents") {
        run_agents(args[2].clone(), args[3].parse().unwrap(), args[4].parse().unwrap());
        return;
    }
    raise_fd_limit();
    let chosen: Vec<usize> = args[1..].iter().filter_map(|a| a.parse().ok()).collect();
    let counts = if chosen.is_empty() { vec![1, 4, 16, 64, 256] } else { chosen.clone() };
    println!("\norchestrator alone: {TASKS} tasks answered at once by stand-in agents (other process, sealed TCP)\n");
    println!("| agents | slots each | tasks/s | wall µs per task | orchestrator CPU µs per task |");
    println!("|---:|---:|---:|---:|---:|");
    let sizes = counts.iter().map(|&n| (n, (TOTAL_SLOTS / n).max(1)));
    let same_size = counts.iter().map(|&n| (n, SLOTS_EACH));
    for (workers, slots) in
        sizes.chain(if chosen.is_empty() { Some(same_size) } else { None }.into_iter().flatten())
    {
        let (t, cpu) = throughput(workers, slots);
        println!(
            "| {workers} | {slots} | {:.0} | {:.2} | {:.2} |",
            f64::from(TASKS) / t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / f64::from(TASKS),
            cpu.as_secs_f64() * 1e6 / f64::from(TASKS)
        );
    }
    println!("\n(the stand-in agents share this machine's cores; the last column is this process alone)");
    if !chosen.is_empty() {
        return;
    }

    let orch = start_orchestrator();
    let addr = orch.local_addrs()[0].to_string();
    let before = rss_bytes();
    let mut child = spawn_agents(&addr, 1000, 1);
    wait_for_workers(&orch, 1000);
    // Let a few heartbeats go round, then measure.
    std::thread::sleep(3 * Timing::default().heartbeat);
    let after = rss_bytes();
    println!(
        "\n1 000 idle agents connected: orchestrator resident memory {:.1} MiB → {:.1} MiB (+{:.1} MiB)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after.saturating_sub(before)) as f64 / 1048576.0
    );
    drop(orch);
    let _ = child.kill();
    let _ = child.wait();
}
