//! The worker agent: dials an orchestrator, authenticates, and runs the tasks
//! it is given on a fixed number of executor processes.
//!
//! One *session* is one authenticated connection. Within it the agent keeps a
//! local queue of tasks; each executor slot holds [`DEPTH`] of them, or, while
//! its tasks are short, about [`QUEUE_BUDGET`] of work, up to [`DEEP`]
//! (one running, the rest already written to its socket so it never waits on
//! a round trip). When an executor dies, the task it was running is reported
//! as crashed and the ones merely queued behind it go back to the local queue
//! without counting against them; the slot gets a fresh executor.
//!
//! When a session ends — the orchestrator closed, went silent, or the
//! connection broke — every executor is killed, so no task outlives the
//! session that asked for it, and the agent dials again with capped,
//! jittered exponential backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_protocol::{FromAgent, SessionKeys, ToAgent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::conn::{
    client_handshake, tune_tcp, AbortOnDrop, FrameReader, FrameWriter, Outgoing, HANDSHAKE_TIMEOUT,
    HEARTBEAT, PEER_TIMEOUT,
};
use crate::executor::{self, ExecEvent, ExecIn, ExecutorHandle, ExecutorSpec};
use crate::security::{explain_tls, Dialer, Security};
use crate::{resolve, Error, Result};

/// Tasks held by one executor at once: one running, the rest prefetched.
pub const DEPTH: usize = 2;
/// Most tasks held by one executor. With tasks of a few microseconds it would
/// otherwise idle on the round trip through the agent and the orchestrator.
pub const DEEP: usize = 32;
/// Work an executor holds, in its recent tasks' time: the depth is the
/// power of two nearest below `QUEUE_BUDGET / typical task`, from [`DEPTH`]
/// to [`DEEP`]. Long tasks keep [`DEPTH`], so that few wait behind one
/// another while another executor is free, and the work left queued at the
/// end of a map stays under about this long per executor.
const QUEUE_BUDGET: Duration = Duration::from_millis(2);
/// Executors of one slot that may die in a row before they are ready, before
/// the session gives up (a broken Python installation, say).
const MAX_START_FAILURES: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Orchestrator addresses, tried in turn.
    pub connect: Vec<String>,
    pub security: Security,
    pub processes: usize,
    pub executor: ExecutorSpec,
}

/// Serve orchestrators until `stop` becomes true. Connection and
/// authentication failures are logged and retried; they never end the agent.
pub async fn run_agent(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<()> {
    if config.connect.is_empty() {
        return Err(Error::Config("no orchestrator address to connect to".into()));
    }
    let dialer = Dialer::new(&config.security)?;
    let binding = config.security.binding();
    let mut backoff = BACKOFF_START;
    let mut target = 0usize;
    loop {
        let addr = &config.connect[target % config.connect.len()];
        target += 1;
        let attempt = async {
            let sockaddr = resolve(addr)?;
            // A SYN into a partition is retried by the kernel for minutes;
            // give up sooner and try again on the backoff schedule.
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sockaddr))
                .await
                .map_err(|_| Error::Timeout("connecting to the orchestrator"))??;
            tune_tcp(&tcp)?;
            let authenticate = async {
                let mut stream = dialer.wrap(tcp, addr).await?;
                let (session, keys) = client_handshake(&mut stream, &config.security.key, &binding).await?;
                Ok::<_, Error>((stream, session, keys))
            };
            tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate)
                .await
                .map_err(|_| Error::Timeout("handshake with the orchestrator"))?
                .map_err(|e| explain_tls(e, addr))
        };
        let outcome = tokio::select! {
            r = attempt => r,
            _ = stop.changed() => return Ok(()),
        };
        match outcome {
            Ok((stream, session, keys)) => {
                tracing::info!("connected to orchestrator {addr} (session {session})");
                backoff = BACKOFF_START;
                let end = tokio::select! {
                    end = run_session(stream, &config, binding.sealed.then_some(keys)) => end,
                    _ = stop.changed() => return Ok(()),
                };
                tracing::warn!("session with {addr} ended: {end}; reconnecting");
            }
            Err(Error::Handshake(e)) if e.is_auth_failure() => {
                tracing::error!(
                    "authentication with orchestrator {addr} failed: {e}; check that both sides use the same key \
                     (--authkey-file, DISTRIPOOL_AUTHKEY or DISTRIPOOL_AUTHKEY_FILE); retrying"
                );
            }
            Err(e @ (Error::Handshake(_) | Error::Tls(_))) => {
                tracing::error!("cannot join orchestrator {addr}: {e}; retrying");
            }
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => tracing::warn!(
                "orchestrator {addr} closed the connection during the handshake (it may be busy with many \
                 joining workers, or set up for TLS while this worker is not); retrying"
            ),
            Err(e) => tracing::info!("orchestrator {addr} not available ({e}); retrying"),
        }
        let jitter = Duration::from_millis(u64::from(crate::random_bytes::<1>()[0]) % 100);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Inflight {
    task: u64,
    attempt: u32,
    cancelled: bool,
    /// When the executor started on it (it reached the front of the slot).
    started: Option<Instant>,
}

struct Queued {
    task: u64,
    attempt: u32,
    fn_id: u64,
    payload: Bytes,
    timeout: Option<Duration>,
}

struct Slot {
    handle: ExecutorHandle,
    generation: u64,
    /// The executor announced a clean exit; it gets no more tasks.
    retiring: bool,
    /// The executor said it is up; before that, its death is not its task's fault.
    ready: bool,
    /// Executors of this slot that died before they were ready, in a row.
    start_failures: u32,
    /// Running time of this slot's recent tasks (moving average).
    typical_task: Option<Duration>,
    inflight: VecDeque<(Inflight, Queued)>,
    fns: HashSet<u64>,
}

struct Session {
    slots: Vec<Slot>,
    queue: VecDeque<Queued>,
    fns: HashMap<u64, Bytes>,
    out: mpsc::UnboundedSender<Outgoing<FromAgent>>,
    events: mpsc::UnboundedSender<ExecEvent>,
    generations: u64,
    /// How executors are started, with the session's frame limit.
    spec: ExecutorSpec,
    /// The capacity last announced to the orchestrator.
    advertised: usize,
}

/// Run one authenticated session to its end; returns why it ended. With
/// `keys`, every frame is sealed and opened with them (a network connection);
/// without, frames travel in the clear (an in-process stream).
pub async fn run_session<S>(stream: S, config: &AgentConfig, keys: Option<SessionKeys>) -> String
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let max_frame = config.executor.max_frame;
    let (rd, wr) = tokio::io::split(stream);
    let (sealer, opener) = match keys {
        Some(k) => (Some(k.send), Some(k.recv)),
        None => (None, None),
    };
    let mut reader = FrameReader::new(rd, max_frame).with_opener(opener).with_silence_limit(PEER_TIMEOUT);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing<FromAgent>>();
    let writer = AbortOnDrop(tokio::spawn(async move {
        let mut w = FrameWriter::new(wr, max_frame).with_sealer(sealer);
        // Our own heartbeat, whatever the orchestrator sends: while it is busy
        // sending us a large frame, its pings wait behind it.
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            let first = tokio::select! {
                f = out_rx.recv() => match f { Some(f) => f, None => break },
                _ = heartbeat.tick() => Outgoing::new(FromAgent::Pong { seq: 0 }),
            };
            let mut next = Some(first);
            while let Some(f) = next {
                if let Err(e) = w.write(&f.msg, &f.payload).await {
                    return format!("cannot send to the orchestrator: {e}");
                }
                next = out_rx.try_recv().ok();
            }
            if let Err(e) = w.flush().await {
                return format!("cannot send to the orchestrator: {e}");
            }
        }
        String::new()
    }));

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut s = Session {
        slots: Vec::with_capacity(config.processes),
        queue: VecDeque::new(),
        fns: HashMap::new(),
        out: out_tx,
        events: ev_tx,
        generations: 0,
        spec: config.executor.clone(),
        advertised: config.processes * DEPTH,
    };
    let _ = s.out.send(Outgoing::new(FromAgent::Ready {
        slots: config.processes as u32,
        host: hostname(),
        pid: std::process::id(),
    }));
    // The orchestrator answers with its limits before anything else; results
    // larger than its frame cap must fail in the executor, not on the wire.
    match tokio::time::timeout(PEER_TIMEOUT, reader.read_frame()).await {
        Ok(Ok(Some(f))) => match f.message::<ToAgent>() {
            Ok(ToAgent::Limits { max_frame }) => {
                s.spec.max_frame = s.spec.max_frame.min(usize::try_from(max_frame).unwrap_or(usize::MAX));
            }
            _ => return "the orchestrator did not start with its limits".to_string(),
        },
        Ok(Ok(None)) => return "the orchestrator closed the connection".to_string(),
        Ok(Err(e)) => return format!("connection error: {e}"),
        Err(_) => return format!("no word from the orchestrator for {PEER_TIMEOUT:?}"),
    }
    for slot in 0..config.processes {
        match s.start_executor(slot) {
            Ok((handle, generation)) => s.slots.push(Slot {
                handle,
                generation,
                retiring: false,
                ready: false,
                start_failures: 0,
                typical_task: None,
                inflight: VecDeque::new(),
                fns: HashSet::new(),
            }),
            Err(e) => return e,
        }
    }

    let mut writer = writer;
    // One timer for the session, moved only when a deadline earlier than the
    // one it is set for appears; when it fires early (the task it was set for
    // is done), it is set again. Not a timer per pass of the loop.
    let timer = tokio::time::sleep_until(far_future());
    tokio::pin!(timer);
    let mut armed: Option<tokio::time::Instant> = None;
    loop {
        if let Some(deadline) = s.next_deadline() {
            if armed.is_none_or(|at| deadline < at) {
                timer.as_mut().reset(deadline);
                armed = Some(deadline);
            }
        }
        let step = tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(ev) => s.on_executor_event(ev),
                None => Err("executor events closed".to_string()),
            },
            frame = reader.read_frame() => match frame {
                Err(Error::Timeout(_)) => Err(format!("no word from the orchestrator for {PEER_TIMEOUT:?}")),
                Err(e) => Err(format!("connection error: {e}")),
                Ok(None) => Err("the orchestrator closed the connection".to_string()),
                Ok(Some(frame)) => match frame.message::<ToAgent>() {
                    Ok(msg) => s.on_message(msg, frame.payload),
                    Err(e) => Err(format!("bad message from the orchestrator: {e}")),
                },
            },
            end = &mut writer.0 => Err(end.unwrap_or_else(|e| e.to_string())),
            () = timer.as_mut(), if armed.is_some() => {
                armed = None;
                s.review_depths();
                s.expire_timeouts()
            }
        };
        if let Err(reason) = step.and_then(|()| s.feed()) {
            return reason;
        }
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

impl Slot {
    /// Tasks this slot's executor may hold: more while its tasks are short.
    fn depth(&self) -> usize {
        match self.typical_task {
            Some(t) => {
                let fits = (QUEUE_BUDGET.as_nanos() / t.as_nanos().max(1)).min(DEEP as u128) as usize;
                // Whole powers of two, so that small changes in task time do
                // not change the capacity announced.
                if fits <= DEPTH {
                    DEPTH
                } else {
                    1 << fits.ilog2()
                }
            }
            None => DEPTH,
        }
    }
}

impl Session {
    /// Tell the orchestrator how many tasks to send, when that changes.
    fn announce_capacity(&mut self) {
        let want: usize = self.slots.iter().map(Slot::depth).sum();
        if want != self.advertised {
            self.advertised = want;
            let _ = self.out.send(Outgoing::new(FromAgent::Capacity { tasks: want as u32 }));
        }
    }

    /// The earliest moment a running task goes past its time limit, or runs
    /// long enough to show that its slot holds too many tasks.
    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.slots
            .iter()
            .filter_map(|s| {
                let (i, q) = s.inflight.front()?;
                let started = i.started?;
                let review = (s.depth() > DEPTH).then(|| started + QUEUE_BUDGET);
                let limit = q.timeout.map(|t| started + t);
                [review, limit].into_iter().flatten().min()
            })
            .min()
            .map(Into::into)
    }

    /// A slot deep enough for short tasks whose running task has taken longer
    /// than the whole budget goes back to [`DEPTH`] now, not when that task
    /// ends, so that the orchestrator keeps the tasks behind it (they can go
    /// to another executor, or be withdrawn).
    fn review_depths(&mut self) {
        let now = Instant::now();
        for s in &mut self.slots {
            if s.depth() <= DEPTH {
                continue;
            }
            if let Some(started) = s.inflight.front().and_then(|(i, _)| i.started) {
                let running = now.saturating_duration_since(started);
                if running >= QUEUE_BUDGET {
                    s.typical_task = Some(running);
                }
            }
        }
        self.announce_capacity();
    }

    /// Kill the executors whose running task is past its time limit.
    fn expire_timeouts(&mut self) -> std::result::Result<(), String> {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let expired = matches!(
                s.inflight.front(),
                Some((i, q)) if !i.cancelled && matches!((i.started, q.timeout), (Some(t0), Some(t)) if now >= t0 + t)
            );
            if !expired {
                continue;
            }
            let (running, q) = s.inflight.pop_front().expect("front exists");
            let reason = format!(
                "ran longer than its time limit of {:?}; its executor (pid {}) was killed",
                q.timeout.unwrap_or_default(),
                s.handle.pid
            );
            tracing::warn!("task {} {reason}", running.task);
            let _ = self.out.send(Outgoing::new(FromAgent::TimedOut {
                task: running.task,
                attempt: running.attempt,
                reason,
            }));
            self.restart(slot)?;
        }
        Ok(())
    }

    fn start_executor(&mut self, slot: usize) -> std::result::Result<(ExecutorHandle, u64), String> {
        self.generations += 1;
        let generation = self.generations;
        executor::spawn(&self.spec, slot, generation, self.events.clone())
            .map(|h| (h, generation))
            .map_err(|e| format!("cannot start an executor with {:?}: {e}", self.spec.python))
    }

    /// Replace the executor of `slot`; the old one's process group is killed.
    fn restart(&mut self, slot: usize) -> std::result::Result<(), String> {
        let (handle, generation) = self.start_executor(slot)?;
        let s = &mut self.slots[slot];
        s.handle = handle;
        s.generation = generation;
        s.retiring = false;
        s.ready = false;
        s.fns.clear();
        // Whatever was prefetched behind the running task goes back in line.
        let requeue: Vec<_> = s.inflight.drain(..).filter(|(i, _)| !i.cancelled).map(|(_, q)| q).collect();
        for q in requeue.into_iter().rev() {
            self.queue.push_front(q);
        }
        Ok(())
    }

    fn on_executor_event(&mut self, ev: ExecEvent) -> std::result::Result<(), String> {
        match ev {
            ExecEvent::Result { slot, generation, task, payload } => {
                let s = &mut self.slots[slot];
                if s.generation != generation {
                    return Ok(());
                }
                let Some((done, _)) = s.inflight.pop_front() else {
                    return Err(format!("executor in slot {slot} answered a task it was not given"));
                };
                if done.task != task {
                    return Err(format!(
                        "executor in slot {slot} answered task {task}, expected {}",
                        done.task
                    ));
                }
                if !done.cancelled {
                    let _ = self.out.send(Outgoing::with_payload(
                        FromAgent::Result { task, attempt: done.attempt },
                        payload,
                    ));
                }
                // Learn how long this slot's tasks take, then start the next.
                let now = Instant::now();
                if let Some(t0) = done.started {
                    let took = now.saturating_duration_since(t0);
                    s.typical_task = Some(s.typical_task.map_or(took, |avg| (avg * 3 + took) / 4));
                }
                if let Some((next, _)) = s.inflight.front_mut() {
                    next.started = Some(now);
                }
                self.announce_capacity();
                Ok(())
            }
            ExecEvent::Ready { slot, generation } => {
                let s = &mut self.slots[slot];
                if s.generation == generation {
                    s.ready = true;
                    s.start_failures = 0;
                    if let Some((running, _)) = s.inflight.front_mut() {
                        running.started = Some(Instant::now());
                    }
                }
                Ok(())
            }
            ExecEvent::Retiring { slot, generation } => {
                let s = &mut self.slots[slot];
                if s.generation == generation {
                    s.retiring = true;
                }
                Ok(())
            }
            ExecEvent::Exited { slot, generation, reason } => {
                let s = &mut self.slots[slot];
                if s.generation != generation {
                    return Ok(());
                }
                if s.retiring {
                    // A clean recycle: whatever it still held was never started.
                    return self.restart(slot);
                }
                if !s.ready {
                    // It died starting up: what it held never ran. Retry,
                    // unless executors cannot start at all here.
                    s.start_failures += 1;
                    if s.start_failures >= MAX_START_FAILURES {
                        return Err(format!(
                            "{MAX_START_FAILURES} executors in a row died before they started; the last: {reason}"
                        ));
                    }
                    tracing::warn!("executor died while starting: {reason}");
                    return self.restart(slot);
                }
                if let Some((running, _)) = s.inflight.pop_front() {
                    if !running.cancelled {
                        tracing::warn!("task {} crashed: {reason}", running.task);
                        let _ = self.out.send(Outgoing::new(FromAgent::Crashed {
                            task: running.task,
                            attempt: running.attempt,
                            reason,
                        }));
                    }
                }
                self.restart(slot)
            }
        }
    }

    fn on_message(&mut self, msg: ToAgent, payload: Bytes) -> std::result::Result<(), String> {
        match msg {
            ToAgent::Function { fn_id } => {
                self.fns.insert(fn_id, payload);
            }
            ToAgent::Forget { fn_id } => {
                self.fns.remove(&fn_id);
                for s in &mut self.slots {
                    if s.fns.remove(&fn_id) {
                        let _ = s.handle.tx.send(ExecIn::Forget { fn_id });
                    }
                }
            }
            ToAgent::Task { task, attempt, fn_id, timeout_ms } => {
                let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
                self.queue.push_back(Queued { task, attempt, fn_id, payload, timeout });
            }
            ToAgent::Cancel { tasks } => {
                let cancel: HashSet<u64> = tasks.into_iter().collect();
                self.queue.retain(|q| !cancel.contains(&q.task));
                for slot in 0..self.slots.len() {
                    let mut hit = false;
                    for (i, _) in self.slots[slot].inflight.iter_mut() {
                        if cancel.contains(&i.task) {
                            i.cancelled = true;
                            hit = true;
                        }
                    }
                    if hit {
                        self.restart(slot)?;
                    }
                }
            }
            ToAgent::Limits { .. } => {
                return Err("the orchestrator sent its limits twice".to_string());
            }
            ToAgent::Ping { seq } => {
                let _ = self.out.send(Outgoing::new(FromAgent::Pong { seq }));
            }
        }
        Ok(())
    }

    /// Give queued tasks to executors: first one each, then a second each,
    /// and so on up to each slot's depth.
    fn feed(&mut self) -> std::result::Result<(), String> {
        for depth in 1..=DEEP {
            for slot in 0..self.slots.len() {
                if self.queue.is_empty() {
                    return Ok(());
                }
                let s = &self.slots[slot];
                if s.retiring || s.inflight.len() >= depth || depth > s.depth() {
                    continue;
                }
                let q = self.queue.pop_front().expect("queue is not empty");
                let s = &mut self.slots[slot];
                if s.fns.insert(q.fn_id) {
                    let Some(bytes) = self.fns.get(&q.fn_id) else {
                        return Err(format!(
                            "task {} needs function {:x}, which was never sent",
                            q.task, q.fn_id
                        ));
                    };
                    let _ = s.handle.tx.send(ExecIn::Function { fn_id: q.fn_id, bytes: bytes.clone() });
                }
                let _ = s.handle.tx.send(ExecIn::Task {
                    task: q.task,
                    fn_id: q.fn_id,
                    payload: q.payload.clone(),
                });
                let started = (s.ready && s.inflight.is_empty()).then(Instant::now);
                s.inflight
                    .push_back((Inflight { task: q.task, attempt: q.attempt, cancelled: false, started }, q));
            }
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
