//! A pool's connection to the orchestrator ([`Client`]) and the blobs it
//! submits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::core::Input;
use super::handle::Event;
use crate::ids::{ClientId, FnId, JobId};
use crate::mailbox::{Completion, Mailbox, Waited};
use crate::payload::Payload;
use crate::{Error, Result};

/// Room kept in a frame for its lengths and header, beside the payload.
const FRAME_OVERHEAD: usize = 1024;

/// A pool's connection to the orchestrator.
pub struct Client {
    id: ClientId,
    max_frame: usize,
    events: mpsc::UnboundedSender<Event>,
    mailbox: Arc<Mailbox>,
    next_job: AtomicU64,
}

impl Client {
    pub(super) fn new(
        id: ClientId,
        max_frame: usize,
        events: mpsc::UnboundedSender<Event>,
        mailbox: Arc<Mailbox>,
    ) -> Self {
        Self { id, max_frame, events, mailbox, next_job: AtomicU64::new(1) }
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    /// A fresh job number for this client.
    pub fn new_job(&self) -> JobId {
        JobId(self.next_job.fetch_add(1, Ordering::Relaxed))
    }

    /// Queue tasks `(index, payload)` of `job`, all calling the pickled
    /// `function`, each allowed to run for at most `timeout`. Executors load
    /// the blobs `needs` first (the driver's main module, say); like the
    /// function, each reaches an agent once.
    pub fn submit(
        &self,
        job: JobId,
        function: Bytes,
        needs: Vec<Blob>,
        tasks: Vec<(u32, Payload)>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        // Refuse here, in the caller, what no connection could carry.
        let limit = self.max_frame.saturating_sub(FRAME_OVERHEAD);
        let largest = tasks
            .iter()
            .map(|(_, p)| p.len())
            .chain(needs.iter().map(|b| b.bytes.len()))
            .chain([function.len()])
            .max()
            .unwrap_or(0);
        if largest > limit {
            return Err(Error::TooLarge(format!(
                "a task of {largest} bytes exceeds the frame limit of {} bytes",
                self.max_frame
            )));
        }
        let needs: Vec<(FnId, Bytes)> = needs.into_iter().map(|b| (b.id, b.bytes)).collect();
        let need_ids: Vec<FnId> = needs.iter().map(|(id, _)| *id).collect();
        let fn_id = content_id(&function, &need_ids);
        let timeout_ms = timeout.map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64);
        let submit = Input::Submit { client: self.id, job, fn_id, function, needs, tasks, timeout_ms };
        self.events.send(Event::Core(submit)).map_err(|_| Error::Closed)
    }

    /// Wait up to `timeout` for completions; returns all that are ready
    /// (possibly none). `Err(Closed)` once the orchestrator is gone.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<Completion>> {
        self.mailbox.recv(timeout)
    }

    /// The caller will wait for `job` itself (`wait`), so its completion
    /// skips `recv`. Call before submitting the job.
    pub fn expect(&self, job: JobId) {
        self.mailbox.expect(job);
    }

    /// Wait up to `timeout` for an expected job: `Ok(None)` if not done yet.
    pub fn wait(&self, job: JobId, timeout: Duration) -> Result<Option<Completion>> {
        self.mailbox.wait(job, timeout)
    }

    /// A caller may wait for `job` itself (`wait_offered`); if its
    /// completion arrives while nobody does, it goes to `recv`. Call before
    /// submitting the job.
    pub fn offer(&self, job: JobId) {
        self.mailbox.offer(job);
    }

    /// Wait up to `timeout` for an offered job's completion.
    pub fn wait_offered(&self, job: JobId, timeout: Duration) -> Result<Waited> {
        self.mailbox.wait_offered(job, timeout)
    }

    /// Stop expecting `job`: its completion goes to `recv` after all.
    pub fn forget(&self, job: JobId) {
        self.mailbox.forget(job);
    }

    /// Take back the tasks of `job` that no worker has been given yet.
    /// Returns their indexes, in order: those tasks will never complete,
    /// and every other task of the job completes exactly once (or is
    /// cancelled with its client).
    pub fn withdraw(&self, job: JobId) -> Result<Vec<u32>> {
        let (reply, rx) = oneshot::channel();
        self.events.send(Event::Withdraw { client: self.id, job, reply }).map_err(|_| Error::Closed)?;
        rx.blocking_recv().map_err(|_| Error::Closed)
    }

    /// Say what `job` is, for a dashboard: its `kind` (`map`, `apply`, ...),
    /// the function's `name` and its number of `items`, if known. Call it
    /// before the job's first submit; it costs nothing to skip.
    pub fn describe(&self, job: JobId, kind: String, name: String, items: Option<u64>) -> Result<()> {
        let describe = Input::Describe { client: self.id, job, kind, name, items };
        self.events.send(Event::Core(describe)).map_err(|_| Error::Closed)
    }

    /// Task `index` of `job` returned an exception its function raised,
    /// with this traceback (counted in the metrics, shown by a dashboard).
    pub fn raised(&self, job: JobId, index: u32, text: String) -> Result<()> {
        let raised = Input::Raised { client: self.id, job, index, text };
        self.events.send(Event::Core(raised)).map_err(|_| Error::Closed)
    }

    /// Cancel everything this client submitted and detach it.
    pub fn close(&self) {
        let _ = self.events.send(Event::Core(Input::ClientClosed { client: self.id }));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

/// Bytes that executors load before a function (see [`Client::submit`]),
/// with their content address, computed once.
#[derive(Debug, Clone)]
pub struct Blob {
    pub id: FnId,
    pub bytes: Bytes,
}

impl Blob {
    pub fn new(bytes: Bytes) -> Self {
        Self { id: function_id(&bytes), bytes }
    }
}

/// Content address of a pickled function that names `needs`: the same
/// function with other needs is another function.
pub fn content_id(function: &[u8], needs: &[FnId]) -> FnId {
    let mut h = ContentHasher::default();
    h.update(function);
    h.finish(needs)
}

/// [`content_id`] of a function that arrives in pieces: `update` with each
/// in order, then `finish`. BLAKE3: a cryptographic hash (an agent checks a
/// function fetched from another against its id), and 2.3× as fast as
/// SHA-256 with the CPU's SHA instructions here (3.4 against 1.5 GiB/s on
/// one core), which counts for a function of hundreds of MiB: the driver
/// hashes it at every call, each agent that fetches it once.
#[derive(Default, Clone)]
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    pub fn finish(mut self, needs: &[FnId]) -> FnId {
        for id in needs {
            self.0.update(&id.0.to_le_bytes());
        }
        let hash = self.0.finalize();
        FnId(u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")))
    }
}

/// Content address of a pickled function (one that names no needs).
pub fn function_id(bytes: &[u8]) -> FnId {
    content_id(bytes, &[])
}
