//! The orchestrator: accepts agents, schedules tasks, routes results.
//!
//! It runs on its own tokio runtime inside the driver process. Its state —
//! the [`Scheduler`](distripool_scheduler::Scheduler), task metadata and the
//! function registry — lives in one [`core::Core`], a state machine without
//! I/O, driven by one task that owns it, so there is no lock on the per-task
//! path.
//!
//! ```text
//!  Client::submit ──┐                                  ┌─► session writer ─► socket
//!  session reader ──┼─► events ─► core task ─► Core ───┤
//!  intake ──────────┘             (owns the Comm)      └─► Client mailbox
//! ```
//!
//! | file | what it does |
//! |---|---|
//! | `handle.rs` | [`Orchestrator`], the API; the task that drives the core |
//! | `client.rs` | [`Client`]: a pool's connection, submitting and receiving |
//! | `core.rs` | the state machine: inputs in, frames and completions out |
//! | `spread.rs` | which agent each agent fetches a large function from |
//! | `intake.rs` | accepting connections and authenticating them |
//! | `session.rs` | one authenticated agent: its reader and writer |
//! | `snapshot.rs` | what the core shows: workers, clients, events |
//! | `observe.rs` | what it keeps while a dashboard watches: task times, jobs |

mod client;
mod core;
mod handle;
mod intake;
pub mod observe;
mod session;
pub mod snapshot;
mod spread;

pub use client::{content_id, function_id, Blob, Client, ContentHasher};
pub use core::CoreMetrics;
pub use distripool_scheduler::FailureKind;
pub use handle::{CoreLink, Orchestrator, OrchestratorConfig, Stats};
pub use observe::{Histogram, JobInfo, Refusal, TaskError};
pub use snapshot::{ClientInfo, Event, EventKind, Snapshot, Usage, WorkerInfo, WorkerState};
