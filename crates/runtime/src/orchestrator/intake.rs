//! New agent connections: accepted, held to a bound while they authenticate,
//! then handed to their [session](super::session).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distripool_protocol::Binding;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::core::Input;
use super::handle::{Event, Stats};
use super::observe::Refusal;
use super::session::serve_session;
use crate::conn::{server_handshake, tune_tcp};
use crate::ids::WorkerId;
use crate::security::Acceptor;
use crate::timing::Timing;
use crate::Error;

/// Connections that may be in their handshake at once; beyond it the oldest
/// is dropped.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// How often the accept loop repeats a warning while it cannot accept.
const WARN_EVERY: Duration = Duration::from_secs(10);

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
pub(super) struct PendingGuard {
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

pub(super) async fn accept_loop(listener: TcpListener, intake: Intake, next_id: Arc<AtomicU64>) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let mut warned = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                let out_of_files = e.raw_os_error() == Some(libc::EMFILE);
                if out_of_files {
                    if let (limit, true) = crate::raise_open_files() {
                        tracing::info!(
                            "out of file descriptors (one per agent): raised this process's limit on \
                             open files to {limit}, its hard limit"
                        );
                        continue;
                    }
                }
                // Back off briefly instead of spinning, and say so now and then.
                if warned.is_none_or(|t: Instant| t.elapsed() >= WARN_EVERY) {
                    let hint = if out_of_files {
                        "; each agent takes a file descriptor: raise the limit on open files \
                         (ulimit -n, or LimitNOFILE= in a systemd unit) where the orchestrator runs"
                    } else {
                        ""
                    };
                    tracing::warn!("cannot accept agents' connections: {e}{hint}");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tune_tcp(&stream, intake.timing.silence) {
            tracing::warn!("cannot set socket options for {peer}: {e}");
        }
        let worker = next_id.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard { pending: pending.clone(), id: worker };
        // Hold the lock across spawn and insert, so that a connection that
        // finishes its handshake at once cannot leave a stale entry behind.
        let mut p = pending.lock().expect("pending lock");
        let task = tokio::spawn(intake.clone().serve_tcp(stream, peer.to_string(), WorkerId(worker), guard));
        p.tasks.insert(worker, task.abort_handle());
        p.order.push_back(worker);
        while p.tasks.len() > MAX_PENDING_HANDSHAKES {
            let Some(oldest) = p.order.pop_front() else { break };
            if let Some(handle) = p.tasks.remove(&oldest) {
                handle.abort();
                intake.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                intake.stats.refused[Refusal::Overload as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        // Forget ids that finished their handshake long ago.
        while p.order.front().is_some_and(|id| !p.tasks.contains_key(id)) {
            p.order.pop_front();
        }
    }
}

fn note_handshake_failure(intake: &Intake, peer: &str, e: &Error) {
    let stats = &intake.stats;
    stats.refused[Refusal::of(e) as usize].fetch_add(1, Ordering::Relaxed);
    let refused = match e {
        Error::Handshake(h) if h.is_auth_failure() => {
            stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("rejected agent {peer}: {e}");
            true
        }
        Error::Handshake(h @ distripool_protocol::HandshakeError::VersionMismatch { .. }) => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("rejected agent {peer}: {h}");
            true
        }
        _ => {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!("handshake with {peer} failed: {e}");
            false
        }
    };
    if refused {
        // For the driver's diagnosis of a pool that waits for workers.
        let _ =
            intake.events.send(Event::Core(Input::Refused { peer: peer.to_string(), reason: e.to_string() }));
    }
}

/// What every new agent connection needs, whichever way it arrived.
#[derive(Clone)]
pub(super) struct Intake {
    pub(super) key: Arc<[u8]>,
    /// What the handshake binds, including whether network sessions are sealed.
    pub(super) binding: Binding,
    /// Plain TCP or mutual TLS.
    pub(super) acceptor: Acceptor,
    pub(super) max_frame: usize,
    pub(super) timing: Timing,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) stats: Arc<Stats>,
    /// Ask agents to report their executors' CPU and memory (a dashboard
    /// shows them).
    pub(super) usage: bool,
}

impl Intake {
    /// Authenticate a network peer (TLS first, if configured, then the
    /// distripool handshake, all within the handshake deadline), then serve
    /// it until it goes away. The guard keeps the connection on the pending
    /// list until it is authenticated.
    async fn serve_tcp(self, tcp: TcpStream, peer: String, worker: WorkerId, pending: PendingGuard) {
        let authenticate = async {
            let mut stream = self.acceptor.wrap(tcp).await?;
            let keys = server_handshake(&mut stream, &self.key, &self.binding, worker.0).await?;
            Ok::<_, Error>((stream, keys))
        };
        let outcome = tokio::time::timeout(self.timing.handshake, authenticate)
            .await
            .unwrap_or(Err(Error::Timeout("agent handshake")));
        let (stream, keys) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                note_handshake_failure(&self, &peer, &e);
                return;
            }
        };
        drop(pending);
        let keys = self.binding.sealed.then_some(keys);
        serve_session(stream, peer, worker, keys, self).await;
    }

    /// Serve the in-process agent: authenticated like any other, never sealed
    /// (nothing travels over a wire).
    pub(super) async fn serve_local<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        self,
        mut stream: S,
        worker: WorkerId,
    ) {
        if let Err(e) = server_handshake(&mut stream, &self.key, &self.binding, worker.0).await {
            note_handshake_failure(&self, "local", &e);
            return;
        }
        serve_session(stream, "local".into(), worker, None, self).await;
    }
}
