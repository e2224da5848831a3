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

#[path = "common/stand_in.rs"]
mod stand_in;

use std::time::Duration;

use distripool_runtime::Timing;
use stand_in::{push_tasks, raise_fd_limit, rss_bytes, run_agents, spawn_agents, start_orchestrator};

const TASKS: u32 = 1_000_000;
const TOTAL_SLOTS: usize = 256;
/// Slots of every agent in the runs where all agents are the same size.
const SLOTS_EACH: usize = 8;

fn wait_for_workers(orch: &distripool_runtime::Orchestrator, n: usize) {
    stand_in::wait_for_workers(orch, n, Duration::from_secs(120));
}

/// Wall time and this process's CPU time to push `TASKS` tasks through
/// `workers` stand-in agents of `slots` slots each.
fn throughput(workers: usize, slots: usize) -> (Duration, Duration) {
    let orch = start_orchestrator();
    let addr = orch.local_addrs()[0].to_string();
    let mut child = spawn_agents(&addr, workers, slots);
    wait_for_workers(&orch, workers);
    let measured = push_tasks(&orch, TASKS);
    drop(orch);
    let _ = child.kill();
    let _ = child.wait();
    measured
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
