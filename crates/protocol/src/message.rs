//! Control messages, named by direction. Their payloads travel beside them in
//! the same frame as opaque bytes (see [`crate::frame`]).

use serde::{Deserialize, Serialize};

/// Orchestrator → agent, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Sent once, first, in answer to [`FromAgent::Ready`]: the largest frame
    /// the orchestrator accepts, which bounds what executors may send back,
    /// and the session's heartbeat and silence limit, which the agent adopts
    /// so that both sides agree on them.
    /// With `usage_ms` above 0, the agent reports its executors' CPU and
    /// memory ([`FromAgent::Usage`]) that often (a dashboard is watching).
    Limits { max_frame: u64, heartbeat_ms: u64, silence_ms: u64, usage_ms: u64 },
    /// Keep this pickled function under `fn_id`; payload: the function.
    /// Sent once per agent before the first task that needs it. `needs`
    /// names blobs sent before it (with `needs` empty) that executors load
    /// before the function: the driver's main module, say.
    Function { fn_id: u64, needs: Vec<u64> },
    /// A large function (or need) comes from another agent instead: fetch
    /// it from the agent serving at `from` ([`ToPeer::Fetch`]); without
    /// `from`, hold the tasks that need it until a later `Fetch` names an
    /// agent or a [`ToAgent::Function`] brings it. No payload. Answered
    /// with [`FromAgent::Holds`] or [`FromAgent::NotFetched`].
    Fetch { fn_id: u64, needs: Vec<u64>, from: Option<String> },
    /// The next piece of a large function, sent in pieces, in order, to an
    /// agent that serves other agents, so that it passes each on as it
    /// arrives; payload: the piece. The function is whole once `total`
    /// bytes have come.
    Piece { fn_id: u64, needs: Vec<u64>, total: u64 },
    /// The function is no longer needed; drop it from every cache.
    Forget { fn_id: u64 },
    /// Run one task (a chunk of items); payload: the pickled arguments.
    /// `timeout_ms` (0: none) bounds its running time; past it the agent
    /// kills the executor and reports [`FromAgent::TimedOut`].
    Task { task: u64, attempt: u32, fn_id: u64, timeout_ms: u64 },
    /// These tasks are no longer wanted: drop them if queued, stop them if running.
    Cancel { tasks: Vec<u64> },
    /// Liveness probe; answered with [`FromAgent::Pong`].
    Ping { seq: u64 },
    /// Finish the tasks already sent, then leave with [`FromAgent::Goodbye`];
    /// no new task will come.
    Drain,
}

/// Agent → orchestrator, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromAgent {
    /// The agent is ready to run `slots` tasks at once.
    Ready { slots: u32, labels: Labels },
    /// A task finished (successfully or with a Python exception); payload:
    /// the pickled outcome. `micros`: how long the executor had it at the
    /// front of its queue (its running time, as the agent saw it).
    Result { task: u64, attempt: u32, micros: u64 },
    /// The executor running this attempt died before it produced a result.
    Crashed { task: u64, attempt: u32, reason: String },
    /// This attempt ran past its timeout; its executor was killed.
    TimedOut { task: u64, attempt: u32, reason: String },
    /// Answer to [`ToAgent::Ping`].
    Pong { seq: u64 },
    /// The agent now wants up to `tasks` tasks at once (it holds more per
    /// executor while its tasks are short).
    Capacity { tasks: u32 },
    /// The agent leaves on purpose (drained, or told to stop): the tasks it
    /// still held were not started, or are abandoned by it, and go elsewhere
    /// without counting as lost. The connection closes after this.
    Goodbye { reason: String },
    /// What the agent's executors use now (see [`ToAgent::Limits`]):
    /// `cpu_milli` thousandths of a CPU over the last interval (1000: one
    /// CPU busy), `memory` resident bytes, summed over `executors`.
    Usage { executors: u32, cpu_milli: u32, memory: u64 },
    /// Other agents may fetch the large functions this agent holds from
    /// `addr` (sent once, after `Ready`).
    Serves { addr: String },
    /// It fetched this function from another agent, and serves it in turn.
    Holds { fn_id: u64 },
    /// It could not fetch this function from the agent named: send it.
    NotFetched { fn_id: u64, reason: String },
}

/// An agent to the agent it fetches from, after their handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPeer {
    Fetch { fn_id: u64 },
}

/// The answer: the function's pieces in order, each a frame whose payload
/// is the next piece of its `total` bytes; or that it is not held here.
/// While the server waits for the function (or its next piece) to reach it,
/// it says so every heartbeat, so that a fetcher can tell a source still
/// receiving from one that has stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromPeer {
    Piece { fn_id: u64, total: u64 },
    Missing { fn_id: u64 },
    Waiting { fn_id: u64 },
}

/// What an agent says about itself when it joins, so that an operator (or a
/// launcher) can tell which machine, process or job it is.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Labels {
    pub host: String,
    pub pid: u32,
    /// CPUs this agent may use: its affinity mask, within its cgroup's quota.
    pub cpus: u32,
    /// Free-form `key=value` pairs given to the worker (`--label`).
    pub extra: Vec<(String, String)>,
}
