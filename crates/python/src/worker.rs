//! The worker agent, run in the calling process: `distripool worker` and
//! `make_worker`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use distripool_runtime::executor::{ExecutorSpec, Share};
use distripool_runtime::{AgentConfig, AgentExit};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::{security, to_py};

/// Serve orchestrators as a worker agent until interrupted (Ctrl-C: the
/// tasks it holds go elsewhere), drained, told to leave by SIGTERM (it
/// finishes what it holds first), idle for `idle_timeout` seconds, or at
/// `time_limit` seconds from now. Returns why: "drained", "idle" or "time-limit".
/// With `memory_limit`, each executor runs in a cgroup of its own limited to
/// that many bytes.
#[pyfunction]
#[pyo3(signature = (
    connect, key, processes, python, module, env, max_frame = None, cluster = None, encrypt = true, tls = None,
    timing = None, labels = Vec::new(), idle_timeout = None, time_limit = None, ready_file = None,
    memory_limit = None, serve_peers = true
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_agent(
    py: Python<'_>,
    connect: Vec<String>,
    key: Vec<u8>,
    processes: usize,
    python: String,
    module: String,
    env: Vec<(String, String)>,
    max_frame: Option<usize>,
    cluster: Option<String>,
    encrypt: bool,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    timing: Option<Vec<(String, f64)>>,
    labels: Vec<(String, String)>,
    idle_timeout: Option<f64>,
    time_limit: Option<f64>,
    ready_file: Option<PathBuf>,
    memory_limit: Option<u64>,
    serve_peers: bool,
) -> PyResult<&'static str> {
    let max_frame = max_frame.unwrap_or(distripool_runtime::DEFAULT_MAX_FRAME);
    // make_worker checks that it is positive.
    let idle_timeout = idle_timeout.map(Duration::try_from_secs_f64).transpose();
    let idle_timeout = idle_timeout.map_err(|e| PyValueError::new_err(format!("idle_timeout: {e}")))?;
    let time_limit = time_limit.map(|s| Duration::try_from_secs_f64(s.max(0.0)).map(|d| Instant::now() + d));
    let time_limit = time_limit.transpose().map_err(|e| PyValueError::new_err(format!("time_limit: {e}")))?;
    let memory = match memory_limit {
        Some(bytes) => {
            Some(distripool_runtime::cgroup::MemoryLimit::create(bytes).map_err(PyOSError::new_err)?)
        }
        None => None,
    };
    let (leave_tx, leave_rx) = tokio::sync::watch::channel(false);
    let config = AgentConfig {
        connect,
        security: security(key, cluster, encrypt, tls),
        processes,
        executor: ExecutorSpec { python, module, env, max_frame, memory, share: Share::All },
        timing: crate::timing(timing)?,
        labels,
        idle_timeout,
        time_limit,
        leave: Some(leave_rx),
        ready_file,
        serve_peers,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("distripool-agent")
        .enable_all()
        .build()
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
    // SIGTERM (what Slurm and Kubernetes send before SIGKILL): drain, then exit.
    let mut term = {
        let _guard = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| PyOSError::new_err(format!("cannot handle SIGTERM: {e}")))?
    };
    rt.spawn(async move {
        if term.recv().await.is_some() {
            let _ = leave_tx.send(true);
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handle = rt.spawn(distripool_runtime::run_agent(config, stop_rx));
    loop {
        let done = py.detach(|| {
            std::thread::sleep(Duration::from_millis(50));
            handle.is_finished()
        });
        if done {
            break;
        }
        if let Err(e) = py.check_signals() {
            let _ = stop_tx.send(true);
            py.detach(|| {
                let _ = rt.block_on(handle);
                rt.shutdown_timeout(Duration::from_secs(2));
            });
            return Err(e);
        }
    }
    let result = py.detach(|| rt.block_on(handle));
    match result {
        Ok(r) => r.map_err(to_py).map(|exit| match exit {
            AgentExit::Idle => "idle",
            AgentExit::TimeLimit => "time-limit",
            AgentExit::Drained | AgentExit::Stopped => "drained",
        }),
        Err(e) => Err(PyRuntimeError::new_err(format!("agent crashed: {e}"))),
    }
}

/// CPUs this process may use: its affinity mask, capped by its cgroup's CPU
/// quota. What a worker runs executors for by default.
#[pyfunction]
pub(crate) fn usable_cpus() -> u32 {
    distripool_runtime::agent::usable_cpus()
}
