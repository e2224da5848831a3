//! `distripool._native`: the thin PyO3 layer over `distripool-runtime`.
//!
//! Python objects never cross into Rust threads, with one exception: a large
//! `bytes` in a task's payload is held, not copied (see `parts.rs`). Other
//! bytes are copied in and out at this boundary, and every blocking wait
//! releases the GIL.

mod arenas;
mod json;
mod memfd;
mod parts;
mod received;
mod worker;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a caller blocked in `Client.wait` checks for signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(20);

use distripool_protocol::HandshakeError;
use distripool_runtime::executor::{ExecutorSpec, Share};
use distripool_runtime::orchestrator::FailureKind;
use distripool_runtime::{
    AgentConfig, Error, JobId, OrchestratorConfig, Outcome, Security, Timing, TlsFiles, Waited, WorkerId,
};
use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use std::sync::atomic::Ordering;

/// One completion as the `(job, index, status, data)` tuple `Client.recv`
/// and `Client.wait` return.
fn completion(py: Python<'_>, c: distripool_runtime::Completion) -> PyResult<Bound<'_, PyTuple>> {
    let (status, data) = match c.outcome {
        Outcome::Done(bytes) if received::stays(&bytes) => {
            (Status::Done, Bound::new(py, received::Received::new(bytes))?.into_any())
        }
        Outcome::Done(bytes) => (Status::Done, PyBytes::new(py, &bytes).into_any()),
        Outcome::Failed { kind, reason } => {
            let status = match kind {
                FailureKind::Crashes => Status::Crashes,
                FailureKind::Losses => Status::Losses,
                FailureKind::Timeout => Status::Timeout,
            };
            (status, reason.into_pyobject(py)?.into_any())
        }
    };
    (c.job.0, c.index, status as u8, data).into_pyobject(py)
}

/// How a completion ended, as the integer `Client.recv` and `Client.wait`
/// return; exported as `_native.STATUS_*`, the only definition.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Status {
    /// `data` is the task's pickled outcome.
    Done = 0,
    /// Its executors kept dying; `data` is the reason.
    Crashes = 1,
    /// Its workers kept being lost; `data` is the reason.
    Losses = 2,
    /// It ran past its time limit; `data` is the reason.
    Timeout = 3,
}

pyo3::import_exception!(distripool.exceptions, OrchestratorClosedError);
pyo3::import_exception!(distripool.exceptions, AuthenticationError);
pyo3::import_exception!(distripool.exceptions, ProtocolVersionError);
pyo3::import_exception!(distripool.exceptions, ExecutorStartError);

/// The one mapping of runtime errors onto Python exceptions: the standard
/// types a `multiprocessing` or socket user expects, and distripool's own
/// (defined in `distripool.exceptions`) for what only it can raise.
fn to_py(e: Error) -> PyErr {
    use distripool_runtime::SessionEnd;
    match e {
        Error::Config(m) => PyValueError::new_err(m),
        Error::Tls(m) => PyConnectionError::new_err(m),
        Error::Io(e) => PyOSError::new_err(e.to_string()),
        Error::Frame(e) => PyConnectionError::new_err(e.to_string()),
        Error::Cipher(e) => PyConnectionError::new_err(e.to_string()),
        Error::Handshake(h @ HandshakeError::VersionMismatch { .. }) => {
            ProtocolVersionError::new_err(h.to_string())
        }
        Error::Handshake(e) => AuthenticationError::new_err(format!("authentication failed: {e}")),
        Error::Timeout(what) => PyTimeoutError::new_err(format!("timed out: {what}")),
        Error::Closed => OrchestratorClosedError::new_err("the orchestrator is closed"),
        Error::TooLarge(m) => PyValueError::new_err(m),
        Error::Listen { addr, source } => match source.raw_os_error() {
            // As Python's own OSError reads: "[Errno 98] ...: address in use".
            Some(errno) => PyOSError::new_err((errno, format!("cannot listen on {addr}: {}", source.kind()))),
            None => PyOSError::new_err(format!("cannot listen on {addr}: {source}")),
        },
        Error::Fatal(end @ SessionEnd::Executors(_)) => ExecutorStartError::new_err(end.to_string()),
        e @ Error::Fatal(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Today's timing with the values named in `values` (seconds) changed.
fn timing(values: Option<Vec<(String, f64)>>) -> PyResult<Timing> {
    let mut t = Timing::default();
    for (name, seconds) in values.unwrap_or_default() {
        t.set(&name, seconds).map_err(to_py)?;
    }
    t.validate().map_err(to_py)?;
    Ok(t)
}

fn security(
    key: Vec<u8>,
    cluster: Option<String>,
    encrypt: bool,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
) -> Security {
    let default = Security::default();
    Security {
        key,
        cluster: cluster.unwrap_or(default.cluster),
        encrypt,
        tls: tls.map(|(ca, cert, key)| TlsFiles { ca, cert, key }),
    }
}

/// An orchestrator running on its own threads inside this process.
#[pyclass(module = "distripool._native")]
struct Orchestrator {
    inner: Mutex<Option<distripool_runtime::Orchestrator>>,
}

impl Orchestrator {
    /// Run `f` on the orchestrator (None once closed) without the GIL. The
    /// lock is taken after the GIL is released, never while holding it and
    /// waiting: a thread that holds the lock never needs the GIL.
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&distripool_runtime::Orchestrator) -> R + Send,
    ) -> Option<R> {
        py.detach(|| self.inner.lock().expect("orchestrator lock").as_ref().map(f))
    }
}

#[pymethods]
impl Orchestrator {
    #[new]
    #[pyo3(signature = (
        listen, key, max_crashes = 3, max_frame = None, cluster = None, encrypt = true, tls = None, timing = None,
        dashboard = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        listen: Vec<String>,
        key: Vec<u8>,
        max_crashes: u32,
        max_frame: Option<usize>,
        cluster: Option<String>,
        encrypt: bool,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        timing: Option<Vec<(String, f64)>>,
        dashboard: Option<String>,
    ) -> PyResult<Self> {
        let security = security(key, cluster, encrypt, tls);
        let timing = self::timing(timing)?;
        let mut config =
            OrchestratorConfig { listen, security, max_crashes, timing, dashboard, ..Default::default() };
        if let Some(m) = max_frame {
            config.max_frame = m;
        }
        let orch = py.detach(|| distripool_runtime::Orchestrator::start(config)).map_err(to_py)?;
        Ok(Self { inner: Mutex::new(Some(orch)) })
    }

    /// The bound addresses as `host:port` strings.
    #[getter]
    fn addresses(&self) -> Vec<String> {
        let guard = self.inner.lock().expect("orchestrator lock");
        guard.as_ref().map(|o| o.local_addrs().iter().map(|a| a.to_string()).collect()).unwrap_or_default()
    }

    /// The dashboard's URL (with its token, where one is needed), or None.
    #[getter]
    fn dashboard_url(&self) -> Option<String> {
        let guard = self.inner.lock().expect("orchestrator lock");
        guard.as_ref()?.dashboard().map(|d| d.url().to_string())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().expect("orchestrator lock").is_none()
    }

    /// Start `processes` local executors attached without any port.
    #[pyo3(signature = (processes, python, module, env))]
    fn start_local_agent(
        &self,
        processes: usize,
        python: String,
        module: String,
        env: Vec<(String, String)>,
    ) -> PyResult<()> {
        let guard = self.inner.lock().expect("orchestrator lock");
        let orch = guard.as_ref().ok_or_else(|| to_py(Error::Closed))?;
        let config = AgentConfig {
            connect: Vec::new(),
            security: Security::default(),
            processes,
            executor: ExecutorSpec {
                python,
                module,
                env,
                max_frame: 0,
                memory: None,
                share: Share::Functions,
            },
            // The orchestrator's own.
            timing: Timing::default(),
            labels: Vec::new(),
            idle_timeout: None,
            time_limit: None,
            ready_file: None,
            leave: None,
            serve_peers: false,
        };
        orch.start_local_agent(config).map_err(to_py)
    }

    fn open_client(&self) -> PyResult<Client> {
        let guard = self.inner.lock().expect("orchestrator lock");
        let orch = guard.as_ref().ok_or_else(|| to_py(Error::Closed))?;
        Ok(Client { inner: orch.open_client().map_err(to_py)? })
    }

    /// Connected workers, read without asking the core (cheap: pools read
    /// `slots` at every map).
    #[getter]
    fn workers(&self) -> usize {
        let guard = self.inner.lock().expect("orchestrator lock");
        guard.as_ref().map_or(0, |o| o.stats().workers.load(Ordering::Relaxed))
    }

    /// Executors across the connected workers, read the same way.
    #[getter]
    fn slots(&self) -> usize {
        let guard = self.inner.lock().expect("orchestrator lock");
        guard.as_ref().map_or(0, |o| o.stats().slots.load(Ordering::Relaxed))
    }

    /// Counters: connected workers, their executor slots, rejected peers,
    /// tasks done, queued and running.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let read = self.with(py, |o| {
            let s = o.stats();
            let size = |c: &std::sync::atomic::AtomicUsize| c.load(Ordering::Relaxed) as u64;
            let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let counters = [
                ("workers_left", count(&s.workers_left)),
                ("workers", size(&s.workers)),
                ("slots", size(&s.slots)),
                ("auth_failures", size(&s.auth_failures)),
                ("handshake_failures", size(&s.handshake_failures)),
                ("tasks_done", count(&s.tasks_done)),
                ("tasks_submitted", count(&s.tasks_submitted)),
                ("tasks_retried", count(&s.tasks_retried)),
                ("tasks_failed", count(&s.tasks_failed) + count(&s.tasks_raised)),
                ("crashes", count(&s.crashes)),
                ("workers_lost", count(&s.workers_lost)),
                ("bytes_sent", count(&s.bytes_sent)),
                ("bytes_received", count(&s.bytes_received)),
                ("functions_fetched", count(&s.functions_fetched)),
            ];
            (o.metrics(), counters)
        });
        if let Some((metrics, counters)) = read {
            let m = metrics.map_err(to_py)?;
            d.set_item("tasks_queued", m.tasks_queued)?;
            d.set_item("tasks_running", m.tasks_running)?;
            for (name, value) in counters {
                d.set_item(name, value)?;
            }
        }
        Ok(d)
    }

    /// One dict per connected worker, in the order they joined (the keys of
    /// the dashboard's `api/v1/workers`).
    fn workers_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let Some(snap) = self.with(py, |o| o.snapshot()) else { return Ok(out) };
        for w in snap.map_err(to_py)?.workers {
            out.append(json::from_json(py, &distripool_runtime::dashboard::worker_value(&w))?)?;
        }
        Ok(out)
    }

    /// The events numbered `since` and after that are still kept, oldest
    /// first, as dicts with `seq`, `time` (seconds since the epoch), `kind`
    /// and the event's own fields (as the dashboard's `api/v1/events`).
    #[pyo3(signature = (since = 0))]
    fn events<'py>(&self, py: Python<'py>, since: u64) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let Some(events) = self.with(py, |o| o.events(since)) else { return Ok(out) };
        let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
        for e in events.map_err(to_py)? {
            out.append(json::from_json(py, &distripool_runtime::dashboard::event_value(&e, now, wall))?)?;
        }
        Ok(out)
    }

    /// Ask a worker to finish what it holds, take nothing new and leave.
    /// False if no worker with that id is connected.
    fn drain(&self, py: Python<'_>, worker: u64) -> PyResult<bool> {
        self.with(py, |o| o.drain(WorkerId(worker))).ok_or_else(|| to_py(Error::Closed))?.map_err(to_py)
    }

    /// Stop everything and free the ports. Safe to call twice. Idle
    /// executors of in-process agents exit by themselves (their exit
    /// handlers run) unless `graceful` is false: then they are killed.
    #[pyo3(signature = (graceful = true))]
    fn close(&self, py: Python<'_>, graceful: bool) {
        let orch = self.inner.lock().expect("orchestrator lock").take();
        if let Some(mut o) = orch {
            py.detach(move || o.close_with(graceful));
        }
    }
}

/// Bytes that executors load before a task's function (the driver's main
/// module, say), copied and hashed once however many jobs need them.
#[pyclass(module = "distripool._native", frozen)]
struct Blob {
    inner: distripool_runtime::Blob,
}

#[pymethods]
impl Blob {
    #[new]
    fn new(py: Python<'_>, data: &Bound<'_, PyBytes>) -> Self {
        let bytes = parts::held_or_copied(data);
        Self { inner: parts::hashing(py, bytes.len(), || distripool_runtime::Blob::new(bytes)) }
    }

    /// Its content address, as executors know it.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id.0
    }

    fn __len__(&self) -> usize {
        self.inner.bytes.len()
    }
}

/// One pool's connection to an orchestrator.
#[pyclass(module = "distripool._native")]
struct Client {
    inner: distripool_runtime::Client,
}

#[pymethods]
impl Client {
    /// This client's number, as the orchestrator's events name it.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id().0
    }

    fn new_job(&self) -> u64 {
        self.inner.new_job().0
    }

    /// Queue `(index, payload)` tasks of `job`, each calling `function` and
    /// allowed to run for at most `timeout` seconds; executors load the
    /// blobs `needs` before the function. A payload is `bytes`, or a list of
    /// bytes-like parts sent back to back without being joined.
    #[pyo3(signature = (job, function, tasks, timeout = None, needs = Vec::new()))]
    fn submit(
        &self,
        py: Python<'_>,
        job: u64,
        function: &Bound<'_, PyBytes>,
        tasks: Vec<(u32, Bound<'_, PyAny>)>,
        timeout: Option<f64>,
        needs: Vec<PyRef<'_, Blob>>,
    ) -> PyResult<()> {
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(PyValueError::new_err(format!("task timeout must be a positive number, not {t}")))
            }
        };
        // Small payloads are copied out of Python's memory; large parts
        // travel apart, a `bytes` held rather than copied (see parts.rs).
        let tasks = tasks
            .into_iter()
            .map(|(i, p)| Ok((i, parts::payload(p.py(), &p)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let needs = needs.iter().map(|b| b.inner.clone()).collect();
        let function = parts::held_or_copied(function);
        // The function's content id is a hash of all of it.
        parts::hashing(py, function.len(), || self.inner.submit(JobId(job), function, needs, tasks, timeout))
            .map_err(to_py)
    }

    /// Completions ready within `timeout` seconds, as `(job, index, status,
    /// data)` tuples. `status` 0: done, `data` is the pickled outcome; 1: its
    /// executors kept dying; 2: its workers kept being lost; 3: it ran past
    /// its time limit. For 1 to 3, `data` is the reason.
    fn recv<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
        let wait = Duration::from_secs_f64(timeout.max(0.0));
        let batch = py.detach(|| self.inner.recv(wait)).map_err(to_py)?;
        let out = PyList::empty(py);
        for c in batch {
            out.append(completion(py, c)?)?;
        }
        Ok(out)
    }

    /// Say that the caller will wait for `job` itself (`wait`): its
    /// completion will not be returned by `recv`. Call before `submit`.
    fn expect(&self, job: u64) {
        self.inner.expect(JobId(job));
    }

    /// Wait for an expected job's completion, as a `(job, index, status,
    /// data)` tuple, with the GIL released. Signals are checked every few
    /// milliseconds; if a handler raises, the job is no longer expected (its
    /// completion goes to `recv` after all) and the exception propagates.
    fn wait<'py>(&self, py: Python<'py>, job: u64) -> PyResult<Bound<'py, PyTuple>> {
        loop {
            match py.detach(|| self.inner.wait(JobId(job), SIGNAL_CHECK)) {
                Ok(Some(c)) => return completion(py, c),
                Ok(None) => {}
                Err(e) => return Err(to_py(e)),
            }
            if let Err(e) = py.check_signals() {
                self.inner.forget(JobId(job));
                return Err(e);
            }
        }
    }

    /// Stop waiting for `job` directly: its completion, in or still to
    /// come, goes to `recv`, and a caller in `wait_offered` returns None.
    fn forget(&self, job: u64) {
        self.inner.forget(JobId(job));
    }

    /// Say that the caller may wait for `job` itself (`wait_offered`); if
    /// its completion arrives while nobody waits, `recv` returns it. Call
    /// before `submit`.
    fn offer(&self, job: u64) {
        self.inner.offer(JobId(job));
    }

    /// Wait up to `timeout` seconds (None: for ever) for an offered job's
    /// completion, with the GIL released: the `(job, index, status, data)`
    /// tuple, or None if it is not in within `timeout` or went elsewhere (to
    /// `recv`, or to another caller). Signals are checked every few
    /// milliseconds; a handler's exception propagates. With `into`, the
    /// tuple is also set as `into._taken` before this returns: Ctrl-C's
    /// exception may be raised as the call returns, and the caller then
    /// still finds the completion it took there.
    #[pyo3(signature = (job, timeout = None, into = None))]
    fn wait_offered<'py>(
        &self,
        py: Python<'py>,
        job: u64,
        timeout: Option<f64>,
        into: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let deadline = match timeout {
            Some(t) if t.is_nan() => return Err(PyValueError::new_err("timeout must be a number, not nan")),
            Some(t) if t.is_finite() => Some(Instant::now() + Duration::from_secs_f64(t.clamp(0.0, 1e9))),
            _ => None,
        };
        loop {
            let step = deadline
                .map_or(SIGNAL_CHECK, |d| d.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK));
            match py.detach(|| self.inner.wait_offered(JobId(job), step)) {
                Ok(Waited::Done(c)) => {
                    let taken = completion(py, c)?;
                    if let Some(into) = &into {
                        into.setattr("_taken", &taken)?;
                    }
                    return Ok(Some(taken));
                }
                Ok(Waited::Elsewhere) => return Ok(None),
                Ok(Waited::TimedOut) => {}
                Err(e) => return Err(to_py(e)),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            py.check_signals()?;
        }
    }

    /// Withdraw the job's tasks that no worker has started; returns their
    /// indexes (those tasks will never complete).
    fn withdraw(&self, py: Python<'_>, job: u64) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.withdraw(JobId(job))).map_err(to_py)
    }

    /// Say what `job` is, for the orchestrator's dashboard: `kind` (`map`,
    /// `apply`, ...), the function's `name`, its number of `items` if known.
    #[pyo3(signature = (job, kind, name, items = None))]
    fn describe(&self, job: u64, kind: String, name: String, items: Option<u64>) -> PyResult<()> {
        self.inner.describe(JobId(job), kind, name, items).map_err(to_py)
    }

    /// Task `index` of `job` returned an exception that its function raised;
    /// `text` is its traceback (or empty).
    fn raised(&self, job: u64, index: u32, text: String) -> PyResult<()> {
        self.inner.raised(JobId(job), index, text).map_err(to_py)
    }

    /// Cancel this client's tasks; no more completions will arrive.
    fn close(&self) {
        self.inner.close();
    }
}

/// Send the core's log records to stderr, filtered like `RUST_LOG`
/// (for example `info` or `distripool_runtime=debug`).
#[pyfunction]
fn enable_logging(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Orchestrator>()?;
    m.add_class::<Client>()?;
    m.add_class::<Blob>()?;
    m.add_function(wrap_pyfunction!(worker::run_agent, m)?)?;
    m.add_function(wrap_pyfunction!(enable_logging, m)?)?;
    m.add_function(wrap_pyfunction!(worker::usable_cpus, m)?)?;
    m.add_function(wrap_pyfunction!(arenas::keep_arenas, m)?)?;
    m.add_function(wrap_pyfunction!(memfd::read_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(memfd::join_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(memfd::write_buffer, m)?)?;
    m.add_class::<memfd::SharedMapping>()?;
    m.add_class::<received::Received>()?;
    m.add("PROTOCOL_VERSION", distripool_runtime::PROTOCOL_VERSION)?;
    m.add("DEFAULT_MAX_FRAME", distripool_runtime::DEFAULT_MAX_FRAME)?;
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add("STATUS_DONE", Status::Done as u8)?;
    m.add("STATUS_CRASHES", Status::Crashes as u8)?;
    m.add("STATUS_LOSSES", Status::Losses as u8)?;
    m.add("STATUS_TIMEOUT", Status::Timeout as u8)?;
    use distripool_runtime::executor as x;
    let kinds = [
        ("FUNCTION", x::KIND_FUNCTION),
        ("TASK", x::KIND_TASK),
        ("FORGET", x::KIND_FORGET),
        ("RESULT", x::KIND_RESULT),
        ("RETIRE", x::KIND_RETIRE),
        ("READY", x::KIND_READY),
        ("TASK_SHARED", x::KIND_TASK_SHARED),
        ("FUNCTION_SHARED", x::KIND_FUNCTION_SHARED),
    ];
    m.add("EXECUTOR_FRAME_KINDS", kinds.into_iter().collect::<std::collections::HashMap<_, _>>())?;
    Ok(())
}
