//! Many agents at once: a herd of 1 000 connecting in the same instant, and
//! 10 000 connected together, against one orchestrator in this process.
//! The agents are the stand-ins of `orchestrator_bench` (sealed loopback TCP,
//! in child processes); a thousand connections at once overflow the
//! orchestrator's list of pending handshakes, which drops the oldest, and
//! those agents retry with backoff as real ones do.
//!
//! ```text
//! cargo run --release -p distripool-runtime --example herd [HERD] [MANY]
//! ```
//!
//! 1. Herd: HERD agents (1 000) start at once; the time from the first TCP
//!    connection to the last, the time until all have joined, the
//!    handshakes shed and retried, the orchestrator's CPU and peak memory.
//! 2. Many: MANY agents (10 000) of no slots (they only heartbeat) join;
//!    the orchestrator's memory; then its CPU per task for a million tasks
//!    through 16 agents of 16 slots, alone and beside the MANY idle ones
//!    (and that less the idle ones' heartbeats meanwhile); and through MANY
//!    agents of one slot each, all given tasks, against 16 of one slot, and
//!    of 16 slots each, against 16 of 16 slots.
//!
//! Each side needs a file descriptor per agent: the processes raise their
//! soft limit to the hard one (`ulimit -Hn`), and MANY must fit under it.

#[path = "common/stand_in.rs"]
mod stand_in;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distripool_runtime::{Orchestrator, Timing};
use stand_in::{
    cpu_time, push_tasks, raise_fd_limit, read_connected, rss_bytes, run_agents, spawn_agents,
    start_orchestrator, wait_for_workers,
};

const TASKS: u32 = 1_000_000;
/// How long the idle agents heartbeat before their memory is read again.
const IDLE_SECONDS: u64 = 60;
/// Agents started in one child process (one runtime thread each).
const PER_PROCESS: usize = 2_500;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The largest resident memory seen while `f` runs, sampled every 5 ms.
fn peak_rss<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let peak = Arc::new(Mutex::new(rss_bytes()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now = rss_bytes();
                let mut p = peak.lock().unwrap();
                *p = (*p).max(now);
                drop(p);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = f();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let p = *peak.lock().unwrap();
    (out, p)
}

fn herd(n: usize) {
    let orch = start_orchestrator();
    let addr = orch.local_addrs()[0].to_string();
    let before = rss_bytes();
    let cpu0 = cpu_time();
    let ((joined, mut child), peak) = peak_rss(|| {
        let child = spawn_agents(&addr, n, 1);
        (wait_for_workers(&orch, n, Duration::from_secs(60)), child)
    });
    let cpu = cpu_time() - cpu0;
    let connected = read_connected(&mut child);
    let stats = orch.stats();
    let shed =
        stats.refused[distripool_runtime::orchestrator::Refusal::Overload as usize].load(Ordering::Relaxed);
    let failed = stats.handshake_failures.load(Ordering::Relaxed);
    std::thread::sleep(3 * Timing::default().heartbeat);
    let after = rss_bytes();
    println!("\nherd: {n} stand-in agents started at once (another process, sealed TCP)\n");
    println!("| figure | measured | goal |");
    println!("|---|---:|---:|");
    println!(
        "| first TCP connections made, first to last | {:.0} ms | ≤ 100 ms |",
        connected.as_secs_f64() * 1e3
    );
    println!("| all {n} joined after | {:.2} s | ≤ 15 s |", joined.as_secs_f64());
    println!("| handshakes shed (past 256 pending), retried by their agents | {shed} | none lost for good |");
    println!("| handshakes failed in all (shed included) | {failed} | |");
    println!("| orchestrator CPU until all joined | {:.0} ms | |", cpu.as_secs_f64() * 1e3);
    println!(
        "| orchestrator resident memory: before, peak, after | {:.1} / {:.1} / {:.1} MiB | |",
        mib(before),
        mib(peak),
        mib(after)
    );
    drop(orch);
    let _ = child.kill();
    let _ = child.wait();
}

/// Start `n` agents of `slots` slots in processes of PER_PROCESS.
fn spawn_many(orch: &Orchestrator, n: usize, slots: usize) -> Vec<std::process::Child> {
    let addr = orch.local_addrs()[0].to_string();
    (0..n.div_ceil(PER_PROCESS))
        .map(|i| spawn_agents(&addr, PER_PROCESS.min(n - i * PER_PROCESS), slots))
        .collect()
}

fn stop(children: Vec<std::process::Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A million tasks through the agents connected to `orch`, then a million
/// more: the first's wall and CPU time, and the second's CPU time.
fn twice(orch: &Orchestrator) -> (Duration, Duration, Duration) {
    let (wall, first) = push_tasks(orch, TASKS);
    let (_, next) = push_tasks(orch, TASKS);
    (wall, first, next)
}

fn per_task(cpu: Duration) -> f64 {
    cpu.as_secs_f64() * 1e6 / f64::from(TASKS)
}

fn many(n: usize) {
    println!("\n{n} agents at once\n");
    println!("| figure | measured | goal |");
    println!("|---|---:|---:|");
    // The references: 16 agents alone, of 16 slots and of one slot (the
    // shape of the MANY one-slot agents below: as few tasks per write).
    // Each run pushes a million tasks through agents just connected, then
    // a million more through the same agents, their buffers grown.
    let reference = |slots: usize| {
        let orch = start_orchestrator();
        let busy = spawn_many(&orch, 16, slots);
        wait_for_workers(&orch, 16, Duration::from_secs(60));
        let m = twice(&orch);
        stop(busy);
        m
    };
    let (alone_wall, alone, alone_next) = reference(16);
    println!(
        "| CPU per task, 16 agents × 16 slots | {:.2} µs ({:.0} k tasks/s); the next million {:.2} µs | |",
        per_task(alone),
        f64::from(TASKS) / alone_wall.as_secs_f64() / 1e3,
        per_task(alone_next)
    );
    let (one_wall, one_slot, one_next) = reference(1);
    println!(
        "| CPU per task, 16 agents × 1 slot | {:.2} µs ({:.0} k tasks/s); the next million {:.2} µs | |",
        per_task(one_slot),
        f64::from(TASKS) / one_wall.as_secs_f64() / 1e3,
        per_task(one_next)
    );

    let orch = start_orchestrator();
    let before = rss_bytes();
    let idle = spawn_many(&orch, n, 0);
    let joined = wait_for_workers(&orch, n, Duration::from_secs(300));
    std::thread::sleep(3 * Timing::default().heartbeat);
    let with_idle = rss_bytes();
    println!("| {n} idle agents (no slots) joined after | {:.1} s | |", joined.as_secs_f64());
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "| orchestrator resident memory with {n} connected | {:.0} MB (+{:.0} MB, {:.1} KiB each) | < 300 MB |",
        mb(with_idle),
        mb(with_idle - before),
        (with_idle - before) as f64 / n as f64 / 1024.0
    );
    // Heartbeats go on; what they leave behind shows after a while.
    std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
    let later = rss_bytes();
    println!(
        "| the same, {IDLE_SECONDS} s of heartbeats later | {:.0} MB ({:.1} KiB each) | < 300 MB |",
        mb(later),
        (later - before) as f64 / n as f64 / 1024.0
    );
    // What the idle ones cost while nothing runs: heartbeats alone.
    let cpu0 = cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let idle_cpu = (cpu_time() - cpu0).as_secs_f64() / 3.0;
    println!("| orchestrator CPU for {n} idle agents (heartbeats) | {:.1} % of a core | |", idle_cpu * 100.0);
    let busy = spawn_many(&orch, 16, 16);
    wait_for_workers(&orch, n + 16, Duration::from_secs(60));
    let (wall, beside) = push_tasks(&orch, TASKS);
    println!(
        "| CPU per task, the same 16 beside {n} idle | {:.2} µs ({:.0} k tasks/s; {:.2}× alone) | ≤ 2× |",
        per_task(beside),
        f64::from(TASKS) / wall.as_secs_f64() / 1e3,
        beside.as_secs_f64() / alone.as_secs_f64()
    );
    // What the idle ones' heartbeats took meanwhile, at the rate measured
    // just before, is not a cost of the tasks.
    let tasks_only = beside.saturating_sub(wall.mul_f64(idle_cpu));
    println!(
        "| … less the idle agents' heartbeats over the same {:.2} s | {:.2} µs ({:.2}× alone) | idle agents cost nothing per task |",
        wall.as_secs_f64(),
        per_task(tasks_only),
        tasks_only.as_secs_f64() / alone.as_secs_f64()
    );
    stop(busy);
    stop(idle);
    drop(orch);

    // Every agent given tasks: of one slot each, against 16 of one slot
    // and 16 of 16 slots; then slot for slot against 16 of 16 slots.
    for (slots, same) in [(1, Some((one_slot, one_next))), (16, None)] {
        let orch = start_orchestrator();
        let all = spawn_many(&orch, n, slots);
        wait_for_workers(&orch, n, Duration::from_secs(300));
        let (wall, spread, next) = twice(&orch);
        let against = |cpu: Duration, reference: Option<Duration>| match reference {
            Some(r) => format!(
                "{:.2}× 16 × {slots}, {:.2}× 16 × 16",
                cpu.as_secs_f64() / r.as_secs_f64(),
                cpu.as_secs_f64() / alone.as_secs_f64()
            ),
            None => format!("{:.2}× 16 × 16", cpu.as_secs_f64() / alone.as_secs_f64()),
        };
        println!(
            "| CPU per task, {n} agents × {slots} {}, all given tasks | {:.2} µs ({:.0} k tasks/s; {}); the next million {:.2} µs ({}) | ≤ 2× |",
            if slots == 1 { "slot" } else { "slots" },
            per_task(spread),
            f64::from(TASKS) / wall.as_secs_f64() / 1e3,
            against(spread, same.map(|s| s.0)),
            per_task(next),
            against(next, same.map(|s| s.1)),
        );
        println!(
            "| peak resident memory of this process (a million tasks queued above) | {:.1} MiB | |",
            mib(peak_of_process())
        );
        stop(all);
    }
}

/// The process's peak resident memory so far (`VmHWM`).
fn peak_of_process() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--agents") {
        run_agents(args[2].clone(), args[3].parse().unwrap(), args[4].parse().unwrap());
        return;
    }
    let limit = raise_fd_limit();
    let herd_size = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let many_size: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    assert!(
        (many_size as u64 + 64) < limit,
        "{many_size} agents need as many file descriptors, and the limit is {limit}: raise it (ulimit -n)"
    );
    herd(herd_size);
    many(many_size);
}
