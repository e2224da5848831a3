//! The JSON API under `/api/v1/`, read by the page and by `distripool
//! status`. Each call asks the core once; none walks the tasks.
//!
//! - `overview`: counts of workers, executors and tasks, bytes, and the
//!   throughput of the last minutes;
//! - `workers`: one object per connected worker;
//! - `jobs`: each `map`, `apply`, ... its pool described, with errors;
//! - `events?since=N`: the events numbered N and after;
//! - `status`: the first three in one object.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::{query_value, Shared};
use crate::orchestrator::{Event, EventKind, JobInfo, WorkerInfo};
use crate::Result;

/// JSON, or 503 once the orchestrator is closing.
fn reply(value: Result<Value>) -> Response {
    match value {
        Ok(v) => {
            ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], v.to_string())
                .into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

pub(super) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no such page: the dashboard is at ./, the API under api/v1/, metrics at metrics\n",
    )
        .into_response()
}

fn unix(at: Instant, now: Instant, wall: SystemTime) -> f64 {
    let t = wall - now.saturating_duration_since(at);
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn overview_value(s: &Shared) -> Result<Value> {
    let m = s.core.metrics().await?;
    let st = &s.core.stats;
    let raised = st.tasks_raised.load(Ordering::Relaxed);
    let throughput: Vec<Value> =
        s.history.rates().into_iter().map(|(t, done, failed)| json!([t, done, failed])).collect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": secs(s.started.elapsed()),
        "workers": st.workers.load(Ordering::Relaxed),
        "executors": {"busy": m.executors_busy, "idle": m.executors_idle},
        "tasks": {
            "submitted": st.tasks_submitted.load(Ordering::Relaxed),
            "queued": m.tasks_queued,
            "running": m.tasks_running,
            "completed": st.tasks_done.load(Ordering::Relaxed).saturating_sub(raised),
            "failed": st.tasks_failed.load(Ordering::Relaxed) + raised,
            "retried": st.tasks_retried.load(Ordering::Relaxed),
        },
        "bytes": {
            "sent": st.bytes_sent.load(Ordering::Relaxed),
            "received": st.bytes_received.load(Ordering::Relaxed),
        },
        "workers_lost": st.workers_lost.load(Ordering::Relaxed),
        "workers_left": st.workers_left.load(Ordering::Relaxed),
        "crashes": st.crashes.load(Ordering::Relaxed),
        "throughput": throughput,
    }))
}

/// One worker as the API and `Orchestrator.workers_info()` show it.
pub fn worker_value(w: &WorkerInfo) -> Value {
    let labels: Map<String, Value> = w.labels.extra.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "id": w.id.0,
        "name": w.name,
        "address": w.peer,
        "host": w.labels.host,
        "pid": w.labels.pid,
        "cpus": w.labels.cpus,
        "labels": labels,
        "slots": w.slots,
        "state": w.state.as_str(),
        "tasks_running": w.running,
        "tasks_done": w.tasks_done,
        "crashes": w.crashes,
        "connected_for": secs(w.connected_for),
        "last_heard": secs(w.last_heard),
        "executors_cpu": w.usage.map(|u| u.cpu),
        "executors_memory": w.usage.map(|u| u.memory),
    })
}

async fn workers_value(s: &Shared) -> Result<Value> {
    let snap = s.core.snapshot().await?;
    Ok(Value::Array(snap.workers.iter().map(worker_value).collect()))
}

fn job_value(j: &JobInfo) -> Value {
    let state = if j.pending > 0 {
        "running"
    } else if j.failed > 0 {
        "failed"
    } else {
        "done"
    };
    let errors: Vec<Value> = j.errors.iter().map(|e| json!({"index": e.index, "text": e.text})).collect();
    json!({
        "client": j.client.0,
        "job": j.job.0,
        "kind": j.kind,
        "name": j.name,
        "items": j.items,
        "tasks": j.tasks,
        "done": j.done,
        "failed": j.failed,
        "retried": j.retried,
        "pending": j.pending,
        "state": state,
        "age": secs(j.age),
        "elapsed": j.elapsed.map(secs),
        "errors": errors,
    })
}

async fn jobs_value(s: &Shared) -> Result<Value> {
    // Newest first, as a user looks for the job they just started.
    Ok(Value::Array(s.core.jobs().await?.iter().rev().map(job_value).collect()))
}

/// One event as the API and `Orchestrator.events()` show it: `seq`,
/// `time`, `kind` and its own fields.
pub fn event_value(e: &Event, now: Instant, wall: SystemTime) -> Value {
    let mut v = json!({"seq": e.seq, "time": unix(e.at, now, wall), "kind": e.kind.name()});
    let fields = match &e.kind {
        EventKind::WorkerJoined { worker, name } | EventKind::WorkerDraining { worker, name } => {
            json!({"worker": worker.0, "name": name})
        }
        EventKind::WorkerLeft { worker, name, reason } => {
            json!({"worker": worker.0, "name": name, "reason": reason})
        }
        EventKind::WorkerLost { worker, name, reason, tasks } => {
            json!({"worker": worker.0, "name": name, "reason": reason, "tasks": tasks})
        }
        EventKind::TaskRetried { client, job, index, reason }
        | EventKind::TaskFailed { client, job, index, reason } => {
            json!({"client": client.0, "job": job.0, "index": index, "reason": reason})
        }
        EventKind::ConnectionRefused { peer, reason } => json!({"peer": peer, "reason": reason}),
    };
    if let (Value::Object(all), Value::Object(own)) = (&mut v, fields) {
        all.extend(own);
    }
    v
}

pub(super) async fn overview(State(s): State<Shared>) -> Response {
    reply(overview_value(&s).await)
}

pub(super) async fn workers(State(s): State<Shared>) -> Response {
    reply(workers_value(&s).await)
}

pub(super) async fn jobs(State(s): State<Shared>) -> Response {
    reply(jobs_value(&s).await)
}

pub(super) async fn events(State(s): State<Shared>, req: Request) -> Response {
    let since = match query_value(req.uri().query(), "since").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "since must be a whole number (an event's seq)\n")
                .into_response()
        }
    };
    let events = s.core.events(since).await.map(|evs| {
        let (now, wall) = (Instant::now(), SystemTime::now());
        Value::Array(evs.iter().map(|e| event_value(e, now, wall)).collect())
    });
    reply(events)
}

pub(super) async fn status(State(s): State<Shared>) -> Response {
    let all = async {
        Ok(json!({
            "overview": overview_value(&s).await?,
            "workers": workers_value(&s).await?,
            "jobs": jobs_value(&s).await?,
        }))
    };
    reply(all.await)
}
