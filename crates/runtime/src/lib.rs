//! The tokio side of distripool: the orchestrator that lives inside the
//! driver, the agent that runs on every worker machine, and the executor
//! processes the agent supervises.
//!
//! ```text
//!  driver process                                   worker machine
//!  ┌───────────────────────────────┐   TCP, framed  ┌──────────────────────────┐
//!  │ Client ──► core task ─────────┼──────────────► │ agent session            │
//!  │   ▲        (Scheduler)        │ ◄──────────────┼─  │ unix socket per slot  │
//!  │   └── completions ◄───────────┤                │   ▼                      │
//!  └───────────────────────────────┘                │ executor processes (py)  │
//!                                                   └──────────────────────────┘
//! ```
//!
//! Nothing here touches Python objects; the bindings crate converts at the edge.

pub mod agent;
mod batches;
mod bulk;
pub mod cgroup;
pub mod conn;
pub mod dashboard;
pub mod executor;
mod function_mem;
pub mod ids;
pub mod mailbox;
pub mod orchestrator;
pub mod payload;
pub mod security;
pub mod shared_mem;
pub mod timing;

pub use agent::{run_agent, AgentConfig, AgentExit};
pub use conn::SessionEnd;
pub use distripool_protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
pub use ids::{ClientId, FnId, JobId, TaskId, WorkerId};
pub use mailbox::{Completion, Outcome, Waited};
pub use orchestrator::{Blob, Client, Orchestrator, OrchestratorConfig, Stats};
pub use payload::Payload;
pub use security::{Security, TlsFiles};
pub use timing::Timing;

use distripool_protocol::{FrameError, HandshakeError};

/// Errors of the runtime, one enum for the bindings to map onto Python types.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Cipher(#[from] distripool_protocol::CipherError),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Config(String),
    /// The address could not be bound (in use, not ours, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Tls(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("the orchestrator is closed")]
    Closed,
    /// A session ended in a way that a new one would repeat.
    #[error("{0}")]
    Fatal(crate::conn::SessionEnd),
    #[error("{0}")]
    TooLarge(String),
}

impl Error {
    /// True when trying again can succeed without changing anything here: a
    /// connection that broke or timed out, a peer that failed to
    /// authenticate (it may be fixed, or be someone else). False when the
    /// same call would fail the same way: a bad setting, an address that
    /// cannot be bound, a closed orchestrator, a message too large, a
    /// session end that would repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io(_) | Error::Frame(_) | Error::Cipher(_) | Error::Handshake(_) | Error::Timeout(_) => {
                true
            }
            Error::Config(_)
            | Error::Listen { .. }
            | Error::Tls(_)
            | Error::Closed
            | Error::Fatal(_)
            | Error::TooLarge(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the operating system's random source works");
    out
}

/// Raise this process's soft limit on open files to its hard limit. The
/// limit now, and whether it changed (false when it was there already or
/// cannot be raised).
pub fn raise_open_files() -> (u64, bool) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, false);
        }
        if lim.rlim_cur >= lim.rlim_max {
            return (lim.rlim_cur, false);
        }
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            (lim.rlim_max, true)
        } else {
            (lim.rlim_cur, false)
        }
    }
}

/// Resolve `host:port` strings (names allowed) to socket addresses.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("cannot resolve address {addr:?} (expected HOST:PORT): {e}")))?;
    addrs.next().ok_or_else(|| Error::Config(format!("address {addr:?} resolves to nothing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_trying_again_can_help() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(Error::Io(refused).is_transient());
        assert!(Error::Timeout("handshake").is_transient());
        assert!(Error::Handshake(HandshakeError::RejectedAuth).is_transient());
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let addr = "127.0.0.1:1".parse().unwrap();
        assert!(!Error::Listen { addr, source: in_use }.is_transient());
        assert!(!Error::Closed.is_transient());
        assert!(!Error::Fatal(SessionEnd::Executors("no python".into())).is_transient());
        assert!(!Error::Config("bad".into()).is_transient());
    }
}
