//! Memfds the agent owns, through which large buffers reach its executors
//! and come back, as the driver's do in an embedded pool (`_memfds.py`):
//! the agent copies a task's inline buffers into one, once, and the
//! executor maps it; the executor writes a large result into another, and
//! the agent sends it on to the orchestrator from a mapping of it. Neither
//! crosses the executor's socket.
//!
//! Executors open them through `/proc/<agent pid>/fd/<fd>`, checking the
//! inode (a reused descriptor number is never mistaken for the memfd
//! meant). Whether they can at all (a locked-down `/proc` may forbid it) each
//! executor answers as it starts, from a probe memfd named in its
//! environment (`DISTRIPOOL_AGENT_MEMFD`); until it says yes, its buffers go
//! inline. A memfd is used again only when nothing maps it: an executor says
//! when its task kept a view of its arguments, and that memfd is retired.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// Buffers at least this large go through memfds (the driver's threshold).
pub const AT_LEAST: usize = 1 << 20;
/// Idle memfds kept for reuse, in bytes, across the agent's executors.
const IDLE_BYTES: usize = 256 << 20;
/// Memfds leased at once; past this, buffers go inline.
const MAX_LEASED: usize = 128;
/// Executors check this prefix (`MEMFD_NAME` in `_envelope.py`).
const NAME: &std::ffi::CStr = c"distripool-agent";
/// The probe's, apart from the memfds that carry data.
const PROBE_NAME: &std::ffi::CStr = c"distripool-agent-probe";
const PAGE: usize = 4096;

/// One memfd and what it is known by.
pub struct Memfd {
    pub(crate) fd: OwnedFd,
    inode: u64,
    /// A mapping of it, kept from the last time it was written or read
    /// through one: the next time finds its pages mapped (mapping and
    /// populating 64 MiB afresh, then unmapping it, cost the agent a few
    /// milliseconds of every large argument and result).
    view: Option<View>,
}

impl Memfd {
    pub(crate) fn new() -> io::Result<Self> {
        Self::named(NAME)
    }

    fn named(name: &std::ffi::CStr) -> io::Result<Self> {
        // SAFETY: memfd_create returns a new descriptor we then own.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a valid descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let inode = stat(&fd)?.st_ino;
        Ok(Self { fd, inode, view: None })
    }

    fn size(&self) -> io::Result<usize> {
        Ok(stat(&self.fd)?.st_size as usize)
    }

    /// Keep a mapping of all `size` bytes of it in place of the one it had:
    /// of the whole memfd (it only grows), so that a later, larger buffer
    /// within it needs no new one either.
    fn map_whole(&mut self, size: usize) -> io::Result<()> {
        self.view = None;
        self.view = Some(View::of(&self.fd, size)?);
        Ok(())
    }

    /// `(fd, inode)`, as the executor names it.
    pub fn name(&self) -> (u32, u64) {
        (self.fd.as_raw_fd() as u32, self.inode)
    }
}

fn stat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: fstat writes only into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

#[derive(Default)]
struct Pool {
    idle: Vec<(Memfd, usize)>,
    idle_bytes: usize,
    leased: usize,
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    POOL.get_or_init(Mutex::default)
}

fn locked() -> std::sync::MutexGuard<'static, Pool> {
    pool().lock().unwrap_or_else(|e| e.into_inner())
}

/// A memfd lent to one task; dropped, it goes back to the pool.
pub struct Lease(Option<Memfd>);

impl Lease {
    /// A memfd to hold `need` bytes: the smallest idle one that fits, else
    /// the largest (it grows), else a new one; None past [`MAX_LEASED`] or
    /// when none can be made.
    pub fn take(need: usize) -> Option<Lease> {
        let mut p = locked();
        if p.leased >= MAX_LEASED {
            return None;
        }
        let fits =
            p.idle.iter().enumerate().filter(|(_, (_, size))| *size >= need).min_by_key(|(_, (_, s))| *s);
        let pick = fits
            .map(|(i, _)| i)
            .or_else(|| p.idle.iter().enumerate().max_by_key(|(_, (_, s))| *s).map(|(i, _)| i));
        let memfd = match pick {
            Some(i) => {
                let (m, size) = p.idle.swap_remove(i);
                p.idle_bytes -= size;
                m
            }
            None => Memfd::new().ok()?,
        };
        p.leased += 1;
        Some(Lease(Some(memfd)))
    }

    pub fn memfd(&self) -> &Memfd {
        self.0.as_ref().expect("a lease holds its memfd until dropped")
    }

    fn memfd_mut(&mut self) -> &mut Memfd {
        self.0.as_mut().expect("a lease holds its memfd until dropped")
    }

    /// Never use it again (an executor still maps it): close it.
    pub fn retire(mut self) {
        self.0 = None;
        locked().leased -= 1;
    }

    /// Copy `data` to the start of the memfd, growing it to fit: through
    /// the memfd's kept mapping when it holds them, else with `pwrite`
    /// (faster into pages the memfd does not have yet), after which the
    /// memfd is mapped, to be written through the next time.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let m = self.memfd_mut();
        if let Some(view) = m.view.as_ref().filter(|v| v.len >= data.len()) {
            // SAFETY: the view is writable and holds `data.len()` bytes;
            // nothing reads this memfd while it is leased to be written.
            unsafe { distripool_memfd::copy(data.as_ptr(), view.addr as *mut u8, data.len()) };
            return Ok(());
        }
        let size = m.size()?;
        let need = data.len().next_multiple_of(PAGE);
        if size < data.len() {
            // SAFETY: plain syscall on our descriptor.
            if unsafe { libc::ftruncate(m.fd.as_raw_fd(), need as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `data` stays borrowed for the call.
        unsafe { distripool_memfd::write_from(m.fd.as_raw_fd(), data.as_ptr(), data.len(), 0) }?;
        if data.len() >= AT_LEAST {
            // Written already: without a mapping (none to be had), the next
            // write is a `pwrite` again, not a failure.
            let _ = m.map_whole(size.max(need));
        }
        Ok(())
    }

    /// The buffers at `(offset, length)` in the memfd, as parts that read
    /// a shared mapping of it; the lease goes back when the last is dropped,
    /// with the mapping, which the memfd's next result reads through again.
    pub fn parts(mut self, at: &[(u64, u64)]) -> io::Result<Vec<Bytes>> {
        let end = at.iter().map(|&(o, n)| o.saturating_add(n)).max().unwrap_or(0) as usize;
        if end == 0 {
            return Ok(Vec::new());
        }
        let size = self.memfd().size()?;
        if size < end {
            // Reading a mapping past the end of its file would kill the
            // agent (SIGBUS): refuse here instead.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the executor's reply ends at byte {end}, past the end of its memfd"),
            ));
        }
        let memfd = self.memfd_mut();
        if memfd.view.as_ref().is_none_or(|v| v.len < end) {
            memfd.map_whole(size)?;
        }
        let map = Arc::new(self);
        Ok(at
            .iter()
            .map(|&(o, n)| Bytes::from_owner(Slice { map: map.clone(), at: o as usize, len: n as usize }))
            .collect())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(memfd) = self.0.take() else {
            return;
        };
        let size = memfd.size().unwrap_or(usize::MAX);
        let mut p = locked();
        p.leased -= 1;
        if p.idle_bytes.saturating_add(size) <= IDLE_BYTES {
            p.idle_bytes += size;
            p.idle.push((memfd, size));
        }
    }
}

/// A shared mapping of a whole memfd, its pages populated.
struct View {
    addr: usize,
    len: usize,
}

impl View {
    fn of(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        // Inside the file, which never shrinks.
        let addr =
            distripool_memfd::map_shared(fd.as_raw_fd(), 0, len).ok_or_else(io::Error::last_os_error)?;
        Ok(View { addr: addr as usize, len })
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: our mapping; nothing reads it any more (the parts that did
        // held the lease, and with it the memfd this belongs to).
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
    }
}

/// One buffer of a result, read through the view of the memfd its lease
/// holds.
struct Slice {
    map: Arc<Lease>,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        let view = self.map.memfd().view.as_ref().expect("made before the parts");
        // SAFETY: inside the view (checked against the file when the parts
        // were made), which lives as long as the lease this slice holds.
        unsafe { std::slice::from_raw_parts((view.addr + self.at) as *const u8, self.len) }
    }
}

/// `pid:fd:inode` of a memfd kept open for executors to try opening as
/// they start; None if the agent cannot make one.
pub fn probe() -> Option<&'static str> {
    static PROBE: OnceLock<Option<(Memfd, String)>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let m = Memfd::named(PROBE_NAME).ok()?;
            let (fd, inode) = m.name();
            let named = format!("{}:{fd}:{inode}", std::process::id());
            Some((m, named))
        })
        .as_ref()
        .map(|(_, s)| s.as_str())
}

/// A RESULT frame's `b`: its buffers are in the reply memfd (the payload
/// starts with their places: u32 count, then (u64 offset, u64 length) each).
pub const IN_REPLY: u64 = 1;
/// A RESULT frame's `b`: the task kept a view of its arguments' memfd.
pub const KEPT: u64 = 2;
/// No memfd, in a TASK_SHARED frame's prefix.
const NONE: u32 = u32::MAX;
/// Functions remembered as returning large results, per executor.
const BIG_FNS: usize = 64;

/// One executor's side of the agent's memfds: whether it can open them, the
/// memfds its tasks hold in the order it was sent them (it answers in that
/// order), and the functions whose last result was large (their next tasks
/// get a reply memfd whatever their arguments).
#[derive(Default)]
pub struct Sharing {
    /// The executor opened the probe memfd as it started.
    pub can_open: bool,
    /// Tasks' large buffers and results go through memfds too, not only
    /// functions.
    pub share_tasks: bool,
    held: std::collections::VecDeque<Held>,
    /// Function id -> the size of its last large result.
    big_fns: std::collections::HashMap<u64, usize>,
    /// Large functions the executor was sent in memfds, until forgotten.
    pub functions: std::collections::HashMap<u64, Arc<crate::function_mem::FunctionMemfd>>,
}

struct Held {
    task: u64,
    fn_id: u64,
    args: Option<Lease>,
    reply: Option<Lease>,
}

/// How a task goes to its executor.
pub enum Plan {
    /// As it is, in a TASK frame.
    Inline,
    /// A TASK_SHARED frame: the envelope's head (or the whole payload), its
    /// inline buffers copied into `args` first, and a reply memfd.
    Shared { head: Bytes, tail: Option<(Bytes, Lease)>, reply: Lease },
}

impl Sharing {
    /// How `payload` of `task`, calling `fn_id`, should go: through memfds
    /// when its inline buffers are large (an envelope `0x01 ‖ u32 meta
    /// length ‖ meta ‖ buffers`) or its function's last result was. A task
    /// that goes inline is counted as sent here (one lock per small task);
    /// a shared one with [`sent`](Self::sent), once its memfds are written.
    pub fn plan(&mut self, task: u64, fn_id: u64, payload: &Bytes) -> Plan {
        if !self.can_open || !self.share_tasks {
            // Nothing to remember: a result without a record is passed on.
            return Plan::Inline;
        }
        let plan = self.shared_plan(fn_id, payload);
        if matches!(plan, Plan::Inline) {
            self.sent(task, fn_id, None, None);
        }
        plan
    }

    fn shared_plan(&self, fn_id: u64, payload: &Bytes) -> Plan {
        let head = (payload.len() >= AT_LEAST + 5 && payload[0] == 1)
            .then(|| 5 + u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize)
            .filter(|&h| payload.len().saturating_sub(h) >= AT_LEAST);
        let last = self.big_fns.get(&fn_id).copied();
        if head.is_none() && last.is_none() {
            return Plan::Inline;
        }
        // A reply memfd as large as the function's last result, or else as
        // its arguments (what `identity` returns).
        let guess = last.unwrap_or_else(|| payload.len() - head.unwrap_or(0));
        let Some(reply) = Lease::take(guess) else {
            return Plan::Inline;
        };
        match head {
            None => Plan::Shared { head: payload.clone(), tail: None, reply },
            Some(h) => match Lease::take(payload.len() - h) {
                Some(args) => {
                    Plan::Shared { head: payload.slice(..h), tail: Some((payload.slice(h..), args)), reply }
                }
                None => Plan::Inline,
            },
        }
    }

    /// The task is about to be sent, holding these memfds.
    pub fn sent(&mut self, task: u64, fn_id: u64, args: Option<Lease>, reply: Option<Lease>) {
        self.held.push_back(Held { task, fn_id, args, reply });
    }

    /// A RESULT for `task` with `flags` arrived: what it held is let go (or
    /// retired, if kept), and what it returned is read. Call
    /// [`Returned::payload`] on the answer without the lock held.
    pub fn finished(&mut self, task: u64, flags: u64, payload: Bytes) -> Returned {
        let held = match self.held.front() {
            Some(h) if h.task == task => self.held.pop_front(),
            _ => None,
        };
        let Some(Held { fn_id, args, reply, .. }) = held else {
            return Returned { payload, reply: None, in_reply: flags & IN_REPLY != 0 };
        };
        if flags & KEPT != 0 {
            if let Some(args) = args {
                args.retire();
            }
        }
        if flags & IN_REPLY != 0 {
            let size = reply.as_ref().and_then(|r| r.memfd().size().ok()).unwrap_or(AT_LEAST);
            self.remember(fn_id, Some(size));
            return Returned { payload, reply, in_reply: true };
        }
        if payload.len() >= AT_LEAST {
            self.remember(fn_id, Some(payload.len()));
        } else if reply.is_some() {
            self.remember(fn_id, None);
        }
        Returned { payload, reply: None, in_reply: false }
    }

    fn remember(&mut self, fn_id: u64, big: Option<usize>) {
        match big {
            None => {
                self.big_fns.remove(&fn_id);
            }
            Some(size) if self.big_fns.len() < BIG_FNS || self.big_fns.contains_key(&fn_id) => {
                self.big_fns.insert(fn_id, size);
            }
            Some(_) => {}
        }
    }
}

/// A result as the executor sent it, before its buffers are read.
pub struct Returned {
    payload: Bytes,
    /// The reply memfd its buffers are in, if they are.
    reply: Option<Lease>,
    /// The executor said they are in its reply memfd.
    in_reply: bool,
}

impl Returned {
    /// The result's payload: the envelope's head followed by its buffers,
    /// read from a mapping of the reply memfd.
    pub fn payload(self) -> io::Result<crate::payload::Payload> {
        let Some(reply) = self.reply else {
            if self.in_reply {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the executor put a result in a reply memfd it was not given",
                ));
            }
            return Ok(self.payload.into());
        };
        let p = &self.payload;
        let bad =
            || io::Error::new(io::ErrorKind::InvalidData, "a result's list of shared buffers is cut short");
        let count = u32::from_le_bytes(p.get(..4).ok_or_else(bad)?.try_into().expect("4 bytes")) as usize;
        let start = 4 + count.checked_mul(16).ok_or_else(bad)?;
        let list = p.get(4..start).ok_or_else(bad)?;
        let at: Vec<(u64, u64)> = list
            .chunks_exact(16)
            .map(|c| {
                let o = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                (o, u64::from_le_bytes(c[8..].try_into().expect("8 bytes")))
            })
            .collect();
        let mut parts = vec![p.slice(start..)];
        parts.extend(reply.parts(&at)?);
        Ok(crate::payload::Payload::from_parts(parts))
    }
}

/// The prefix of a TASK_SHARED frame's payload, before the head:
/// args fd (u32), reply fd (u32), args inode, reply inode, tail length (u64 each).
pub fn prefix(tail: Option<(&Lease, usize)>, reply: &Lease) -> [u8; 32] {
    let (args_fd, args_inode, len) = match tail {
        Some((l, len)) => {
            let (fd, inode) = l.memfd().name();
            (fd, inode, len as u64)
        }
        None => (NONE, 0, 0),
    };
    let (reply_fd, reply_inode) = reply.memfd().name();
    let mut out = [0u8; 32];
    out[..4].copy_from_slice(&args_fd.to_le_bytes());
    out[4..8].copy_from_slice(&reply_fd.to_le_bytes());
    out[8..16].copy_from_slice(&args_inode.to_le_bytes());
    out[16..24].copy_from_slice(&reply_inode.to_le_bytes());
    out[24..].copy_from_slice(&len.to_le_bytes());
    out
}

#[cfg(test)]
#[path = "shared_mem_tests.rs"]
mod tests;
