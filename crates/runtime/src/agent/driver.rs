//! The tokio side of a session: it reads frames and executor events, keeps
//! one timer, and carries out what the [`Session`] asks for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distripool_protocol::{FromAgent, Labels, SessionKeys, ToAgent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::peers::{self, PeerKeys, PeerServer, Shelf};
use super::session::{AgentComm, Session};
use super::usage::UsageMeter;
use super::AgentConfig;
use crate::conn::{write_batches, AbortOnDrop, FrameReader, FrameWriter, Outgoing, SessionEnd};
use crate::executor::{self, ExecEvent, ExecIn, ExecutorHandle, ExecutorSpec};
use crate::ids::{FnId, Generation};

/// Executors and the orchestrator's writer, as the session sees them.
struct Processes {
    out: mpsc::UnboundedSender<Outgoing<FromAgent>>,
    /// One per slot, once started; replacing a handle kills its executor.
    handles: Vec<Option<ExecutorHandle>>,
    events: mpsc::UnboundedSender<ExecEvent>,
    /// How executors are started, with the session's frame limit.
    spec: ExecutorSpec,
    /// What this agent serves other agents, if it does.
    shelf: Option<Arc<Shelf>>,
    peer_keys: PeerKeys,
    /// Fetches from other agents under way, and where they end.
    fetches: Vec<AbortOnDrop<()>>,
    fetched: mpsc::UnboundedSender<(FnId, Result<Bytes, String>)>,
}

impl AgentComm for Processes {
    fn send(&mut self, out: Outgoing<FromAgent>) {
        // A writer that is gone ends the session through its join handle.
        let _ = self.out.send(out);
    }

    fn start_executor(&mut self, slot: usize, generation: Generation) -> Result<u32, String> {
        let handle = executor::spawn(&self.spec, slot, generation, self.events.clone())
            .map_err(|e| format!("cannot start an executor with {:?}: {e}", self.spec.python))?;
        let pid = handle.pid;
        if self.handles.len() <= slot {
            self.handles.resize_with(slot + 1, || None);
        }
        self.handles[slot] = Some(handle);
        Ok(pid)
    }

    fn to_executor(&mut self, slot: usize, msg: ExecIn) {
        if let Some(h) = &self.handles[slot] {
            // An executor that is gone reports its exit as an event.
            let _ = h.tx.send(msg);
        }
    }

    fn fetch(&mut self, fn_id: FnId, needs: Vec<FnId>, from: String) {
        let (keys, max_frame, done) = (self.peer_keys.clone(), self.spec.max_frame, self.fetched.clone());
        let shelf = self.shelf.clone();
        self.fetches.retain(|f| !f.0.is_finished());
        self.fetches.push(AbortOnDrop(peers::spawn(async move {
            let started = Instant::now();
            let outcome = peers::fetch(&from, fn_id, &keys, max_frame, shelf.as_deref(), needs).await;
            if let Ok(b) = &outcome {
                let (mib, took) = (b.len() as f64 / 1048576.0, started.elapsed().as_secs_f64());
                tracing::info!(
                    "fetched function {:x} ({mib:.1} MiB) from agent {from} in {took:.2} s",
                    fn_id.0
                );
            }
            let outcome =
                outcome.map_err(|e| format!("fetching function {:x} from agent {from}: {e}", fn_id.0));
            let _ = done.send((fn_id, outcome));
        })));
    }

    fn shelve_piece(&mut self, fn_id: FnId, total: usize, piece: Bytes) {
        if let Some(shelf) = &self.shelf {
            shelf.coming(fn_id, total).push(piece);
        }
    }

    fn shelve(&mut self, fn_id: FnId, bytes: Option<Bytes>) {
        if let Some(shelf) = &self.shelf {
            match bytes {
                Some(b) => shelf.put(fn_id, b),
                None => shelf.remove(fn_id),
            }
        }
    }
}

/// Run one authenticated session to its end; returns why it ended. With
/// `keys`, every frame is sealed and opened with them (a network connection);
/// without, frames travel in the clear (an in-process stream). With
/// `server`, other agents may fetch the large functions it holds. When
/// `stop` changes, the agent says goodbye (what it held goes elsewhere
/// without counting as lost) and the session ends with
/// [`SessionEnd::Stopped`].
pub(crate) async fn run_session<S>(
    stream: S,
    config: &AgentConfig,
    keys: Option<SessionKeys>,
    server: Option<PeerServer>,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut timing = config.timing;
    let max_frame = config.executor.max_frame;
    let (rd, wr) = tokio::io::split(stream);
    let (sealer, opener) = match keys {
        Some(k) => (Some(k.send), Some(k.recv)),
        None => (None, None),
    };
    let mut reader = FrameReader::new(rd, max_frame).with_opener(opener).with_silence_limit(timing.silence);
    let mut w = FrameWriter::new(wr, max_frame).with_sealer(sealer);
    let labels = Labels {
        host: hostname(),
        pid: std::process::id(),
        cpus: usable_cpus(),
        extra: config.labels.clone(),
    };
    let ready = FromAgent::Ready { slots: config.processes as u32, labels };
    if let Err(e) = async {
        w.write(&ready, b"").await?;
        if let Some(server) = &server {
            w.write(&FromAgent::Serves { addr: server.addr.to_string() }, b"").await?;
        }
        w.flush().await
    }
    .await
    {
        return SessionEnd::Send(e.to_string());
    }
    // The orchestrator answers with its limits before anything else; results
    // larger than its frame cap must fail in the executor, not on the wire,
    // and both sides keep the orchestrator's heartbeat and silence limit.
    let mut spec = config.executor.clone();
    let usage_every;
    match tokio::time::timeout(timing.silence, reader.read_frame()).await {
        Ok(Ok(Some(f))) => match f.message::<ToAgent>() {
            Ok(ToAgent::Limits { max_frame, heartbeat_ms, silence_ms, usage_ms }) => {
                usage_every = (usage_ms > 0).then(|| Duration::from_millis(usage_ms));
                spec.max_frame = spec.max_frame.min(usize::try_from(max_frame).unwrap_or(usize::MAX));
                let (heartbeat, silence) =
                    (Duration::from_millis(heartbeat_ms), Duration::from_millis(silence_ms));
                if heartbeat.is_zero() || silence < heartbeat * 2 {
                    return SessionEnd::Protocol(format!(
                        "the orchestrator's heartbeat ({heartbeat:?}) and silence limit ({silence:?}) do not fit"
                    ));
                }
                timing.heartbeat = heartbeat;
                timing.silence = silence;
                reader.set_silence_limit(silence);
            }
            _ => return SessionEnd::Protocol("the orchestrator did not start with its limits".into()),
        },
        Ok(Ok(None)) => return SessionEnd::Closed,
        Ok(Err(e)) => return SessionEnd::of_read(e, timing.silence),
        Err(_) => return SessionEnd::Silent(timing.silence),
    }
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing<FromAgent>>();
    let mut writer = AbortOnDrop(tokio::spawn(async move {
        // Our own heartbeat, whatever the orchestrator sends: while it is busy
        // sending us a large frame, its pings wait behind it.
        let pong = || Outgoing::new(FromAgent::Pong { seq: 0 });
        write_batches(w, &mut out_rx, Some((timing.heartbeat, pong)), |_| {}).await
    }));
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (fetched_tx, mut fetched_rx) = mpsc::unbounded_channel();
    let mut comm = Processes {
        out: out_tx,
        handles: Vec::new(),
        events: ev_tx,
        spec,
        shelf: server.as_ref().map(|s| s.shelf.clone()),
        peer_keys: PeerKeys::new(&config.security, timing),
        fetches: Vec::new(),
        fetched: fetched_tx,
    };
    let mut s = match Session::start(config.processes, &mut comm) {
        Ok(s) => s,
        Err(end) => return end,
    };
    s.set_idle_limit(config.idle_timeout, Instant::now());
    s.set_time_limit(config.time_limit);
    let mut leave = config.leave.clone();
    if leave.as_ref().is_some_and(|l| *l.borrow()) {
        if let Err(end) =
            s.leave("the worker is leaving".into(), SessionEnd::Drained, Instant::now(), &mut comm)
        {
            return end;
        }
    }

    // One timer for the session, moved only when a deadline earlier than the
    // one it is set for appears; when it fires early (the task it was set for
    // is done), it is set again. Not a timer per pass of the loop.
    let timer = tokio::time::sleep_until(far_future());
    tokio::pin!(timer);
    // The executors' CPU and memory, when the orchestrator asked for them.
    let mut usage = usage_every.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (tick, UsageMeter::new(Instant::now()))
    });
    let mut armed: Option<Instant> = None;
    // Made once, not at every pass of the loop: a watch's `changed()`
    // registers a waiter each time it is made.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let asked_to_leave = super::changed(&mut leave);
    tokio::pin!(asked_to_leave);
    let mut leaving = false;
    let end = loop {
        if let Some(deadline) = s.next_deadline() {
            if armed.is_none_or(|at| deadline < at) {
                timer.as_mut().reset(deadline.into());
                armed = Some(deadline);
            }
        }
        let step = tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(ev) => s.on_executor(ev, Instant::now(), &mut comm),
                None => Err(SessionEnd::Stopped),
            },
            Some((fn_id, outcome)) = fetched_rx.recv() => s.on_fetched(fn_id, outcome, Instant::now(), &mut comm),
            frame = reader.read_frame() => match frame {
                Err(e) => Err(SessionEnd::of_read(e, timing.silence)),
                Ok(None) => Err(SessionEnd::Closed),
                Ok(Some(frame)) => match frame.message::<ToAgent>() {
                    Ok(msg) => s.on_message(msg, frame.payload, Instant::now(), &mut comm),
                    Err(e) => Err(SessionEnd::Protocol(format!("bad message from the orchestrator: {e}"))),
                },
            },
            end = &mut writer.0 => return match end {
                Ok(Ok(())) => SessionEnd::Stopped,
                Ok(Err(e)) => SessionEnd::Send(e.to_string()),
                Err(e) => SessionEnd::Send(e.to_string()),
            },
            _ = async { usage.as_mut().expect("checked").0.tick().await }, if usage.is_some() => {
                let meter = &mut usage.as_mut().expect("checked").1;
                let pids = comm.handles.iter().flatten().map(|h| h.pid);
                let (executors, cpu_milli, memory) = meter.read(pids, Instant::now());
                comm.send(Outgoing::new(FromAgent::Usage { executors, cpu_milli, memory }));
                Ok(())
            }
            () = timer.as_mut(), if armed.is_some() => {
                armed = None;
                s.on_timer(Instant::now(), &mut comm)
            }
            _ = &mut stopped => {
                comm.send(Outgoing::new(FromAgent::Goodbye { reason: "the worker is stopping".into() }));
                Err(SessionEnd::Stopped)
            }
            _ = &mut asked_to_leave, if !leaving => {
                // SIGTERM, say: finish what is held first.
                leaving = true;
                s.leave("the worker was asked to leave (SIGTERM)".into(), SessionEnd::Drained, Instant::now(), &mut comm)
            }
        };
        if let Err(end) = step {
            break end;
        }
    };
    let idle = s.idle_slots();
    let Processes { out, mut handles, .. } = comm;
    drop(out);
    // Executors busy with a task are killed now; idle ones are asked to
    // leave, and given EXIT_GRACE to run their exit handlers.
    let mut leaving: Vec<ExecutorHandle> = idle.iter().filter_map(|&i| handles.get_mut(i)?.take()).collect();
    drop(handles);
    leaving.iter_mut().for_each(ExecutorHandle::close);
    let _ = tokio::time::timeout(EXIT_GRACE, async {
        for h in leaving.iter_mut() {
            h.exited().await;
        }
    })
    .await;
    drop(leaving);
    if matches!(end, SessionEnd::Drained | SessionEnd::Stopped | SessionEnd::Idle(_) | SessionEnd::TimeLimit)
    {
        // Let the goodbye out before the connection closes: the writer ends
        // once it has sent everything queued.
        let _ = tokio::time::timeout(timing.heartbeat * 2, &mut writer.0).await;
    }
    end
}

/// How long idle executors have to exit once their session ends, before
/// they are killed (a task may have left a non-daemon thread running).
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// CPUs this process may run on: its affinity mask, capped by the cgroup's
/// CPU quota (`cpu.max`) when there is one. Never below 1.
pub fn usable_cpus() -> u32 {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the call only
    // writes into it.
    let affinity = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as u32
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        }
    };
    let quota = cgroup_cpu_quota();
    quota.map_or(affinity, |q| affinity.min(q)).max(1)
}

/// Whole CPUs allowed by this process's cgroup v2 `cpu.max`, rounded up.
fn cgroup_cpu_quota() -> Option<u32> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/cpu.max", path.trim_end_matches('/'))).ok()?;
    parse_cpu_max(&max)
}

fn parse_cpu_max(text: &str) -> Option<u32> {
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?; // "max" (no quota) fails here
    let period: u64 = parts.next()?.parse().ok()?;
    (period > 0).then(|| quota.div_ceil(period) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_quota_is_rounded_up_to_whole_cpus() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max(""), None);
        assert!(usable_cpus() >= 1);
    }
}
