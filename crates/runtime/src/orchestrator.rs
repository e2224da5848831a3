//! The orchestrator: accepts agents, schedules tasks, routes results.
//!
//! It runs on its own tokio runtime inside the driver process. A single *core*
//! task owns all mutable state — the [`Scheduler`], the agents' outgoing
//! queues, the clients' completion channels and the function registry — and
//! is fed by one event channel, so there is no lock on the per-task path.
//!
//! ```text
//!  Client::submit ─┐                         ┌─► agent writer ─► socket
//!  agent reader ───┼─► events ─► core task ──┤
//!  listeners ──────┘            (Scheduler)  └─► Client mailbox (completions)
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use distripool_protocol::{Binding, FromAgent, SessionKeys, ToAgent, DEFAULT_MAX_FRAME};
pub use distripool_scheduler::FailureKind;
use distripool_scheduler::{Command, Config as SchedulerConfig, IdMap, IdSet, Scheduler};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::agent::{run_session, AgentConfig};
use crate::conn::{
    client_handshake, server_handshake, tune_tcp, AbortOnDrop, FrameReader, FrameWriter, Outgoing,
    HANDSHAKE_TIMEOUT, HEARTBEAT, PEER_TIMEOUT,
};
use crate::mailbox::{Mailbox, MailboxTx};
use crate::security::{Acceptor, Security};
use crate::{resolve, Error, Result};

/// Tasks an agent may hold per executor slot (running plus prefetched).
const PREFETCH_PER_SLOT: usize = 2;
/// Events the core handles before it sends what they produced.
const MAX_BURST: usize = 1024;
/// Functions kept after their last task, in case they are used again.
const IDLE_FUNCTIONS: usize = 64;
/// Room kept in a frame for its lengths and header, beside the payload.
const FRAME_OVERHEAD: usize = 1024;
/// Connections that may be in their handshake at once; beyond it the oldest
/// is dropped.
const MAX_PENDING_HANDSHAKES: usize = 256;

#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// `host:port` addresses to listen on; may be empty (embedded pools).
    pub listen: Vec<String>,
    pub security: Security,
    pub max_frame: usize,
    pub max_crashes: u32,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            security: Security::default(),
            max_frame: DEFAULT_MAX_FRAME,
            max_crashes: 3,
        }
    }
}

/// Counters readable from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub workers: AtomicUsize,
    pub slots: AtomicUsize,
    pub auth_failures: AtomicUsize,
    pub handshake_failures: AtomicUsize,
    pub tasks_done: AtomicU64,
    pub crashes: AtomicU64,
    /// Workers that left or were declared lost.
    pub workers_lost: AtomicU64,
    /// Frame bytes (headers and payloads, before sealing) sent to and
    /// received from network agents.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// How a task ended, as seen by its client.
#[derive(Debug)]
pub enum Outcome {
    /// The executor's pickled outcome (a value or a Python exception).
    Done(Bytes),
    /// The task could not be completed: retries exhausted, or out of time.
    Failed { kind: FailureKind, reason: String },
}

#[derive(Debug)]
pub struct Completion {
    pub job: u64,
    pub index: u32,
    pub outcome: Outcome,
}

enum Event {
    AgentJoined {
        worker: u64,
        name: String,
        slots: usize,
        tx: mpsc::UnboundedSender<Vec<Outgoing<ToAgent>>>,
    },
    /// Every message an agent's reader had at hand, in order.
    AgentMessages {
        worker: u64,
        msgs: Vec<(FromAgent, Bytes)>,
    },
    AgentLeft {
        worker: u64,
        reason: String,
    },
    ClientOpened {
        client: u64,
        tx: MailboxTx,
    },
    Submit {
        client: u64,
        job: u64,
        fn_id: u64,
        function: Bytes,
        tasks: Vec<(u32, Bytes)>,
        timeout_ms: u64,
    },
    ClientClosed {
        client: u64,
    },
    Withdraw {
        client: u64,
        job: u64,
        reply: tokio::sync::oneshot::Sender<Vec<u32>>,
    },
}

struct TaskMeta {
    client: u64,
    job: u64,
    index: u32,
    fn_id: u64,
    timeout_ms: u64,
}

struct AgentLink {
    tx: mpsc::UnboundedSender<Vec<Outgoing<ToAgent>>>,
    /// Frames for this agent produced while handling the current burst of
    /// events; sent to its writer as one batch when the burst is over.
    outbox: Vec<Outgoing<ToAgent>>,
    fns: IdSet<u64>,
    slots: usize,
    /// `host (address, agent pid N)`, for error messages.
    name: String,
}

struct ClientLink {
    tx: MailboxTx,
    outbox: Vec<Completion>,
}

struct FnEntry {
    bytes: Bytes,
    refs: usize,
}

struct Core {
    sched: Scheduler<Bytes, Bytes>,
    agents: IdMap<u64, AgentLink>,
    clients: IdMap<u64, ClientLink>,
    /// Agents and clients with something in their outbox.
    dirty_agents: Vec<u64>,
    dirty_clients: Vec<u64>,
    meta: IdMap<u64, TaskMeta>,
    fns: IdMap<u64, FnEntry>,
    idle_fns: VecDeque<u64>,
    next_task: u64,
    stats: Arc<Stats>,
}

/// Handle to a running orchestrator. Dropping it (or [`close`](Self::close))
/// stops everything it runs and frees its ports.
pub struct Orchestrator {
    runtime: Option<tokio::runtime::Runtime>,
    events: mpsc::UnboundedSender<Event>,
    addrs: Vec<SocketAddr>,
    security: Security,
    max_frame: usize,
    stats: Arc<Stats>,
    next_id: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Orchestrator {
    pub fn start(config: OrchestratorConfig) -> Result<Self> {
        let mut addrs = Vec::new();
        for a in &config.listen {
            let addr = resolve(a)?;
            if !addr.ip().is_loopback() && config.security.key.is_empty() && config.security.tls.is_none() {
                return Err(Error::Config(format!(
                    "refusing to listen on {addr} without an authentication key: anyone who can reach it \
                     could run code on your workers. Pass authkey=..., or set DISTRIPOOL_AUTHKEY or \
                     DISTRIPOOL_AUTHKEY_FILE (make a key with `distripool keygen`), or listen on 127.0.0.1"
                )));
            }
            addrs.push(addr);
        }
        let acceptor = Acceptor::new(&config.security)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("distripool-orchestrator")
            .enable_all()
            .build()?;
        let stats = Arc::new(Stats::default());
        let next_id = Arc::new(AtomicU64::new(1));
        let (events, rx) = mpsc::unbounded_channel();
        let (stop, _) = watch::channel(false);

        let mut bound = Vec::new();
        for addr in &addrs {
            let listener = runtime.block_on(async {
                let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.set_reuseaddr(true)?;
                socket.bind(*addr)?;
                socket.listen(1024)
            });
            let listener = listener.map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
            bound.push(listener.local_addr()?);
            let intake = Intake {
                key: config.security.key.clone().into(),
                binding: config.security.binding(),
                acceptor: acceptor.clone(),
                max_frame: config.max_frame,
                events: events.clone(),
                stats: stats.clone(),
            };
            runtime.spawn(accept_loop(listener, intake, next_id.clone()));
        }

        let core = Core {
            sched: Scheduler::new(SchedulerConfig { max_crashes: config.max_crashes, max_losses: 10 }),
            agents: IdMap::default(),
            clients: IdMap::default(),
            dirty_agents: Vec::new(),
            dirty_clients: Vec::new(),
            meta: IdMap::default(),
            fns: IdMap::default(),
            idle_fns: VecDeque::new(),
            next_task: 1,
            stats: stats.clone(),
        };
        runtime.spawn(core.run(rx));
        Ok(Self {
            runtime: Some(runtime),
            events,
            addrs: bound,
            security: config.security,
            max_frame: config.max_frame,
            stats,
            next_id,
            stop,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn is_closed(&self) -> bool {
        self.runtime.is_none()
    }

    /// A new client (one per pool) with its own completion channel.
    pub fn open_client(&self) -> Result<Client> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        self.events
            .send(Event::ClientOpened { client: id, tx: MailboxTx(mailbox.clone()) })
            .map_err(|_| Error::Closed)?;
        Ok(Client {
            id,
            max_frame: self.max_frame,
            events: self.events.clone(),
            mailbox,
            next_job: AtomicU64::new(1),
        })
    }

    /// Run an agent with `processes` executors inside this process, connected
    /// through an in-memory stream (no port). It lives as long as the
    /// orchestrator.
    pub fn start_local_agent(&self, mut config: AgentConfig) -> Result<()> {
        let Some(rt) = &self.runtime else {
            return Err(Error::Closed);
        };
        config.security = Security { tls: None, ..self.security.clone() };
        config.executor.max_frame = self.max_frame;
        let (agent_end, orch_end) = tokio::io::duplex(1 << 20);
        let worker = self.next_id.fetch_add(1, Ordering::Relaxed);
        let binding = config.security.binding();
        let intake = Intake {
            key: config.security.key.clone().into(),
            binding: binding.clone(),
            acceptor: Acceptor::Plain,
            max_frame: self.max_frame,
            events: self.events.clone(),
            stats: self.stats.clone(),
        };
        rt.spawn(intake.serve_local(orch_end, worker));
        let mut stop = self.stop.subscribe();
        rt.spawn(async move {
            let mut stream = agent_end;
            match client_handshake(&mut stream, &config.security.key, &binding).await {
                Ok(_) => {
                    // In-process: nothing travels over a wire, so no sealing.
                    tokio::select! {
                        reason = run_session(stream, &config, None) => {
                            tracing::error!("local agent stopped: {reason}");
                        }
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => tracing::error!("local agent could not authenticate: {e}"),
            }
        });
        Ok(())
    }

    /// Stop all tasks, agents and listeners and free the ports. Idempotent.
    pub fn close(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            // Dropping the tasks drops every executor handle, which kills the
            // executors' process groups.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.close();
    }
}

/// A pool's connection to the orchestrator.
pub struct Client {
    id: u64,
    max_frame: usize,
    events: mpsc::UnboundedSender<Event>,
    mailbox: Arc<Mailbox>,
    next_job: AtomicU64,
}

impl Client {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A fresh job number for this client.
    pub fn new_job(&self) -> u64 {
        self.next_job.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue tasks `(index, payload)` of `job`, all calling the pickled
    /// `function`, each allowed to run for at most `timeout`.
    pub fn submit(
        &self,
        job: u64,
        function: Bytes,
        tasks: Vec<(u32, Bytes)>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        // Refuse here, in the caller, what no connection could carry.
        let limit = self.max_frame.saturating_sub(FRAME_OVERHEAD);
        let largest = tasks.iter().map(|(_, p)| p.len()).chain([function.len()]).max().unwrap_or(0);
        if largest > limit {
            return Err(Error::TooLarge(format!(
                "a task of {largest} bytes exceeds the frame limit of {} bytes",
                self.max_frame
            )));
        }
        let fn_id = function_id(&function);
        self.events
            .send(Event::Submit {
                client: self.id,
                job,
                fn_id,
                function,
                tasks,
                timeout_ms: timeout.map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64),
            })
            .map_err(|_| Error::Closed)
    }

    /// Wait up to `timeout` for completions; returns all that are ready
    /// (possibly none). `Err(Closed)` once the orchestrator is gone.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<Completion>> {
        self.mailbox.recv(timeout)
    }

    /// The caller will wait for `job` itself (`wait`), so its completion
    /// skips `recv`. Call before submitting the job.
    pub fn expect(&self, job: u64) {
        self.mailbox.expect(job);
    }

    /// Wait up to `timeout` for an expected job: `Ok(None)` if not done yet.
    pub fn wait(&self, job: u64, timeout: Duration) -> Result<Option<Completion>> {
        self.mailbox.wait(job, timeout)
    }

    /// Stop expecting `job`: its completion goes to `recv` after all.
    pub fn forget(&self, job: u64) {
        self.mailbox.forget(job);
    }

    /// Take back the tasks of `job` that no worker has been given yet.
    /// Returns their indexes, in order: those tasks will never complete,
    /// and every other task of the job completes exactly once (or is
    /// cancelled with its client).
    pub fn withdraw(&self, job: u64) -> Result<Vec<u32>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.events.send(Event::Withdraw { client: self.id, job, reply }).map_err(|_| Error::Closed)?;
        rx.blocking_recv().map_err(|_| Error::Closed)
    }

    /// Cancel everything this client submitted and detach it.
    pub fn close(&self) {
        let _ = self.events.send(Event::ClientClosed { client: self.id });
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

/// Content address of a pickled function.
pub fn function_id(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Core {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        while let Some(ev) = rx.recv().await {
            self.handle(ev);
            // Let the other ready tasks (agent readers with results) queue
            // their events before this burst is drained. The runtime runs a
            // task woken by a message right after its sender, so without
            // this the core would take one agent's batch at a time, and
            // wake the client and refill the agents once per batch: with 256
            // agents on one slot each, 60% more CPU per task.
            tokio::task::yield_now().await;
            // Drain what else is ready (up to a bound, so that a steady
            // stream of events cannot hold the outboxes back), so that a
            // burst of events leaves as one batch per agent and per client.
            for _ in 0..MAX_BURST {
                match rx.try_recv() {
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            self.send_outboxes();
        }
    }

    /// Put `out` in `link`'s outbox; [`send_outboxes`](Self::send_outboxes)
    /// sends it at the end of the burst.
    fn queue(dirty: &mut Vec<u64>, worker: u64, link: &mut AgentLink, out: Outgoing<ToAgent>) {
        if link.outbox.is_empty() {
            dirty.push(worker);
        }
        link.outbox.push(out);
    }

    fn send_outboxes(&mut self) {
        for worker in self.dirty_agents.drain(..) {
            if let Some(link) = self.agents.get_mut(&worker) {
                if !link.outbox.is_empty() {
                    let _ = link.tx.send(std::mem::take(&mut link.outbox));
                }
            }
        }
        for client in self.dirty_clients.drain(..) {
            if let Some(link) = self.clients.get_mut(&client) {
                if !link.outbox.is_empty() {
                    link.tx.0.deliver(std::mem::take(&mut link.outbox));
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::AgentJoined { worker, name, slots, tx } => {
                self.agents
                    .insert(worker, AgentLink { tx, outbox: Vec::new(), fns: IdSet::default(), slots, name });
                self.stats.workers.fetch_add(1, Ordering::Relaxed);
                self.stats.slots.fetch_add(slots, Ordering::Relaxed);
                self.sched.worker_joined(worker, slots * PREFETCH_PER_SLOT);
            }
            Event::AgentLeft { worker, reason } => {
                if let Some(link) = self.agents.remove(&worker) {
                    self.stats.workers.fetch_sub(1, Ordering::Relaxed);
                    self.stats.workers_lost.fetch_add(1, Ordering::Relaxed);
                    self.stats.slots.fetch_sub(link.slots, Ordering::Relaxed);
                    self.sched.worker_lost(worker, &format!("worker {} lost: {reason}", link.name));
                }
            }
            Event::AgentMessages { worker, msgs } => {
                for (msg, payload) in msgs {
                    self.agent_message(worker, msg, payload);
                }
            }
            Event::ClientOpened { client, tx } => {
                self.clients.insert(client, ClientLink { tx, outbox: Vec::new() });
            }
            Event::Submit { client, job, fn_id, function, tasks, timeout_ms } => {
                if !self.clients.contains_key(&client) {
                    return;
                }
                let entry = self.fns.entry(fn_id).or_insert(FnEntry { bytes: function, refs: 0 });
                entry.refs += tasks.len();
                self.meta.reserve(tasks.len());
                self.sched.reserve(tasks.len());
                for (index, payload) in tasks {
                    let task = self.next_task;
                    self.next_task += 1;
                    self.meta.insert(task, TaskMeta { client, job, index, fn_id, timeout_ms });
                    self.sched.submit(task, client, payload);
                }
            }
            Event::Withdraw { client, job, reply } => {
                let tasks: Vec<u64> = self
                    .meta
                    .iter()
                    .filter(|(_, m)| m.client == client && m.job == job)
                    .map(|(t, _)| *t)
                    .collect();
                let mut withdrawn = Vec::new();
                for t in tasks {
                    if self.sched.withdraw(t) {
                        let m = self.meta.remove(&t).expect("withdrawn task has metadata");
                        self.release_function(m.fn_id);
                        withdrawn.push(m.index);
                    }
                }
                withdrawn.sort_unstable();
                let _ = reply.send(withdrawn);
            }
            Event::ClientClosed { client } => {
                if self.clients.remove(&client).is_some() {
                    self.sched.cancel_group(client);
                    // Running tasks come back as Cancel commands; queued ones
                    // leave the scheduler silently, so forget them here.
                    let gone: Vec<u64> =
                        self.meta.iter().filter(|(_, m)| m.client == client).map(|(t, _)| *t).collect();
                    for t in gone {
                        if let Some(m) = self.meta.remove(&t) {
                            self.release_function(m.fn_id);
                        }
                    }
                }
            }
        }
        self.apply_commands();
    }

    fn agent_message(&mut self, worker: u64, msg: FromAgent, payload: Bytes) {
        match msg {
            FromAgent::Result { task, attempt } => {
                if self.sched.task_finished(worker, task, attempt, payload) {
                    self.stats.tasks_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            FromAgent::Crashed { task, attempt, reason } => {
                self.stats.crashes.fetch_add(1, Ordering::Relaxed);
                let name = self.agents.get(&worker).map_or("?", |l| l.name.as_str());
                let reason = format!("{reason} on worker {name}");
                self.sched.task_crashed(worker, task, attempt, &reason);
            }
            FromAgent::TimedOut { task, attempt, reason } => {
                let name = self.agents.get(&worker).map_or("?", |l| l.name.as_str());
                let reason = format!("{reason} on worker {name}");
                self.sched.task_timed_out(worker, task, attempt, &reason);
            }
            FromAgent::Capacity { tasks } => {
                if self.agents.contains_key(&worker) {
                    self.sched.worker_joined(worker, (tasks as usize).max(1));
                }
            }
            FromAgent::Ready { .. } | FromAgent::Pong { .. } => {}
        }
    }

    fn apply_commands(&mut self) {
        while let Some(cmd) = self.sched.poll_command() {
            match cmd {
                Command::Dispatch { worker, task, attempt, payload } => {
                    let (Some(link), Some(meta)) = (self.agents.get_mut(&worker), self.meta.get(&task))
                    else {
                        continue;
                    };
                    if link.fns.insert(meta.fn_id) {
                        let bytes = self.fns[&meta.fn_id].bytes.clone();
                        let function = Outgoing::with_payload(ToAgent::Function { fn_id: meta.fn_id }, bytes);
                        Self::queue(&mut self.dirty_agents, worker, link, function);
                    }
                    let msg = ToAgent::Task { task, attempt, fn_id: meta.fn_id, timeout_ms: meta.timeout_ms };
                    Self::queue(&mut self.dirty_agents, worker, link, Outgoing::with_payload(msg, payload));
                }
                Command::Deliver { task, result, .. } => self.complete(task, Outcome::Done(result)),
                Command::Fail { task, failure, .. } => {
                    let reason = match failure.kind {
                        FailureKind::Timeout => {
                            let last = failure.reasons.last().map_or("", |r| r.as_str());
                            // Drop the "attempt N: " prefix; there is no retry to count.
                            format!("task {}", last.split_once(": ").map_or(last, |(_, r)| r))
                        }
                        _ => format!(
                            "task failed after {} attempts: {}",
                            failure.attempts,
                            failure.reasons.join("; ")
                        ),
                    };
                    self.complete(task, Outcome::Failed { kind: failure.kind, reason });
                }
                Command::Cancel { worker, tasks } => {
                    for t in &tasks {
                        if let Some(meta) = self.meta.remove(t) {
                            self.release_function(meta.fn_id);
                        }
                    }
                    if let Some(link) = self.agents.get_mut(&worker) {
                        Self::queue(
                            &mut self.dirty_agents,
                            worker,
                            link,
                            Outgoing::new(ToAgent::Cancel { tasks }),
                        );
                    }
                }
            }
        }
    }

    fn complete(&mut self, task: u64, outcome: Outcome) {
        let Some(meta) = self.meta.remove(&task) else {
            return;
        };
        self.release_function(meta.fn_id);
        if let Some(link) = self.clients.get_mut(&meta.client) {
            if link.outbox.is_empty() {
                self.dirty_clients.push(meta.client);
            }
            link.outbox.push(Completion { job: meta.job, index: meta.index, outcome });
        }
    }

    fn release_function(&mut self, fn_id: u64) {
        let Some(entry) = self.fns.get_mut(&fn_id) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return;
        }
        self.idle_fns.push_back(fn_id);
        while self.idle_fns.len() > IDLE_FUNCTIONS {
            let old = self.idle_fns.pop_front().expect("not empty");
            if self.fns.get(&old).is_some_and(|e| e.refs == 0) && !self.idle_fns.contains(&old) {
                self.fns.remove(&old);
                for (&worker, link) in self.agents.iter_mut() {
                    if link.fns.remove(&old) {
                        let forget = Outgoing::new(ToAgent::Forget { fn_id: old });
                        Self::queue(&mut self.dirty_agents, worker, link, forget);
                    }
                }
            }
        }
    }
}

/// Connections still in their handshake, oldest first. When there are too
/// many, the oldest is dropped to make room: a flood of idle or slow
/// unauthenticated sockets only ever evicts itself, while a real agent,
/// which finishes its handshake in milliseconds, gets through.
#[derive(Default)]
struct Pending {
    order: VecDeque<u64>,
    tasks: HashMap<u64, tokio::task::AbortHandle>,
}

/// Held by a connection while it is in its handshake; dropping it (handshake
/// over, or the task gone) takes the connection off the pending list.
pub(crate) struct PendingGuard {
    pending: Arc<Mutex<Pending>>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut p = self.pending.lock().expect("pending lock");
        p.tasks.remove(&self.id);
        // `order` is pruned lazily by the accept loop.
    }
}

async fn accept_loop(listener: TcpListener, intake: Intake, next_id: Arc<AtomicU64>) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tune_tcp(&stream) {
            tracing::warn!("cannot set socket options for {peer}: {e}");
        }
        let worker = next_id.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard { pending: pending.clone(), id: worker };
        // Hold the lock across spawn and insert, so that a connection that
        // finishes its handshake at once cannot leave a stale entry behind.
        let mut p = pending.lock().expect("pending lock");
        let task = tokio::spawn(intake.clone().serve_tcp(stream, peer.to_string(), worker, guard));
        p.tasks.insert(worker, task.abort_handle());
        p.order.push_back(worker);
        while p.tasks.len() > MAX_PENDING_HANDSHAKES {
            let Some(oldest) = p.order.pop_front() else { break };
            if let Some(handle) = p.tasks.remove(&oldest) {
                handle.abort();
                intake.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Forget ids that finished their handshake long ago.
        while p.order.front().is_some_and(|id| !p.tasks.contains_key(id)) {
            p.order.pop_front();
        }
    }
}

fn note_handshake_failure(stats: &Stats, peer: &str, e: &Error) {
    match e {
        Error::Handshake(h) if h.is_auth_failure() => {
            stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("rejected agent {peer}: {e}");
        }
        _ => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!("handshake with {peer} failed: {e}");
        }
    }
}

/// What every new agent connection needs, whichever way it arrived.
#[derive(Clone)]
struct Intake {
    key: Arc<[u8]>,
    /// What the handshake binds, including whether network sessions are sealed.
    binding: Binding,
    /// Plain TCP or mutual TLS.
    acceptor: Acceptor,
    max_frame: usize,
    events: mpsc::UnboundedSender<Event>,
    stats: Arc<Stats>,
}

impl Intake {
    /// Authenticate a network peer (TLS first, if configured, then the
    /// distripool handshake, all within [`HANDSHAKE_TIMEOUT`]), then serve it
    /// until it goes away. The guard keeps the connection on the pending list
    /// until it is authenticated.
    async fn serve_tcp(self, tcp: TcpStream, peer: String, worker: u64, pending: PendingGuard) {
        let authenticate = async {
            let mut stream = self.acceptor.wrap(tcp).await?;
            let keys = server_handshake(&mut stream, &self.key, &self.binding, worker).await?;
            Ok::<_, Error>((stream, keys))
        };
        let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate)
            .await
            .unwrap_or(Err(Error::Timeout("agent handshake")));
        let (stream, keys) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                note_handshake_failure(&self.stats, &peer, &e);
                return;
            }
        };
        drop(pending);
        let keys = self.binding.sealed.then_some(keys);
        serve_session(stream, peer, worker, keys, self).await;
    }

    /// Serve the in-process agent: authenticated like any other, never sealed
    /// (nothing travels over a wire).
    async fn serve_local<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        self,
        mut stream: S,
        worker: u64,
    ) {
        if let Err(e) = server_handshake(&mut stream, &self.key, &self.binding, worker).await {
            note_handshake_failure(&self.stats, "local", &e);
            return;
        }
        serve_session(stream, "local".into(), worker, None, self).await;
    }
}

/// One authenticated agent: forward its frames to the core, and the core's
/// frames (plus heartbeats) to it, until either side goes away.
async fn serve_session<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    peer: String,
    worker: u64,
    keys: Option<SessionKeys>,
    intake: Intake,
) {
    let Intake { max_frame, events, stats, .. } = intake;
    let (rd, wr) = tokio::io::split(stream);
    let (sealer, opener) = match keys {
        Some(k) => (Some(k.send), Some(k.recv)),
        None => (None, None),
    };
    let mut reader = FrameReader::new(rd, max_frame).with_opener(opener).with_silence_limit(PEER_TIMEOUT);

    // The first message must be Ready, and it must come promptly.
    let (slots, name) = match tokio::time::timeout(PEER_TIMEOUT, reader.read_frame()).await {
        Ok(Ok(Some(f))) => match f.message::<FromAgent>() {
            Ok(FromAgent::Ready { slots, host, pid }) => {
                tracing::info!("agent {peer} ({host}, pid {pid}) joined with {slots} executors");
                (slots as usize, format!("{host} ({peer}, agent pid {pid})"))
            }
            _ => return,
        },
        _ => return,
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Outgoing<ToAgent>>>();
    let _ = tx.send(vec![Outgoing::new(ToAgent::Limits { max_frame: max_frame as u64 })]);
    if events.send(Event::AgentJoined { worker, name, slots, tx }).is_err() {
        return;
    }
    let sent = stats.clone();
    let writer = tokio::spawn(async move {
        let mut w = FrameWriter::new(wr, max_frame).with_sealer(sealer);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut seq = 0u64;
        loop {
            let first = tokio::select! {
                f = rx.recv() => match f { Some(f) => f, None => return Ok::<(), Error>(()) },
                _ = heartbeat.tick() => {
                    seq += 1;
                    vec![Outgoing::new(ToAgent::Ping { seq })]
                }
            };
            let mut next = Some(first);
            while let Some(batch) = next {
                for f in batch {
                    w.write(&f.msg, &f.payload).await?;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            sent.bytes_sent.fetch_add(w.take_written(), Ordering::Relaxed);
        }
    });
    let writer = AbortOnDrop(writer);

    let reason = loop {
        // Silence is measured in bytes, not frames (see `with_silence_limit`).
        // Everything already buffered goes to the core as one event.
        let mut msgs = Vec::new();
        let end = loop {
            match reader.read_frame().await {
                Err(Error::Timeout(_)) => break Some(format!("no heartbeat for {PEER_TIMEOUT:?}")),
                Err(e) => break Some(format!("connection error: {e}")),
                Ok(None) => break Some("connection closed".to_string()),
                Ok(Some(frame)) => {
                    let n = 8 + frame.header.len() + frame.payload.len();
                    stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    match frame.message::<FromAgent>() {
                        Ok(FromAgent::Pong { .. }) => {}
                        Ok(msg) => msgs.push((msg, frame.payload)),
                        Err(e) => break Some(format!("bad message: {e}")),
                    }
                }
            }
            if !reader.has_buffered_frame() || msgs.len() >= 1024 {
                break None;
            }
        };
        if !msgs.is_empty() && events.send(Event::AgentMessages { worker, msgs }).is_err() {
            break "orchestrator stopped".to_string();
        }
        if let Some(reason) = end {
            break reason;
        }
        if writer.0.is_finished() {
            break "connection closed while sending".to_string();
        }
    };
    tracing::info!("agent {peer} left: {reason}");
    let _ = events.send(Event::AgentLeft { worker, reason });
}
