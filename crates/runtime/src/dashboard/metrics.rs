//! `/metrics`: the orchestrator's counters in the Prometheus (OpenMetrics)
//! text format, encoded by the `prometheus-client` crate. The names are
//! part of the interface (see docs/observability.md). Labels are bounded:
//! executor states and refusal reasons, nothing per task or per process.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Shared;
use crate::orchestrator::{CoreMetrics, Refusal, Stats};

/// The values of one scrape, read before encoding.
#[derive(Debug)]
struct Values {
    workers: u64,
    core: CoreMetrics,
    submitted: u64,
    completed: u64,
    failed: u64,
    retried: u64,
    sent: u64,
    received: u64,
    fetched: u64,
    refused: Vec<(&'static str, u64)>,
}

impl Values {
    fn read(stats: &Stats, core: CoreMetrics) -> Self {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let raised = load(&stats.tasks_raised);
        Values {
            workers: stats.workers.load(Ordering::Relaxed) as u64,
            core,
            submitted: load(&stats.tasks_submitted),
            completed: load(&stats.tasks_done).saturating_sub(raised),
            failed: load(&stats.tasks_failed) + raised,
            retried: load(&stats.tasks_retried),
            sent: load(&stats.bytes_sent),
            received: load(&stats.bytes_received),
            fetched: load(&stats.functions_fetched),
            refused: Refusal::ALL.iter().map(|r| (r.as_str(), load(&stats.refused[*r as usize]))).collect(),
        }
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Values {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.core;
        gauge(&mut enc, "distripool_workers", "Worker agents connected.", self.workers)?;
        {
            let mut m = enc.encode_descriptor(
                "distripool_executors",
                "Executors, by state.",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [("busy", c.executors_busy), ("idle", c.executors_idle)] {
                let g = ConstGauge::new(n as i64);
                g.encode(m.encode_family(&[("state", state)])?)?;
            }
        }
        counter(&mut enc, "distripool_tasks_submitted", "Tasks (chunks) queued by pools.", self.submitted)?;
        counter(&mut enc, "distripool_tasks_completed", "Tasks that returned a value.", self.completed)?;
        counter(
            &mut enc,
            "distripool_tasks_failed",
            "Tasks that raised, or were given up (crashes, losses, time-outs).",
            self.failed,
        )?;
        counter(
            &mut enc,
            "distripool_tasks_retried",
            "Tasks run again after their executor died.",
            self.retried,
        )?;
        gauge(&mut enc, "distripool_tasks_queued", "Tasks waiting for a worker.", c.tasks_queued as u64)?;
        gauge(&mut enc, "distripool_tasks_running", "Tasks held by a worker.", c.tasks_running as u64)?;
        {
            let m = enc.encode_descriptor(
                "distripool_task_duration_seconds",
                "Running time of the tasks that returned, as their worker measured it.",
                None,
                MetricType::Histogram,
            )?;
            let mut m = m;
            let d = &c.durations;
            m.encode_histogram::<NoLabelSet>(d.sum, d.count, &d.buckets(), None)?;
        }
        counter(
            &mut enc,
            "distripool_bytes_sent",
            "Message bytes sent to workers, before encryption.",
            self.sent,
        )?;
        counter(
            &mut enc,
            "distripool_bytes_received",
            "Message bytes received from workers, before encryption.",
            self.received,
        )?;
        counter(
            &mut enc,
            "distripool_functions_fetched",
            "Large functions workers fetched from one another rather than from here.",
            self.fetched,
        )?;
        let mut m = enc.encode_descriptor(
            "distripool_worker_connections_refused",
            "Connections refused before they became a worker, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &self.refused {
            ConstCounter::new(*n).encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}

/// The text of one scrape.
fn render(values: Values) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(values));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

pub(super) async fn serve(State(s): State<Shared>) -> Response {
    let core = match s.core.metrics().await {
        Ok(m) => m,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    match render(Values::read(&s.core.stats, core)) {
        Ok(text) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the metrics could not be encoded\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_final_name_is_in_the_text() {
        let stats = Stats::default();
        stats.tasks_done.store(10, Ordering::Relaxed);
        stats.tasks_raised.store(3, Ordering::Relaxed);
        stats.refused[Refusal::Auth as usize].store(2, Ordering::Relaxed);
        let mut core = CoreMetrics { executors_busy: 2, executors_idle: 1, ..Default::default() };
        let mut o = crate::orchestrator::observe::Observer::default();
        for micros in [50, 3000, 3000] {
            o.task_ran(micros);
        }
        core.durations = o.durations.clone();
        let text = render(Values::read(&stats, core)).unwrap();
        for line in [
            "distripool_workers 0",
            "distripool_executors{state=\"busy\"} 2",
            "distripool_executors{state=\"idle\"} 1",
            "distripool_tasks_submitted_total 0",
            "distripool_tasks_completed_total 7",
            "distripool_tasks_failed_total 3",
            "distripool_tasks_retried_total 0",
            "distripool_tasks_queued 0",
            "distripool_tasks_running 0",
            "distripool_task_duration_seconds_count 3",
            "distripool_task_duration_seconds_bucket{le=\"0.0001\"} 1",
            "distripool_task_duration_seconds_bucket{le=\"0.005\"} 3",
            "distripool_task_duration_seconds_bucket{le=\"+Inf\"} 3",
            "distripool_bytes_sent_total 0",
            "distripool_bytes_received_total 0",
            "distripool_functions_fetched_total 0",
            "distripool_worker_connections_refused_total{reason=\"auth\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
