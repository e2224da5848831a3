//! One authenticated agent, from its `Ready` to its end: frames from it go to
//! the core as events, the core's frames (and heartbeats) go to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distripool_protocol::{FromAgent, SessionKeys, ToAgent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::core::Input;
use super::handle::Event;
use super::intake::Intake;
use crate::conn::{write_batches, AbortOnDrop, FrameReader, FrameWriter, Outgoing, SessionEnd};
use crate::ids::WorkerId;

/// How often agents report their executors' CPU and memory, when asked to.
const USAGE_EVERY: Duration = Duration::from_secs(1);

/// Messages one event may carry to the core.
const MAX_MESSAGES: usize = 1024;

/// When an agent was last heard from, kept by its session. An idle agent's
/// heartbeats end here instead of going to the core one event each (for
/// ten thousand idle agents, ten thousand wake-ups of the core a second).
pub(super) struct Heard {
    base: Instant,
    /// Milliseconds after `base`.
    ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self { base: Instant::now(), ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the agent was last heard from.
    pub(super) fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// How often an idle agent is pinged: a quarter of its silence limit, so
/// that four pings fit in it, and never more often than the heartbeat.
/// (Each ping costs a sealed write; ten thousand idle agents pinged every
/// second cost a tenth of a core in sends alone. The agent's own heartbeat,
/// which tells the orchestrator it is there, stays every `heartbeat`.)
fn ping_every(timing: &crate::timing::Timing) -> Duration {
    timing.heartbeat.max(timing.silence / 4)
}

pub(super) async fn serve_session<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    peer: String,
    worker: WorkerId,
    keys: Option<SessionKeys>,
    intake: Intake,
) {
    let Intake { max_frame, events, stats, timing, usage, .. } = intake;
    let silence = timing.silence;
    let (rd, wr) = tokio::io::split(stream);
    let (sealer, opener) = match keys {
        Some(k) => (Some(k.send), Some(k.recv)),
        None => (None, None),
    };
    let mut reader = FrameReader::new(rd, max_frame).with_opener(opener).with_silence_limit(silence);

    // The first message must be Ready, and it must come promptly.
    let (slots, labels) = match tokio::time::timeout(silence, reader.read_frame()).await {
        Ok(Ok(Some(f))) => match f.message::<FromAgent>() {
            Ok(FromAgent::Ready { slots, labels }) => {
                tracing::info!(
                    "agent {peer} ({}, pid {}) joined with {slots} executors",
                    labels.host,
                    labels.pid
                );
                (slots as usize, labels)
            }
            other => {
                tracing::info!("agent {peer} did not start with Ready: {other:?}");
                return;
            }
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!("agent {peer} failed before Ready: {e}");
            return;
        }
        Err(_) => {
            tracing::info!("agent {peer} sent nothing for {silence:?} after its handshake");
            return;
        }
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Outgoing<ToAgent>>>();
    let limits = ToAgent::Limits {
        max_frame: max_frame as u64,
        heartbeat_ms: timing.heartbeat.as_millis() as u64,
        silence_ms: silence.as_millis() as u64,
        usage_ms: if usage { USAGE_EVERY.as_millis() as u64 } else { 0 },
    };
    let _ = tx.send(vec![Outgoing::new(limits)]);
    let heard = Arc::new(Heard::new());
    let joined = Event::AgentJoined { worker, peer: peer.clone(), slots, labels, tx, heard: heard.clone() };
    if events.send(joined).is_err() {
        return;
    }
    let sent = stats.clone();
    let writer = AbortOnDrop(tokio::spawn(async move {
        let w = FrameWriter::new(wr, max_frame).with_sealer(sealer);
        let mut seq = 0u64;
        let ping = || {
            seq += 1;
            Outgoing::new(ToAgent::Ping { seq })
        };
        write_batches(w, &mut rx, Some((ping_every(&timing), ping)), |w| {
            sent.bytes_sent.fetch_add(w.take_written(), Ordering::Relaxed);
        })
        .await
    }));

    let end = loop {
        // Silence is measured in bytes, not frames (see `with_silence_limit`).
        // Everything already buffered goes to the core as one event.
        let mut msgs = Vec::new();
        let end = loop {
            match reader.read_frame().await {
                Err(e) => break Some(SessionEnd::of_read(e, silence)),
                Ok(None) => break Some(SessionEnd::Closed),
                Ok(Some(frame)) => {
                    let n = 8 + frame.header.len() + frame.payload.len();
                    stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    match frame.message::<FromAgent>() {
                        // A heartbeat only says the agent is there (`heard`).
                        Ok(FromAgent::Pong { .. }) => {}
                        Ok(msg) => msgs.push((msg, frame.payload)),
                        Err(e) => break Some(SessionEnd::Protocol(format!("bad message: {e}"))),
                    }
                }
            }
            if !reader.has_buffered_frame() || msgs.len() >= MAX_MESSAGES {
                break None;
            }
        };
        heard.touch();
        if !msgs.is_empty() && events.send(Event::Core(Input::AgentMessages { worker, msgs })).is_err() {
            break SessionEnd::Stopped;
        }
        if let Some(end) = end {
            break end;
        }
        if writer.0.is_finished() {
            break SessionEnd::Send("the connection closed while sending".into());
        }
    };
    tracing::info!("agent {peer} left: {end}");
    let _ = events.send(Event::Core(Input::AgentLeft { worker, end }));
}
