//! The worker agent: dials an orchestrator, authenticates, and runs the tasks
//! it is given on a fixed number of executor processes.
//!
//! One *session* is one authenticated connection. Within it the agent keeps a
//! local queue of tasks; each executor slot holds [`DEPTH`] of them, or, while
//! its tasks are short, about 2 ms of work, up to [`DEEP`]
//! (one running, the rest already written to its socket so it never waits on
//! a round trip). When an executor dies, the task it was running is reported
//! as crashed and the ones merely queued behind it go back to the local queue
//! without counting against them; the slot gets a fresh executor.
//!
//! When a session ends — the orchestrator closed, went silent, or the
//! connection broke — every executor is killed, so no task outlives the
//! session that asked for it, and the agent dials again with capped,
//! jittered exponential backoff.

//!
//! | file | what it does |
//! |---|---|
//! | `mod.rs` | dialing, authenticating, reconnecting |
//! | `session.rs` | the session's state machine: messages and executor events in, frames and executor commands out |
//! | `driver.rs` | the tokio side of a session: sockets, executor processes, one timer |
//! | `functions.rs` | the functions a session holds, and the tasks waiting for one still coming |
//! | `peers.rs` | serving large functions to other agents, and fetching them from one |
//! | `shelf.rs` | what an agent serves: functions it holds, and those it is fetching, piece by piece |

mod driver;
mod functions;
mod peers;
mod session;
mod shelf;
mod usage;

use std::time::Duration;

use distripool_protocol::HandshakeError;
use tokio::net::TcpStream;
use tokio::sync::watch;

pub(crate) use driver::hostname;
pub(crate) use driver::run_session;
pub use driver::{usable_cpus, EXIT_GRACE};
pub(crate) use peers::SPREAD_AT_LEAST;
pub use session::{DEEP, DEPTH};
pub(crate) use shelf::PIECE;

use crate::conn::{client_handshake, tune_tcp, SessionEnd};
use crate::executor::ExecutorSpec;
use crate::security::{explain_tls, Dialer, Security};
use crate::timing::Timing;
use crate::{resolve, Error, Result};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Orchestrator addresses, tried in turn.
    pub connect: Vec<String>,
    pub security: Security,
    pub processes: usize,
    pub executor: ExecutorSpec,
    pub timing: Timing,
    /// `key=value` labels the orchestrator shows for this worker.
    pub labels: Vec<(String, String)>,
    /// Leave after this long with nothing to do (no task held, or no
    /// orchestrator to be had): a launcher's idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Be gone by then: take no task that would not finish before it
    /// (judged from recent task durations), finish what is held and leave;
    /// at that moment, leave with whatever is still held (a launcher's time
    /// limit, the end of a Slurm job).
    pub time_limit: Option<std::time::Instant>,
    /// When this becomes true, take no new task, finish what is held, say
    /// goodbye and stop (what SIGTERM does to a worker).
    pub leave: Option<watch::Receiver<bool>>,
    /// A file that exists while a session is up (a readiness check's, in
    /// Kubernetes): made when the agent joins, removed when it leaves.
    pub ready_file: Option<std::path::PathBuf>,
    /// Serve the large functions this agent holds to other agents (see
    /// `peers.rs`), on a port of its own.
    pub serve_peers: bool,
}

/// Why [`run_agent`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Told to stop (`stop` became true).
    Stopped,
    /// It finished what it held and left: the orchestrator drained it, or
    /// `leave` became true.
    Drained,
    /// Nothing to do for its idle timeout.
    Idle,
    /// Its time limit came.
    TimeLimit,
}

/// Serve orchestrators until `stop` becomes true. Connection and
/// authentication failures are logged and retried; they never end the agent.
pub async fn run_agent(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<AgentExit> {
    if config.connect.is_empty() {
        return Err(Error::Config("no orchestrator address to connect to".into()));
    }
    config.timing.validate()?;
    let timing = config.timing;
    let dialer = Dialer::new(&config.security)?;
    let binding = config.security.binding();
    let mut backoff = timing.backoff_start;
    let mut target = 0usize;
    // With nothing to do since then (no session, or one that held nothing).
    let mut idle_since = tokio::time::Instant::now();
    let mut leave = config.leave.clone();
    let mut refusals = Refusals::default();
    loop {
        if leave.as_ref().is_some_and(|l| *l.borrow()) {
            return Ok(AgentExit::Drained); // asked to leave between sessions
        }
        if config.time_limit.is_some_and(|at| std::time::Instant::now() >= at) {
            tracing::info!("time limit reached; stopping");
            return Ok(AgentExit::TimeLimit);
        }
        if let Some(limit) = config.idle_timeout {
            if idle_since.elapsed() >= limit {
                tracing::info!("no orchestrator to work for in {limit:?}; stopping (idle timeout)");
                return Ok(AgentExit::Idle);
            }
        }
        let addr = &config.connect[target % config.connect.len()];
        target += 1;
        let attempt = async {
            let sockaddr = resolve(addr)?;
            // A SYN into a partition is retried by the kernel for minutes;
            // give up sooner and try again on the backoff schedule.
            let tcp = tokio::time::timeout(timing.connect, TcpStream::connect(sockaddr))
                .await
                .map_err(|_| Error::Timeout("connecting to the orchestrator"))??;
            tune_tcp(&tcp, timing.silence)?;
            let local = tcp.local_addr()?.ip();
            let authenticate = async {
                let mut stream = dialer.wrap(tcp, addr).await?;
                let (session, keys) = client_handshake(&mut stream, &config.security.key, &binding).await?;
                Ok::<_, Error>((stream, session, keys, local))
            };
            tokio::time::timeout(timing.handshake, authenticate)
                .await
                .map_err(|_| Error::Timeout("handshake with the orchestrator"))?
                .map_err(|e| explain_tls(e, addr))
        };
        let outcome = tokio::select! {
            r = attempt => r,
            () = until(config.time_limit) => return Ok(AgentExit::TimeLimit),
            _ = stop.changed() => return Ok(AgentExit::Stopped),
            _ = changed(&mut leave) => return Ok(AgentExit::Drained),
        };
        match outcome {
            Ok((stream, session, keys, local)) => {
                tracing::info!("connected to orchestrator {addr} (session {session})");
                refusals = Refusals::default();
                backoff = timing.backoff_start;
                let ready = ReadyFile::made(config.ready_file.as_deref(), addr);
                let server = match config.serve_peers {
                    true => serve_peers(local, &config, timing).await,
                    false => None,
                };
                let end =
                    run_session(stream, &config, binding.sealed.then_some(keys), server, &mut stop).await;
                drop(ready);
                idle_since = tokio::time::Instant::now();
                match end {
                    SessionEnd::Stopped if *stop.borrow() => return Ok(AgentExit::Stopped),
                    SessionEnd::Drained => {
                        tracing::info!("drained ({addr} knows); stopping");
                        return Ok(AgentExit::Drained);
                    }
                    SessionEnd::TimeLimit => {
                        tracing::info!("time limit reached ({addr} knows); stopping");
                        return Ok(AgentExit::TimeLimit);
                    }
                    SessionEnd::Idle(limit) => {
                        tracing::info!("nothing to do for {limit:?}; stopping (idle timeout)");
                        return Ok(AgentExit::Idle);
                    }
                    _ => {}
                }
                if end.is_fatal() {
                    tracing::error!(
                        "session with {addr} ended: {end}; this worker cannot run tasks, stopping"
                    );
                    return Err(Error::Fatal(end));
                }
                tracing::warn!("session with {addr} ended: {end}; reconnecting");
            }
            Err(Error::Handshake(e)) if e.is_auth_failure() => {
                let advice = if matches!(e, HandshakeError::NoKey | HandshakeError::PeerHasNoKey) {
                    String::new()
                } else {
                    "; check that both sides use the same key (--authkey-file, DISTRIPOOL_AUTHKEY or \
                     DISTRIPOOL_AUTHKEY_FILE)"
                        .into()
                };
                refusals.note(format!("authentication with orchestrator {addr} failed: {e}{advice}"));
            }
            Err(e @ (Error::Handshake(_) | Error::Tls(_))) => {
                refusals.note(format!("cannot join orchestrator {addr}: {e}"));
            }
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => tracing::warn!(
                "orchestrator {addr} closed the connection during the handshake (it may be busy with many \
                 joining workers, or set up for TLS while this worker is not); retrying"
            ),
            Err(e) => tracing::info!("orchestrator {addr} not available ({e}); retrying"),
        }
        let jitter = Duration::from_millis(u64::from(crate::random_bytes::<1>()[0]) % 100);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            () = until(config.time_limit) => return Ok(AgentExit::TimeLimit),
            _ = stop.changed() => return Ok(AgentExit::Stopped),
            _ = changed(&mut leave) => return Ok(AgentExit::Drained),
        }
        backoff = (backoff * 2).min(timing.backoff_max);
    }
}

/// A session's server for other agents, on the address `local` this agent
/// reaches its orchestrator from; None (and said) if it cannot listen.
async fn serve_peers(
    local: std::net::IpAddr,
    config: &AgentConfig,
    timing: Timing,
) -> Option<peers::PeerServer> {
    let keys = peers::PeerKeys::new(&config.security, timing);
    match peers::PeerServer::listen(local, keys, config.executor.max_frame).await {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(
                "cannot serve other agents on {local}: {e}; they get large functions from the orchestrator"
            );
            None
        }
    }
}

/// The ready file, while it exists; removed when dropped.
struct ReadyFile(Option<std::path::PathBuf>);

impl ReadyFile {
    fn made(path: Option<&std::path::Path>, addr: &str) -> Self {
        let Some(path) = path else { return Self(None) };
        match std::fs::write(path, format!("connected to {addr}\n")) {
            Ok(()) => Self(Some(path.to_owned())),
            Err(e) => {
                tracing::warn!("cannot write the ready file {}: {e}", path.display());
                Self(None)
            }
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Refused handshakes are retried (a rogue peer on the port must not be able
/// to stop a worker), but logged loudly only the first time for each cause,
/// then once a minute with a count.
#[derive(Default)]
struct Refusals {
    last: Option<(String, std::time::Instant, u32)>,
}

impl Refusals {
    const REMIND: Duration = Duration::from_secs(60);

    fn note(&mut self, what: String) {
        match &mut self.last {
            Some((last, since, n)) if *last == what => {
                *n += 1;
                if since.elapsed() >= Self::REMIND {
                    tracing::warn!("still refused ({n} times so far): {what}; retrying");
                    *since = std::time::Instant::now();
                } else {
                    tracing::debug!("refused again: {what}");
                }
            }
            _ => {
                tracing::error!("{what}; retrying with backoff");
                self.last = Some((what, std::time::Instant::now(), 1));
            }
        }
    }
}

/// Resolves at `at`; never without it.
async fn until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when `rx` changes; never without one.
pub(crate) async fn changed(rx: &mut Option<watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await // its sender is gone: it never will
            }
        }
        None => std::future::pending().await,
    }
}
