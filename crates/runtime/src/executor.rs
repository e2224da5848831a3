//! Executor processes and the agent ↔ executor wire format.
//!
//! Each executor is `python -m distripool._executor`, started fresh (never
//! forked from a process that runs tokio), in its own process group, with one
//! end of a unix socket pair as file descriptor 3. Frames on that socket:
//!
//! ```text
//! +-------------+----------+----------+----------+-----------------+
//! | len: u32 LE | kind: u8 | a: u64 LE| b: u64 LE| payload         |
//! +-------------+----------+----------+----------+-----------------+
//!               \________________ len bytes _____________________/
//! ```
//!
//! | kind | direction | a | b | payload |
//! |---|---|---|---|---|
//! | 1 FUNCTION | agent → executor | fn id | n needs | n ids (u64 LE), then the pickled function |
//! | 2 TASK | agent → executor | task id | fn id | pickled arguments |
//! | 3 FORGET | agent → executor | fn id | – | – |
//! | 4 RESULT | executor → agent | task id | – | pickled outcome |
//! | 5 RETIRE | executor → agent | – | – | – |
//! | 6 READY | executor → agent | pid | 1 if it opened the probe memfd | – |
//! | 7 TASK_SHARED | agent → executor | task id | fn id | memfds (see below), then the envelope's head |
//! | 8 FUNCTION_SHARED | agent → executor | fn id | n needs | n ids (u64 LE), then u32 fd, u64 inode, u64 length of the pickled function in a memfd of the agent's |
//!
//! RETIRE means the executor has run as many tasks as its pool allows
//! (`maxtasksperchild`) and exits cleanly right after; whatever it was sent
//! beyond that goes to its replacement.
//!
//! A FUNCTION's needs are blobs sent to the executor before it (as FUNCTION
//! frames without needs) that it loads before the function: the driver's
//! main module, say.
//!
//! READY is the executor's first frame, once the interpreter is up. An
//! executor that dies before it is ready never started the task it holds.
//! The executor answers tasks strictly in the order it receives them.
//!
//! Large buffers go through memfds the agent owns (`shared_mem.rs`): a
//! TASK_SHARED frame names the memfd holding its envelope's inline buffers
//! (u32 fd, or `u32::MAX` for none; after the head, in place) and a reply
//! memfd (u32 fd), then their inodes and the buffers' length (u64 each). A
//! RESULT's `b` says whether its buffers are in that reply memfd (bit 0: its
//! payload then starts with their places) and whether the task kept a view
//! of its arguments (bit 1: that memfd is never used again). A function
//! (or a blob it needs) of 1 MiB or more goes as FUNCTION_SHARED: the agent
//! copies it once into a memfd that all its executors map, and keeps it
//! until the function is forgotten.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cgroup::{self, MemoryLimit};
use crate::conn::{write_batches, Sink};
use crate::ids::{FnId, Generation, TaskId};
use crate::payload::Payload;
use crate::shared_mem::{self, Sharing};

pub const KIND_FUNCTION: u8 = 1;
pub const KIND_TASK: u8 = 2;
pub const KIND_FORGET: u8 = 3;
pub const KIND_RESULT: u8 = 4;
pub const KIND_RETIRE: u8 = 5;
pub const KIND_READY: u8 = 6;
pub const KIND_TASK_SHARED: u8 = 7;
pub const KIND_FUNCTION_SHARED: u8 = 8;
/// Bytes counted by `len` before the payload: kind, a, b.
const BODY_HEADER: usize = 17;
/// Bytes a result's frame may grow by when the agent relays it.
const RELAY_OVERHEAD: usize = 1024;
/// File descriptor number of the socket inside the executor.
pub const EXECUTOR_FD: i32 = 3;

/// How to start an executor.
#[derive(Debug, Clone)]
pub struct ExecutorSpec {
    pub python: String,
    pub module: String,
    pub env: Vec<(String, String)>,
    pub max_frame: usize,
    /// Each executor in a cgroup of its own with this memory limit.
    pub memory: Option<std::sync::Arc<MemoryLimit>>,
    /// What large goes to executors through memfds the agent owns.
    pub share: Share,
}

/// What large goes to an agent's executors through memfds it owns, where
/// they can open them (each says so as it starts, from a probe memfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Nothing: every frame through the executor's socket.
    Nothing,
    /// Large functions, which all its executors map (an embedded pool: its
    /// driver puts tasks' buffers in memfds of its own).
    Functions,
    /// Large functions, and tasks' large buffers and results (a worker's
    /// agent).
    All,
}

/// What the agent sends to one executor.
#[derive(Debug)]
pub enum ExecIn {
    /// A function, and the blobs (sent before it) to load before it.
    Function {
        fn_id: FnId,
        needs: Vec<FnId>,
        bytes: Bytes,
    },
    Task {
        task: TaskId,
        fn_id: FnId,
        payload: Bytes,
    },
    Forget {
        fn_id: FnId,
    },
}

impl IntoIterator for ExecIn {
    type Item = Self;
    type IntoIter = std::iter::Once<Self>;
    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self)
    }
}

/// The agent's end of an executor's socket, as a sink for [`write_batches`].
struct ExecWriter(BufWriter<tokio::net::unix::OwnedWriteHalf>, Arc<Mutex<Sharing>>);

fn lock(s: &Mutex<Sharing>) -> std::sync::MutexGuard<'_, Sharing> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sink<ExecIn> for ExecWriter {
    async fn put(&mut self, m: ExecIn) -> crate::Result<()> {
        let (kind, a, b, payload, needs) = match m {
            ExecIn::Function { fn_id, needs, bytes } => {
                if self.put_shared_function(fn_id, &needs, &bytes).await? {
                    return Ok(());
                }
                (KIND_FUNCTION, fn_id.0, needs.len() as u64, bytes, needs)
            }
            ExecIn::Task { task, fn_id, payload } => {
                if self.put_shared(task, fn_id, &payload).await? {
                    return Ok(());
                }
                (KIND_TASK, task.0, fn_id.0, payload, Vec::new())
            }
            ExecIn::Forget { fn_id } => {
                lock(&self.1).functions.remove(&fn_id.0);
                (KIND_FORGET, fn_id.0, 0, Bytes::new(), Vec::new())
            }
        };
        // A function's needs, `b` ids of 8 bytes, come first in its body.
        self.0.write_all(&encode_header(kind, a, b, needs.len() * 8 + payload.len())).await?;
        for need in needs {
            self.0.write_all(&need.0.to_le_bytes()).await?;
        }
        self.0.write_all(&payload).await?;
        Ok(())
    }
    async fn flush(&mut self) -> crate::Result<()> {
        Ok(self.0.flush().await?)
    }
}

/// What an executor reports back, tagged with its slot and generation so that
/// events from a replaced executor can be told apart.
#[derive(Debug)]
pub enum ExecEvent {
    Result {
        slot: usize,
        generation: Generation,
        task: TaskId,
        payload: Payload,
    },
    /// The executor is up and about to read its first task.
    Ready {
        slot: usize,
        generation: Generation,
    },
    /// The executor will exit after its last result; not a crash.
    Retiring {
        slot: usize,
        generation: Generation,
    },
    Exited {
        slot: usize,
        generation: Generation,
        reason: String,
    },
}

/// A running executor. Dropping it kills the executor's whole process group.
pub struct ExecutorHandle {
    pub tx: mpsc::UnboundedSender<ExecIn>,
    pub pid: u32,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for ExecutorHandle {
    fn drop(&mut self) {
        kill_group(self.pid);
        self.writer.abort();
        self.reader.abort();
    }
}

impl ExecutorHandle {
    /// Close the executor's socket: it leaves as a `multiprocessing` pool's
    /// worker does at `join`, running its exit handlers (a queue's feeder
    /// thread flushes what its tasks put). See [`Self::exited`].
    pub fn close(&mut self) {
        // The writer ends when its channel does, and its end of the socket
        // closes with it.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, closed));
    }

    /// Wait for the executor to exit (it was closed, say). Dropping the
    /// handle afterwards kills what is left of its process group.
    pub async fn exited(&mut self) {
        let _ = (&mut self.reader).await;
    }
}

fn kill_group(pid: u32) {
    // The executor leads its own process group, so this also reaches any
    // process the task started. SAFETY: plain syscall on a pid we spawned.
    unsafe {
        libc::killpg(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Human-readable cause of an executor's end.
pub fn describe_exit(pid: u32, status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("executor (pid {pid}) exited with code {code}"),
            (None, Some(sig)) => {
                format!("executor (pid {pid}) was killed by signal {sig} ({})", signal_name(sig))
            }
            _ => format!("executor (pid {pid}) ended: {s}"),
        },
        Err(e) => format!("executor (pid {pid}) ended, status unknown: {e}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

fn encode_header(kind: u8, a: u64, b: u64, payload_len: usize) -> [u8; 4 + BODY_HEADER] {
    let mut h = [0u8; 4 + BODY_HEADER];
    h[..4].copy_from_slice(&((BODY_HEADER + payload_len) as u32).to_le_bytes());
    h[4] = kind;
    h[5..13].copy_from_slice(&a.to_le_bytes());
    h[13..21].copy_from_slice(&b.to_le_bytes());
    h
}

/// Start one executor for `slot`.
pub fn spawn(
    spec: &ExecutorSpec,
    slot: usize,
    generation: Generation,
    events: mpsc::UnboundedSender<ExecEvent>,
) -> std::io::Result<ExecutorHandle> {
    let group = match &spec.memory {
        Some(limit) => Some(limit.executor_cgroup(slot, generation)?),
        None => None,
    };
    let join = group.as_ref().map(|g| g.procs().clone());
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let child_fd = theirs.as_raw_fd();

    let mut cmd = tokio::process::Command::new(&spec.python);
    cmd.arg("-m")
        .arg(&spec.module)
        .env("DISTRIPOOL_EXECUTOR_FD", EXECUTOR_FD.to_string())
        // Leave room for the frame that carries a result on to the orchestrator.
        .env("DISTRIPOOL_MAX_FRAME", spec.max_frame.saturating_sub(RELAY_OVERHEAD).to_string())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .envs(
            (spec.share != Share::Nothing)
                .then(shared_mem::probe)
                .flatten()
                .map(|p| ("DISTRIPOOL_AGENT_MEMFD", p)),
        )
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let agent_pid = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // If the agent dies, however it dies, its executors die with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != agent_pid {
                // The agent is already gone.
                libc::_exit(1);
            }
            // Into the executor's own cgroup before anything is allocated.
            if let Some(procs) = &join {
                cgroup::join_in_child(procs)?;
            }
            if child_fd == EXECUTOR_FD {
                let flags = libc::fcntl(child_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, EXECUTOR_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);

    ours.set_nonblocking(true)?;
    let stream = UnixStream::from_std(ours)?;
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<ExecIn>();
    let sharing = Arc::new(Mutex::new(Sharing::default()));
    lock(&sharing).share_tasks = spec.share == Share::All;

    let shared = sharing.clone();
    let writer = tokio::spawn(async move {
        let sink = ExecWriter(BufWriter::with_capacity(64 * 1024, wr), shared);
        // On an error the reader sees the executor's end and reports it.
        let _ = write_batches(sink, &mut rx, None::<(Duration, fn() -> ExecIn)>, |_| {}).await;
    });

    let max_frame = spec.max_frame;
    let reader = tokio::spawn(async move {
        let mut buf = ReadBuffer::default();
        let mut protocol_error = None;
        loop {
            match next_result(&mut rd, &mut buf, max_frame).await {
                Ok(Some(Incoming::Result(task, flags, payload))) => {
                    let returned = lock(&sharing).finished(task.0, flags, payload);
                    match returned.payload() {
                        Ok(payload) => {
                            let _ = events.send(ExecEvent::Result { slot, generation, task, payload });
                        }
                        Err(e) => {
                            protocol_error = Some(e);
                            kill_group(pid);
                            break;
                        }
                    }
                }
                Ok(Some(Incoming::Retire)) => {
                    let _ = events.send(ExecEvent::Retiring { slot, generation });
                }
                Ok(Some(Incoming::Ready(can_open))) => {
                    lock(&sharing).can_open = can_open;
                    let _ = events.send(ExecEvent::Ready { slot, generation });
                }
                Ok(None) => break,
                // A killed executor resets its end of the socket: that is an
                // end, not a protocol error.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    break
                }
                Err(e) => {
                    protocol_error = Some(e);
                    kill_group(pid);
                    break;
                }
            }
        }
        let status = child.wait().await;
        let killed = matches!(&status, Ok(s) if s.signal() == Some(libc::SIGKILL));
        let mut reason = describe_exit(pid, status);
        if let Some(group) = group {
            if killed && group.oom_kills() > 0 {
                reason = format!(
                    "executor (pid {pid}) ran out of memory: the kernel killed it at its limit of {} \
                     (the worker's --memory-limit)",
                    cgroup::show_bytes(group.limit_bytes())
                );
            }
            // Whatever the task started goes too, so that the cgroup empties.
            kill_group(pid);
        }
        if let Some(e) = protocol_error {
            reason = format!("{reason} after a protocol error: {e}");
        }
        let _ = events.send(ExecEvent::Exited { slot, generation, reason });
    });

    Ok(ExecutorHandle { tx, pid, reader, writer })
}

enum Incoming {
    /// A task's result, the frame's `b` and its payload.
    Result(TaskId, u64, Bytes),
    Retire,
    /// Whether it opened the probe memfd.
    Ready(bool),
}

/// Results as they arrive from the executor's socket. A large result's
/// memory is used again for the next large one once the session has sent
/// the first on (a new allocation of that size would fault in every page).
struct ReadBuffer {
    buf: BytesMut,
    /// The memory the last large result was split from.
    large: Option<BytesMut>,
}

/// Room read ahead for small frames.
const READ_AHEAD: usize = 64 * 1024;

impl Default for ReadBuffer {
    fn default() -> Self {
        Self { buf: BytesMut::with_capacity(READ_AHEAD), large: None }
    }
}

impl ReadBuffer {
    /// Make room for `want` more bytes: in the last large result's memory if
    /// that is free again and big enough.
    fn reserve(&mut self, want: usize) {
        let need = self.buf.len() + want;
        if need > READ_AHEAD {
            if let Some(mut large) = self.large.take() {
                if large.try_reclaim(need) {
                    large.extend_from_slice(&self.buf);
                    self.buf = large;
                    return;
                }
                self.large = Some(large);
            }
        }
        self.buf.reserve(want);
    }

    /// The next `n` bytes, split off; a large part keeps its memory's handle.
    fn split_to(&mut self, n: usize) -> Bytes {
        let part = self.buf.split_to(n).freeze();
        if n > READ_AHEAD {
            let mut rest = std::mem::replace(&mut self.buf, BytesMut::with_capacity(READ_AHEAD));
            self.buf.extend_from_slice(&rest);
            rest.clear();
            self.large = Some(rest);
        }
        part
    }
}

async fn next_result(
    rd: &mut tokio::net::unix::OwnedReadHalf,
    rb: &mut ReadBuffer,
    max_frame: usize,
) -> std::io::Result<Option<Incoming>> {
    loop {
        let buf = &mut rb.buf;
        if buf.len() >= 4 {
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if !(BODY_HEADER..=max_frame).contains(&len) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("executor sent a frame of {len} bytes (limit {max_frame})"),
                ));
            }
            if buf.len() >= 4 + len {
                let kind = buf[4];
                let task = u64::from_le_bytes(buf[5..13].try_into().expect("8 bytes"));
                let b = u64::from_le_bytes(buf[13..21].try_into().expect("8 bytes"));
                buf.advance(4 + BODY_HEADER);
                let payload = rb.split_to(len - BODY_HEADER);
                return match kind {
                    KIND_RESULT => Ok(Some(Incoming::Result(TaskId(task), b, payload))),
                    KIND_RETIRE => Ok(Some(Incoming::Retire)),
                    KIND_READY => Ok(Some(Incoming::Ready(b == 1))),
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("executor sent unexpected frame kind {kind}"),
                    )),
                };
            }
            let have = buf.len();
            rb.reserve(4 + len - have);
        } else {
            rb.reserve(READ_AHEAD);
        }
        if rd.read_buf(&mut rb.buf).await? == 0 {
            return Ok(None);
        }
    }
}

#[path = "executor_shared.rs"]
mod shared;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_result_reuses_the_memory_the_last_one_freed() {
        // The agent reads on while the session still sends the last large
        // result on; the next large one must land in the memory that result
        // leaves once it is sent, not in fresh pages.
        let (theirs, ours) = UnixStream::pair().unwrap();
        let (mut rd, _wr) = ours.into_split();
        let (_, mut w) = theirs.into_split();
        let big = vec![5u8; 4 << 20];
        let frame = [&encode_header(KIND_RESULT, 7, 0, big.len())[..], &big].concat();
        let mut rb = ReadBuffer::default();
        let writer = tokio::spawn(async move {
            w.write_all(&frame).await.unwrap();
            (w, frame)
        });
        let Some(Incoming::Result(_, _, first)) = next_result(&mut rd, &mut rb, 1 << 30).await.unwrap()
        else {
            panic!("expected a result");
        };
        let (mut w, frame) = writer.await.unwrap();
        // The start of the next frame arrives while the first is still held.
        w.write_all(&frame[..2]).await.unwrap();
        while rb.buf.len() < 2 {
            let _ = tokio::time::timeout(Duration::ZERO, next_result(&mut rd, &mut rb, 1 << 30)).await;
            tokio::task::yield_now().await;
        }
        let at = first.as_ptr() as usize;
        drop(first);
        let writer = tokio::spawn(async move { w.write_all(&frame[2..]).await.unwrap() });
        let Some(Incoming::Result(task, _, second)) = next_result(&mut rd, &mut rb, 1 << 30).await.unwrap()
        else {
            panic!("expected a result");
        };
        writer.await.unwrap();
        assert_eq!(task, TaskId(7));
        assert_eq!(second.len(), big.len());
        assert!(second.iter().all(|&b| b == 5));
        let now = second.as_ptr() as usize;
        assert!(now.abs_diff(at) < 4096, "the second result is at {now:#x}, the first was at {at:#x}");
    }
}
