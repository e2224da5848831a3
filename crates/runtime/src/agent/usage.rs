//! What an agent's executors use, read from `/proc`: CPU time between two
//! readings and resident memory. Read only when the orchestrator asks for it
//! (its dashboard shows them), once per interval, never per task.

use std::collections::HashMap;
use std::time::Instant;

/// CPU time (clock ticks) of each executor at the last reading.
pub(crate) struct UsageMeter {
    ticks: HashMap<u32, u64>,
    at: Instant,
    tick_hz: f64,
    page: u64,
}

/// `(executors, thousandths of a CPU, resident bytes)` summed over executors.
pub(crate) type Reading = (u32, u32, u64);

impl UsageMeter {
    pub(crate) fn new(now: Instant) -> Self {
        // SAFETY: sysconf only reads configuration values.
        let (hz, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        Self { ticks: HashMap::new(), at: now, tick_hz: hz.max(1) as f64, page: page.max(1) as u64 }
    }

    /// Read the processes `pids` now. A process seen for the first time
    /// counts all its CPU time (it started within the interval, or this is
    /// the first reading).
    pub(crate) fn read(&mut self, pids: impl Iterator<Item = u32>, now: Instant) -> Reading {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let mut ticks = HashMap::new();
        let (mut n, mut busy, mut memory) = (0u32, 0u64, 0u64);
        for pid in pids {
            let Some((t, rss)) = read_proc(pid) else { continue };
            n += 1;
            busy += t.saturating_sub(self.ticks.get(&pid).copied().unwrap_or(0));
            memory += rss * self.page;
            ticks.insert(pid, t);
        }
        self.ticks = ticks;
        let cpus = if elapsed > 0.0 { busy as f64 / self.tick_hz / elapsed } else { 0.0 };
        (n, (cpus * 1000.0).round().min(u32::MAX as f64) as u32, memory)
    }
}

/// `(utime + stime in ticks, resident pages)` of a process.
fn read_proc(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    Some((parse_stat_ticks(&stat)?, statm.split_whitespace().nth(1)?.parse().ok()?))
}

/// Fields 14 and 15 (utime, stime) of `/proc/PID/stat`, counted after the
/// command name, which may itself hold spaces and parentheses.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_fields_are_found_after_any_command_name() {
        let stat = "42 (py (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 100 10";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_read_and_a_missing_one_is_skipped() {
        let mut m = UsageMeter::new(Instant::now());
        let me = std::process::id();
        let (n, _, memory) = m.read([me, u32::MAX].into_iter(), Instant::now());
        assert_eq!(n, 1);
        assert!(memory > 1 << 20, "a test process has more than 1 MiB resident: {memory}");
    }
}
