//! Tasks completed and failed per second over the last minutes, for the
//! overview's chart: the counters sampled once a second by a task of the
//! dashboard's, so the chart has the minutes before the page was opened.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::orchestrator::Stats;

/// Samples kept: ten minutes, one a second.
const KEPT: usize = 600;

#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the epoch.
    at: f64,
    completed: u64,
    failed: u64,
}

#[derive(Clone)]
pub(super) struct History(Arc<Mutex<VecDeque<Sample>>>);

/// One point of the chart: when, tasks completed and failed per second.
pub(super) type Rate = (f64, f64, f64);

fn sample(stats: &Stats) -> Sample {
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let raised = stats.tasks_raised.load(Ordering::Relaxed);
    Sample {
        at,
        completed: stats.tasks_done.load(Ordering::Relaxed).saturating_sub(raised),
        failed: stats.tasks_failed.load(Ordering::Relaxed) + raised,
    }
}

impl History {
    /// Sample `stats` every second from now on, on the current runtime.
    pub(super) fn start(stats: Arc<Stats>) -> Self {
        let history = History(Arc::new(Mutex::new(VecDeque::with_capacity(KEPT))));
        let kept = Arc::downgrade(&history.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(samples) = kept.upgrade() else { return };
                let mut samples = samples.lock().expect("history lock");
                if samples.len() == KEPT {
                    samples.pop_front();
                }
                samples.push_back(sample(&stats));
            }
        });
        history
    }

    /// The rates between consecutive samples, oldest first.
    pub(super) fn rates(&self) -> Vec<Rate> {
        let samples = self.0.lock().expect("history lock");
        rates(samples.iter().copied())
    }
}

fn rates(samples: impl Iterator<Item = Sample>) -> Vec<Rate> {
    let mut out = Vec::new();
    let mut prev: Option<Sample> = None;
    for s in samples {
        if let Some(p) = prev {
            let dt = (s.at - p.at).max(1e-3);
            let done = s.completed.saturating_sub(p.completed) as f64 / dt;
            let failed = s.failed.saturating_sub(p.failed) as f64 / dt;
            out.push((s.at, done, failed));
        }
        prev = Some(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_the_differences_over_the_time_between_samples() {
        let s = |at, completed, failed| Sample { at, completed, failed };
        let r = rates([s(10.0, 0, 0), s(11.0, 100, 1), s(13.0, 300, 1)].into_iter());
        assert_eq!(r, [(11.0, 100.0, 1.0), (13.0, 100.0, 0.0)]);
    }
}
