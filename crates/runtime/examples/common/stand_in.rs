//! Stand-in agents for the benchmarks: each connects over loopback TCP,
//! authenticates and seals like a real agent, and answers every task with an
//! empty result as soon as it reads it (an agent of 0 slots is never given
//! a task: it only heartbeats). They run in a child process (the benchmark
//! again, with `--agents`), so that the orchestrator's process has the
//! orchestrator alone.

// Shared by several benchmarks, each of which uses a part.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_protocol::{FromAgent, ToAgent, DEFAULT_MAX_FRAME};
use distripool_runtime::conn::{client_handshake, FrameReader, FrameWriter};
use distripool_runtime::{Orchestrator, OrchestratorConfig, Outcome, Security, Timing};
use tokio::net::TcpStream;

pub const KEY: &[u8] = b"orchestrator bench key";

/// One stand-in agent: answer every task at once, heartbeat while idle.
/// The first TCP connection is made at once; `connected` gets the time it
/// took, whether or not the handshake that follows succeeds.
async fn fake_agent(addr: String, slots: u32, connected: tokio::sync::mpsc::UnboundedSender<Duration>) {
    let security = Security { key: KEY.to_vec(), ..Default::default() };
    let t0 = Instant::now();
    let mut first = Some(connected);
    // Like a real agent, retry with a growing backoff when the orchestrator
    // sheds handshakes (a thousand agents connecting at once overflow its
    // list of pending handshakes).
    let mut backoff = Duration::from_millis(100);
    let (stream, keys) = loop {
        let attempt = async {
            let mut stream = TcpStream::connect(&addr).await?;
            if let Some(tx) = first.take() {
                let _ = tx.send(t0.elapsed());
            }
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
    if slots > 0 {
        // As a real agent does once it sees its tasks are short: hold DEEP per slot.
        let capacity = FromAgent::Capacity { tasks: slots * distripool_runtime::agent::DEEP as u32 };
        writer.write(&capacity, b"").await.expect("capacity");
    }
    writer.flush().await.expect("flush");
    let every = Timing::default().heartbeat;
    let mut heartbeat = tokio::time::interval(every);
    // As a real agent does, beat only when nothing was written lately.
    let mut last_flush = Instant::now();
    let mut wrote = false;
    loop {
        tokio::select! {
            frame = reader.read_frame() => {
                let Ok(Some(frame)) = frame else { return };
                if let Ok(ToAgent::Task { task, attempt, .. }) = frame.message::<ToAgent>() {
                    writer.write(&FromAgent::Result { task, attempt, micros: 0 }, b"").await.expect("result");
                    wrote = true;
                }
                // Answer everything already read before flushing once.
                if reader.has_buffered_frame() {
                    continue;
                }
                writer.flush().await.expect("flush");
                // Only what was written counts, not a ping read.
                if std::mem::take(&mut wrote) {
                    last_flush = Instant::now();
                }
            }
            _ = heartbeat.tick() => {
                if last_flush.elapsed() >= every / 2 {
                    writer.write(&FromAgent::Pong { seq: 0 }, b"").await.expect("pong");
                    writer.flush().await.expect("flush");
                    last_flush = Instant::now();
                }
            }
        }
    }
}

/// The child process's part: `count` agents of `slots` slots, all started at
/// once. Prints, once every agent has made its first TCP connection, the
/// time from the first connection's start to the last one made, in
/// microseconds.
pub fn run_agents(addr: String, count: usize, slots: u32) {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let agents: Vec<_> =
            (0..count).map(|_| tokio::spawn(fake_agent(addr.clone(), slots, tx.clone()))).collect();
        drop(tx);
        let mut last = Duration::ZERO;
        for _ in 0..count {
            last = last.max(rx.recv().await.expect("an agent connected"));
        }
        println!("connected {}", last.as_micros());
        for a in agents {
            let _ = a.await;
        }
    });
}

/// Start `count` stand-in agents of `slots` slots in a child process.
pub fn spawn_agents(addr: &str, count: usize, slots: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--agents", addr, &count.to_string(), &slots.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the agents' process")
}

/// Wait until `n` agents are connected; how long it took.
pub fn wait_for_workers(orch: &Orchestrator, n: usize, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while orch.stats().workers.load(Ordering::Relaxed) < n {
        assert!(
            t0.elapsed() < limit,
            "only {} of {n} agents joined within {limit:?}",
            orch.stats().workers.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

pub fn start_orchestrator() -> Orchestrator {
    let security = Security { key: KEY.to_vec(), ..Default::default() };
    Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security,
        ..Default::default()
    })
    .expect("orchestrator")
}

/// Wall time and this process's CPU time to push `n` tasks through the
/// agents connected to `orch`.
pub fn push_tasks(orch: &Orchestrator, n: u32) -> (Duration, Duration) {
    let client = orch.open_client().unwrap();
    let job = client.new_job();
    let payload = distripool_runtime::Payload::from(Bytes::from_static(b"args"));
    let tasks: Vec<_> = (0..n).map(|i| (i, payload.clone())).collect();
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    client.submit(job, Bytes::from_static(b"function"), Vec::new(), tasks, None).unwrap();
    let mut done = 0u32;
    while done < n {
        for c in client.recv(Duration::from_secs(30)).unwrap() {
            assert!(matches!(c.outcome, Outcome::Done(_)), "task {} failed", c.index);
            done += 1;
        }
    }
    (t0.elapsed(), cpu_time() - cpu0)
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Raise the soft limit on open files to the hard one; returns it.
pub fn raise_fd_limit() -> u64 {
    distripool_runtime::raise_open_files().0
}

/// The child's line: microseconds from the first connection's start to the
/// last one made.
pub fn read_connected(child: &mut Child) -> Duration {
    use std::io::BufRead;
    let out = child.stdout.as_mut().expect("piped");
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).expect("the agents' line");
    let micros: u64 =
        line.trim().strip_prefix("connected ").and_then(|m| m.parse().ok()).expect("connected N");
    Duration::from_micros(micros)
}
