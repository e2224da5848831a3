//! The orchestrator's API ([`Orchestrator`]; its clients are in
//! `client.rs`) and the task that drives the [`Core`] on its runtime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distripool_protocol::{ToAgent, DEFAULT_MAX_FRAME};
use distripool_scheduler::IdMap;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use super::client::Client;
use super::core::{Comm, Core, CoreMetrics, Input};
use super::intake::{accept_loop, Intake};
use super::observe::JobInfo;
use super::session::Heard;
use super::snapshot::{Event as ClusterEvent, Snapshot};
use crate::agent::{run_session, AgentConfig, EXIT_GRACE};
use crate::conn::{client_handshake, Outgoing, SessionEnd};
use crate::ids::{ClientId, JobId, WorkerId};
use crate::mailbox::{Completion, Mailbox, MailboxTx};
use crate::security::{Acceptor, Security};
use crate::timing::Timing;
use crate::{resolve, Error, Result};

/// Inputs the core task takes before it sends what they produced.
const MAX_BURST: usize = 1024;

#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// `host:port` addresses to listen on; may be empty (embedded pools).
    pub listen: Vec<String>,
    pub security: Security,
    pub max_frame: usize,
    pub max_crashes: u32,
    pub timing: Timing,
    /// `host:port` of the dashboard and `/metrics` (off when `None`).
    pub dashboard: Option<String>,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            security: Security::default(),
            max_frame: DEFAULT_MAX_FRAME,
            max_crashes: 3,
            timing: Timing::default(),
            dashboard: None,
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
    /// Tasks that returned (a value, or an exception the function raised).
    pub tasks_done: AtomicU64,
    /// Tasks queued by clients.
    pub tasks_submitted: AtomicU64,
    /// Tasks run again after their executor died.
    pub tasks_retried: AtomicU64,
    /// Tasks given up: too many crashes or losses, or out of time.
    pub tasks_failed: AtomicU64,
    /// Tasks whose function raised, as their pools report it.
    pub tasks_raised: AtomicU64,
    /// Connections refused before they became a worker, by
    /// [`Refusal`](super::observe::Refusal) (in the order of `Refusal::ALL`).
    pub refused: [AtomicU64; 9],
    pub crashes: AtomicU64,
    /// Workers that left or were declared lost.
    pub workers_lost: AtomicU64,
    /// Workers that left on purpose (drained, or stopped with a goodbye).
    pub workers_left: AtomicU64,
    /// Frame bytes (headers and payloads, before sealing) sent to and
    /// received from network agents.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Large functions that agents fetched from other agents rather than
    /// from the orchestrator.
    pub functions_fetched: AtomicU64,
}

/// What reaches the core task: an input for the core, or one that also
/// carries a channel end, which the task keeps in its [`ChannelComm`].
pub(super) enum Event {
    Core(Input),
    AgentJoined {
        worker: WorkerId,
        peer: String,
        slots: usize,
        labels: distripool_protocol::Labels,
        tx: mpsc::UnboundedSender<Vec<Outgoing<ToAgent>>>,
        heard: Arc<Heard>,
    },
    ClientOpened {
        client: ClientId,
        tx: MailboxTx,
    },
    Withdraw {
        client: ClientId,
        job: JobId,
        reply: oneshot::Sender<Vec<u32>>,
    },
    Drain {
        worker: WorkerId,
        reply: oneshot::Sender<bool>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    Events {
        since: u64,
        reply: oneshot::Sender<Vec<ClusterEvent>>,
    },
    Metrics {
        reply: oneshot::Sender<CoreMetrics>,
    },
    Jobs {
        reply: oneshot::Sender<Vec<JobInfo>>,
    },
}

/// The core's output, written to the agents' writer tasks and the clients'
/// mailboxes.
#[derive(Default)]
struct ChannelComm {
    agents: IdMap<WorkerId, AgentEnds>,
    clients: IdMap<ClientId, MailboxTx>,
}

/// What the core task keeps of an agent's session.
struct AgentEnds {
    tx: mpsc::UnboundedSender<Vec<Outgoing<ToAgent>>>,
    /// When it was last heard from, heartbeats included (the core sees only
    /// the frames that are not heartbeats).
    heard: Arc<Heard>,
}

impl Comm for ChannelComm {
    fn send_agent(&mut self, worker: WorkerId, frames: Vec<Outgoing<ToAgent>>) {
        if let Some(AgentEnds { tx, .. }) = self.agents.get(&worker) {
            // A writer that is gone means a session that is ending; its
            // reader reports the end.
            let _ = tx.send(frames);
        }
    }

    fn deliver(&mut self, client: ClientId, completions: Vec<Completion>) {
        if let Some(tx) = self.clients.get(&client) {
            tx.0.deliver(completions);
        }
    }
}

impl ChannelComm {
    /// Let the core see `ev`, keeping or dropping the channel ends it names.
    fn handle(&mut self, core: &mut Core, ev: Event, now: Instant) {
        match ev {
            Event::AgentJoined { worker, peer, slots, labels, tx, heard } => {
                self.agents.insert(worker, AgentEnds { tx, heard });
                core.handle(Input::AgentJoined { worker, peer, slots, labels }, now);
            }
            Event::ClientOpened { client, tx } => {
                self.clients.insert(client, tx);
                core.handle(Input::ClientOpened { client }, now);
            }
            Event::Withdraw { client, job, reply } => {
                let _ = reply.send(core.withdraw(client, job));
            }
            Event::Drain { worker, reply } => {
                let _ = reply.send(core.drain(worker));
            }
            Event::Snapshot { reply } => {
                let mut snapshot = core.snapshot(now);
                for w in &mut snapshot.workers {
                    if let Some(a) = self.agents.get(&w.id) {
                        w.last_heard = w.last_heard.min(now.saturating_duration_since(a.heard.last()));
                    }
                }
                let _ = reply.send(snapshot);
            }
            Event::Events { since, reply } => {
                let _ = reply.send(core.events_since(since));
            }
            Event::Metrics { reply } => {
                let _ = reply.send(core.metrics());
            }
            Event::Jobs { reply } => {
                let _ = reply.send(core.jobs(now));
            }
            Event::Core(input) => {
                match &input {
                    // Dropping the sender ends the agent's writer; dropping
                    // the mailbox's end closes it.
                    Input::AgentLeft { worker, .. } => drop(self.agents.remove(worker)),
                    Input::ClientClosed { client } => drop(self.clients.remove(client)),
                    _ => {}
                }
                core.handle(input, now);
            }
        }
    }
}

async fn run_core(mut core: Core, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut comm = ChannelComm::default();
    while let Some(ev) = rx.recv().await {
        // One clock reading per burst.
        let now = Instant::now();
        comm.handle(&mut core, ev, now);
        // Let the other ready tasks (agent readers with results) queue
        // their events before this burst is drained. The runtime runs a
        // task woken by a message right after its sender, so without this
        // the core would take one agent's batch at a time, and wake the
        // client and refill the agents once per batch: with 256 agents on
        // one slot each, 60% more CPU per task.
        tokio::task::yield_now().await;
        // Drain what else is ready (up to a bound, so that a steady stream
        // of events cannot hold the outboxes back), so that a burst of
        // events leaves as one batch per agent and per client.
        for _ in 0..MAX_BURST {
            match rx.try_recv() {
                Ok(ev) => comm.handle(&mut core, ev, now),
                Err(_) => break,
            }
        }
        core.flush(&mut comm);
    }
}

/// Handle to a running orchestrator. Dropping it (or [`close`](Self::close))
/// stops everything it runs and frees its ports.
pub struct Orchestrator {
    runtime: Option<tokio::runtime::Runtime>,
    events: mpsc::UnboundedSender<Event>,
    addrs: Vec<SocketAddr>,
    security: Security,
    max_frame: usize,
    timing: Timing,
    stats: Arc<Stats>,
    next_id: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    /// The agents running in this process, which close waits for.
    local_agents: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    dashboard: Option<crate::dashboard::Dashboard>,
}

impl Orchestrator {
    pub fn start(config: OrchestratorConfig) -> Result<Self> {
        config.timing.validate()?;
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

        let observe = config.dashboard.is_some();
        let mut bound = Vec::new();
        for addr in &addrs {
            let listener = runtime.block_on(async {
                let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.set_reuseaddr(true)?;
                socket.bind(*addr)?;
                socket.listen(1024)
            });
            let listener = listener.map_err(|e| Error::Listen { addr: *addr, source: e })?;
            bound.push(listener.local_addr()?);
            let intake = Intake {
                key: config.security.key.clone().into(),
                binding: config.security.binding(),
                acceptor: acceptor.clone(),
                max_frame: config.max_frame,
                timing: config.timing,
                events: events.clone(),
                stats: stats.clone(),
                usage: observe,
            };
            runtime.spawn(accept_loop(listener, intake, next_id.clone()));
        }
        let dashboard = match &config.dashboard {
            Some(addr) => {
                let core = CoreLink { events: events.clone(), stats: stats.clone() };
                let key = &config.security.key;
                Some(runtime.block_on(crate::dashboard::Dashboard::start(addr, key, core))?)
            }
            None => None,
        };

        runtime.spawn(run_core(Core::new(config.max_crashes, stats.clone(), Instant::now(), observe), rx));
        Ok(Self {
            runtime: Some(runtime),
            events,
            addrs: bound,
            security: config.security,
            max_frame: config.max_frame,
            timing: config.timing,
            stats,
            next_id,
            stop,
            local_agents: Default::default(),
            dashboard,
        })
    }

    /// The dashboard's address and the URL to open (with its token, when
    /// one is needed), if it was asked for.
    pub fn dashboard(&self) -> Option<&crate::dashboard::Dashboard> {
        self.dashboard.as_ref()
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

    /// Ask the core something and wait for its answer.
    fn ask<T>(&self, ev: impl FnOnce(oneshot::Sender<T>) -> Event) -> Result<T> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        request(&self.events, ev)?.blocking_recv().map_err(|_| Error::Closed)
    }

    /// Workers, clients and their tasks as they are now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.ask(|reply| Event::Snapshot { reply })
    }

    /// Executors busy and idle, tasks queued and running, task times: what
    /// the core counts beyond [`Stats`], without walking the tasks.
    pub fn metrics(&self) -> Result<CoreMetrics> {
        self.ask(|reply| Event::Metrics { reply })
    }

    /// The events numbered `since` and after that are still kept (the
    /// newest [`EVENTS_KEPT`](super::snapshot::EVENTS_KEPT)).
    pub fn events(&self, since: u64) -> Result<Vec<ClusterEvent>> {
        self.ask(|reply| Event::Events { since, reply })
    }

    /// Ask worker `worker` to finish the tasks it holds and leave; it gets no
    /// new ones. False if no such worker is connected.
    pub fn drain(&self, worker: WorkerId) -> Result<bool> {
        self.ask(|reply| Event::Drain { worker, reply })
    }

    /// A new client (one per pool) with its own completion channel.
    pub fn open_client(&self) -> Result<Client> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let id = ClientId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mailbox = Arc::new(Mailbox::default());
        self.events
            .send(Event::ClientOpened { client: id, tx: MailboxTx(mailbox.clone()) })
            .map_err(|_| Error::Closed)?;
        Ok(Client::new(id, self.max_frame, self.events.clone(), mailbox))
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
        config.timing = self.timing;
        let (agent_end, orch_end) = tokio::io::duplex(1 << 20);
        let worker = WorkerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let binding = config.security.binding();
        let intake = Intake {
            key: config.security.key.clone().into(),
            binding: binding.clone(),
            acceptor: Acceptor::Plain,
            max_frame: self.max_frame,
            timing: self.timing,
            events: self.events.clone(),
            stats: self.stats.clone(),
            usage: self.dashboard.is_some(),
        };
        rt.spawn(intake.serve_local(orch_end, worker));
        let mut stop = self.stop.subscribe();
        let agent = rt.spawn(async move {
            let mut stream = agent_end;
            match client_handshake(&mut stream, &config.security.key, &binding).await {
                Ok(_) => {
                    // In-process: nothing travels over a wire, so no sealing.
                    let end = run_session(stream, &config, None, None, &mut stop).await;
                    if end != SessionEnd::Stopped {
                        tracing::error!("local agent stopped: {end}");
                    }
                }
                Err(e) => tracing::error!("local agent could not authenticate: {e}"),
            }
        });
        self.local_agents.lock().expect("local agents").push(agent);
        Ok(())
    }

    /// Stop all tasks, agents and listeners and free the ports. Idempotent.
    pub fn close(&mut self) {
        self.close_with(true);
    }

    /// Stop everything; `graceful`: in-process agents let their idle
    /// executors exit by themselves first (`close`), else they are killed at
    /// once, as a pool's `terminate` does.
    pub fn close_with(&mut self, graceful: bool) {
        let _ = self.stop.send(true);
        let agents = std::mem::take(&mut *self.local_agents.lock().expect("local agents"));
        if let (true, Some(rt)) = (graceful, &self.runtime) {
            // In-process agents let their idle executors exit, as a pool's
            // workers do at join (bounded by the agent's EXIT_GRACE). Not
            // from inside a runtime, where blocking is not allowed.
            if !agents.is_empty() && tokio::runtime::Handle::try_current().is_err() {
                rt.block_on(async {
                    let all = async {
                        for agent in agents {
                            let _ = agent.await;
                        }
                    };
                    let _ = tokio::time::timeout(EXIT_GRACE + Duration::from_secs(1), all).await;
                });
            }
        }
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

/// Put a question to the core task; the receiver gets its answer.
fn request<T>(
    events: &mpsc::UnboundedSender<Event>,
    ev: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Result<oneshot::Receiver<T>> {
    let (reply, rx) = oneshot::channel();
    events.send(ev(reply)).map_err(|_| Error::Closed)?;
    Ok(rx)
}

/// What the dashboard holds of the orchestrator: the way to ask its core,
/// and its counters.
#[derive(Clone)]
pub struct CoreLink {
    events: mpsc::UnboundedSender<Event>,
    pub stats: Arc<Stats>,
}

impl CoreLink {
    async fn ask<T>(&self, ev: impl FnOnce(oneshot::Sender<T>) -> Event) -> Result<T> {
        request(&self.events, ev)?.await.map_err(|_| Error::Closed)
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        self.ask(|reply| Event::Snapshot { reply }).await
    }

    pub async fn metrics(&self) -> Result<CoreMetrics> {
        self.ask(|reply| Event::Metrics { reply }).await
    }

    pub async fn jobs(&self) -> Result<Vec<JobInfo>> {
        self.ask(|reply| Event::Jobs { reply }).await
    }

    pub async fn events(&self, since: u64) -> Result<Vec<ClusterEvent>> {
        self.ask(|reply| Event::Events { since, reply }).await
    }
}
