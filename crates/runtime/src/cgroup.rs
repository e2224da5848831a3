//! Executors' memory limit, enforced by the kernel (`--memory-limit`).
//!
//! Each executor runs in a cgroup of its own with the limit set, under a
//! directory the agent makes in its own cgroup (`distripool-<agent pid>`).
//! An executor that allocates past it is killed by the kernel's OOM killer;
//! the cgroup's count of OOM kills tells that end apart from any other
//! SIGKILL, so the task's error says "out of memory".
//!
//! cgroup v2 (`memory.max`, `memory.swap.max`, `memory.events`) where the
//! agent's cgroup has the memory controller, else the v1 memory hierarchy
//! (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`,
//! `memory.oom_control`). Swap is limited to nothing, so a task that
//! outgrows its limit ends instead of swapping.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ids::Generation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The executors' memory limit and the directory of their cgroups. Dropping
/// it removes the cgroups that are empty.
#[derive(Debug)]
pub struct MemoryLimit {
    bytes: u64,
    version: Version,
    dir: PathBuf,
    /// Executor cgroups that still held a process when their executor ended.
    leftover: Mutex<Vec<PathBuf>>,
}

/// Where this process's memory cgroup is, from `/proc/self/cgroup` and
/// `/proc/self/mountinfo`: v2 if that hierarchy has the memory controller
/// here, else v1's memory hierarchy.
pub fn own_memory_cgroup(cgroup: &str, mountinfo: &str) -> Option<(Version, PathBuf)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    let mut mounts_v1 = None;
    let mut mounts_v2 = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, point) = (unescape(left[3]), unescape(left[4]));
        match right[0] {
            "cgroup2" if mounts_v2.is_none() => mounts_v2 = Some((root, point)),
            "cgroup" if mounts_v1.is_none() && right[2].split(',').any(|o| o == "memory") => {
                mounts_v1 = Some((root, point))
            }
            _ => {}
        }
    }
    let join = |(root, point): (String, String), path: &str| -> Option<PathBuf> {
        let rel = if root == "/" { path } else { path.strip_prefix(root.as_str())? };
        Some(Path::new(&point).join(rel.trim_start_matches('/')))
    };
    if let (Some(path), Some(mount)) = (v2, mounts_v2) {
        if let Some(dir) = join(mount, path) {
            let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                return Some((Version::V2, dir));
            }
        }
    }
    let (path, mount) = (v1?, mounts_v1?);
    Some((Version::V1, join(mount, path)?))
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Make the directory `path`, unless it is there already.
fn make_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl MemoryLimit {
    /// Make the directory of executor cgroups in this process's memory
    /// cgroup. The error says why the limit cannot be had here.
    pub fn create(bytes: u64) -> Result<Arc<Self>, String> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"));
        let (cgroup, mountinfo) = (read("/proc/self/cgroup")?, read("/proc/self/mountinfo")?);
        let (version, own) = own_memory_cgroup(&cgroup, &mountinfo).ok_or_else(|| {
            "this machine has no cgroup memory controller for this process (neither cgroup v2 with \
             'memory' in cgroup.controllers nor a v1 memory hierarchy)"
                .to_string()
        })?;
        Self::create_in(bytes, version, &own, std::process::id())
    }

    /// [`create`](Self::create) with the agent's cgroup given.
    pub fn create_in(bytes: u64, version: Version, own: &Path, pid: u32) -> Result<Arc<Self>, String> {
        let why = |e: std::io::Error| {
            format!(
                "cannot make cgroups for the executors' memory limit in {} ({e}); run the worker as \
                 root, or in a cgroup delegated to its user (systemd-run --user --scope -p \
                 Delegate=yes ...), or without --memory-limit",
                own.display()
            )
        };
        if version == Version::V2 {
            enable_memory_v2(own, pid).map_err(why)?;
        }
        remove_stale(own);
        let dir = own.join(format!("distripool-{pid}"));
        make_dir(&dir).map_err(why)?;
        let limit = Arc::new(Self { bytes, version, dir, leftover: Mutex::new(Vec::new()) });
        if version == Version::V2 {
            write(&limit.dir.join("cgroup.subtree_control"), "+memory").map_err(why)?;
        }
        // Make (and remove) one executor cgroup now: a limit the kernel
        // refuses fails the worker at its start, not at its first executor.
        limit.executor_cgroup(0, Generation(0)).map_err(why)?;
        tracing::info!(
            "executors limited to {} of memory each, in cgroups under {}",
            show_bytes(bytes),
            limit.dir.display()
        );
        Ok(limit)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A fresh cgroup with the limit, for the executor of `slot`.
    pub fn executor_cgroup(
        self: &Arc<Self>,
        slot: usize,
        generation: Generation,
    ) -> std::io::Result<ExecutorCgroup> {
        self.sweep();
        let dir = self.dir.join(format!("executor-{slot}-{}", generation.0));
        make_dir(&dir)?;
        let group = ExecutorCgroup {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL in a path"),
            dir,
            limit: self.clone(),
        };
        let bytes = self.bytes.to_string();
        match self.version {
            Version::V2 => {
                write(&group.dir.join("memory.max"), &bytes)?;
                let swap = group.dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
            }
            Version::V1 => {
                write(&group.dir.join("memory.limit_in_bytes"), &bytes)?;
                let swap = group.dir.join("memory.memsw.limit_in_bytes");
                if swap.exists() {
                    write(&swap, &bytes)?;
                }
            }
        }
        Ok(group)
    }

    /// Remove the executor cgroups left behind that are empty by now.
    fn sweep(&self) {
        let mut left = self.leftover.lock().expect("not poisoned");
        left.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
    }
}

impl Drop for MemoryLimit {
    /// The agent is stopping: whatever is left in the executors' cgroups
    /// (processes the tasks started, executors being killed) is killed and
    /// waited for, at most a second in all, and the cgroups are removed.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let left = std::mem::take(&mut *self.leftover.lock().expect("not poisoned"));
        for dir in left {
            kill_all_in(&dir, deadline);
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// SIGKILL every process in the cgroup `dir` (all of them ours: executors
/// and what their tasks started), and wait until each has exited (its pidfd
/// becomes readable; it has left the cgroup by then) or `deadline` passes.
fn kill_all_in(dir: &Path, deadline: std::time::Instant) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
        // SAFETY: plain syscalls; the pidfd is ours and closed here.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int;
            libc::kill(pid, libc::SIGKILL);
            if fd >= 0 {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let mut exited = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                libc::poll(&mut exited, 1, left.as_millis().min(i32::MAX as u128) as libc::c_int);
                libc::close(fd);
            }
        }
    }
}

/// Remove what agents that are gone left here (killed before they could):
/// `distripool-<pid>` directories whose process is no more, when empty, and
/// the leaves such agents moved into.
fn remove_stale(own: &Path) {
    let Ok(entries) = std::fs::read_dir(own) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // `distripool-<pid>`, or the leaf a v2 agent moved into, `distripool-<pid>-agent`.
        let digits =
            name.to_str().and_then(|n| n.strip_prefix("distripool-")).map(|p| p.trim_end_matches("-agent"));
        let Some(pid) = digits.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(inner) = std::fs::read_dir(entry.path()) {
            for e in inner.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("executor-")) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(entry.path());
    }
}

/// In cgroup v2 a cgroup's children have the memory controller only if it
/// is enabled in the cgroup's `subtree_control`, which a cgroup that holds
/// processes cannot do (unless it is the root): when this process is the
/// only one in its cgroup, it moves into a leaf of its own first.
fn enable_memory_v2(own: &Path, pid: u32) -> std::io::Result<()> {
    let control = own.join("cgroup.subtree_control");
    if std::fs::read_to_string(&control)?.split_whitespace().any(|c| c == "memory") {
        return Ok(());
    }
    // Not through `write`: its error keeps the kind but not the errno.
    let Err(e) = std::fs::write(&control, "+memory") else { return Ok(()) };
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(std::io::Error::new(e.kind(), format!("{}: {e}", control.display())));
    }
    let procs = std::fs::read_to_string(own.join("cgroup.procs"))?;
    let others = procs.split_whitespace().filter(|p| *p != pid.to_string()).count();
    if others > 0 {
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "{} holds {others} other process(es), so its children cannot have the memory controller",
                own.display()
            ),
        ));
    }
    let leaf = own.join(format!("distripool-{pid}-agent"));
    make_dir(&leaf)?;
    write(&leaf.join("cgroup.procs"), &pid.to_string())?;
    write(&control, "+memory")
}

/// One executor's cgroup. Dropping it removes it (later, if a process the
/// task started still lingers in it).
#[derive(Debug)]
pub struct ExecutorCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, for the child to join between fork and exec.
    procs: CString,
    limit: Arc<MemoryLimit>,
}

impl ExecutorCgroup {
    /// The `cgroup.procs` file, as the child writes "0" to it before exec.
    pub fn procs(&self) -> &CString {
        &self.procs
    }

    /// How many processes the kernel killed here for want of memory.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.limit.version {
            Version::V2 => ("memory.events", "oom_kill"),
            Version::V1 => ("memory.oom_control", "oom_kill"),
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit.bytes
    }
}

impl Drop for ExecutorCgroup {
    fn drop(&mut self) {
        if std::fs::remove_dir(&self.dir).is_err() && self.dir.exists() {
            self.limit.leftover.lock().expect("not poisoned").push(self.dir.clone());
        }
    }
}

/// Join the cgroup whose `cgroup.procs` is `procs`: for a child between fork
/// and exec, so only async-signal-safe calls.
pub fn join_in_child(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path prepared before fork.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// `n` bytes for people: "512 MiB", "1.5 GiB".
pub fn show_bytes(n: u64) -> String {
    const GIB: u64 = 1 << 30;
    if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else {
        format!("{} MiB", n >> 20)
    }
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
