//! Large functions from agent to agent. An agent that holds one (a
//! `partial` over a large array, say) serves it to the other agents of its
//! cluster, so that the orchestrator's link carries it once rather than
//! once per agent: the orchestrator names, for each agent that needs it, an
//! agent that holds it ([`ToAgent::Fetch`](distripool_protocol::ToAgent)),
//! at most one fetch from each at a time, so every link carries it about
//! once each way.
//!
//! A connection between agents is authenticated with the cluster's key as
//! an agent's to its orchestrator is, under a binding of its own
//! ([`Binding::for_peers`]), and sealed unless encryption is off
//! altogether. It carries one request and one answer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use distripool_protocol::{Binding, FromPeer, SessionKeys, ToPeer};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::conn::{client_handshake, server_handshake, tune_tcp, AbortOnDrop, FrameReader, FrameWriter};
use crate::ids::FnId;
use crate::security::Security;
use crate::timing::Timing;
use crate::{Error, Result};

/// Functions at least this large go from agent to agent; smaller ones come
/// from the orchestrator, which is quicker than a connection of their own.
pub const SPREAD_AT_LEAST: usize = 1 << 20;
/// Connections from other agents handled at once; more are closed at once.
const SERVING_AT_ONCE: usize = 64;
/// How long a request waits for a function this agent is still receiving.
const WAIT_FOR_FUNCTION: Duration = Duration::from_secs(600);

/// What an agent serves: the large functions it holds.
#[derive(Default)]
pub(crate) struct Shelf {
    held: Mutex<HashMap<FnId, Bytes>>,
    arrived: Notify,
}

impl Shelf {
    pub(crate) fn put(&self, fn_id: FnId, bytes: Bytes) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(fn_id, bytes);
        self.arrived.notify_waiters();
    }

    pub(crate) fn remove(&self, fn_id: FnId) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&fn_id);
    }

    fn get(&self, fn_id: FnId) -> Option<Bytes> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&fn_id).cloned()
    }

    /// `fn_id` once it is here (the orchestrator may name this agent while
    /// the function is still on its way to it), or None after `limit`.
    async fn wait_for(&self, fn_id: FnId, limit: Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(b) = self.get(fn_id) {
                return Some(b);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

/// How an agent reaches other agents: the cluster's key and binding.
#[derive(Clone)]
pub(crate) struct PeerKeys {
    key: Vec<u8>,
    binding: Binding,
    timing: Timing,
}

impl PeerKeys {
    pub(crate) fn new(security: &Security, timing: Timing) -> Self {
        Self {
            key: security.key.clone(),
            binding: security.binding().for_peers(security.tls.is_some()),
            timing,
        }
    }
}

/// A session's server for other agents; it stops when dropped.
pub(crate) struct PeerServer {
    pub(crate) addr: SocketAddr,
    pub(crate) shelf: Arc<Shelf>,
    _task: AbortOnDrop<()>,
}

impl PeerServer {
    /// Listen on `ip` (the address this agent reaches its orchestrator
    /// from, which other agents can likely reach too), on a port the
    /// system picks.
    pub(crate) async fn listen(ip: IpAddr, keys: PeerKeys, max_frame: usize) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shelf = Arc::new(Shelf::default());
        let task = tokio::spawn(serve(listener, shelf.clone(), keys, max_frame));
        Ok(Self { addr, shelf, _task: AbortOnDrop(task) })
    }
}

async fn serve(listener: TcpListener, shelf: Arc<Shelf>, keys: PeerKeys, max_frame: usize) {
    let at_once = Arc::new(Semaphore::new(SERVING_AT_ONCE));
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            // Out of descriptors, say: let the condition pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = at_once.clone().try_acquire_owned() else {
            tracing::debug!("too many agents fetching at once; closed the connection from {from}");
            continue;
        };
        let (shelf, keys) = (shelf.clone(), keys.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_one(tcp, &shelf, &keys, max_frame).await {
                tracing::info!("serving agent {from} a function failed: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_one(mut tcp: TcpStream, shelf: &Shelf, keys: &PeerKeys, max_frame: usize) -> Result<()> {
    tune_tcp(&tcp, keys.timing.silence)?;
    let session_keys =
        tokio::time::timeout(keys.timing.handshake, server_handshake(&mut tcp, &keys.key, &keys.binding, 0))
            .await
            .map_err(|_| Error::Timeout("handshake with an agent fetching a function"))??;
    let (mut reader, mut writer) = framed(tcp, keys, session_keys, 1 << 16, max_frame);
    let request = tokio::time::timeout(keys.timing.silence, reader.read_frame())
        .await
        .map_err(|_| Error::Timeout("an agent's request for a function"))??
        .ok_or_else(|| closed("the agent fetching a function"))?;
    let ToPeer::Fetch { fn_id } = request.message::<ToPeer>()?;
    match shelf.wait_for(FnId(fn_id), WAIT_FOR_FUNCTION).await {
        Some(bytes) => writer.write(&FromPeer::Function { fn_id }, &bytes).await?,
        None => writer.write(&FromPeer::Missing { fn_id }, b"").await?,
    }
    writer.flush().await?;
    // Wait for the fetcher to close: it has everything once it does.
    let _ = tokio::time::timeout(keys.timing.silence, reader.read_frame()).await;
    Ok(())
}

/// Fetch function `fn_id` from the agent serving at `from`; it must be the
/// function `check` says has that id.
pub(crate) async fn fetch(
    from: &str,
    fn_id: FnId,
    keys: &PeerKeys,
    max_frame: usize,
    check: impl Fn(&[u8]) -> bool,
) -> Result<Bytes> {
    let addr = crate::resolve(from)?;
    let mut tcp = tokio::time::timeout(keys.timing.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout("connecting to the agent that holds the function"))??;
    tune_tcp(&tcp, keys.timing.silence)?;
    let (_, session_keys) =
        tokio::time::timeout(keys.timing.handshake, client_handshake(&mut tcp, &keys.key, &keys.binding))
            .await
            .map_err(|_| Error::Timeout("handshake with the agent that holds the function"))??;
    // No silence limit: the other agent may still be receiving the function
    // (the kernel's keepalive notices a peer that is gone).
    let (mut reader, mut writer) = framed(tcp, keys, session_keys, max_frame, 1 << 16);
    writer.write(&ToPeer::Fetch { fn_id: fn_id.0 }, b"").await?;
    writer.flush().await?;
    let frame = reader.read_frame().await?.ok_or_else(|| closed("the agent that holds the function"))?;
    match frame.message::<FromPeer>()? {
        FromPeer::Function { fn_id: got } if got == fn_id.0 => {
            if !check(&frame.payload) {
                return Err(Error::Config(format!(
                    "the agent at {from} sent a function whose content is not {:x}",
                    fn_id.0
                )));
            }
            Ok(frame.payload)
        }
        FromPeer::Function { fn_id: got } => {
            Err(Error::Config(format!("the agent at {from} sent function {got:x}, not {:x}", fn_id.0)))
        }
        FromPeer::Missing { .. } => Err(Error::Config(format!("the agent at {from} does not hold it"))),
    }
}

type Framed = (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>);

/// The two directions of an authenticated connection between agents,
/// sealed with the session's keys unless encryption is off.
fn framed(tcp: TcpStream, keys: &PeerKeys, session: SessionKeys, max_in: usize, max_out: usize) -> Framed {
    let (sealer, opener) = match keys.binding.sealed {
        true => (Some(session.send), Some(session.recv)),
        false => (None, None),
    };
    let (rd, wr) = tcp.into_split();
    (FrameReader::new(rd, max_in).with_opener(opener), FrameWriter::new(wr, max_out).with_sealer(sealer))
}

fn closed(who: &str) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{who} closed the connection")))
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
