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
//! altogether. It carries one request and the function in pieces
//! ([`PIECE`]); an agent passes on the pieces of a function it is fetching
//! itself as they arrive.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distripool_protocol::{Binding, FromPeer, SessionKeys, ToPeer};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

pub(crate) use super::shelf::Shelf;
use super::shelf::{Held, PIECE};

use crate::conn::{client_handshake, server_handshake, tune_tcp, AbortOnDrop, FrameReader, FrameWriter};
use crate::function_mem::Assembly;
use crate::ids::FnId;
use crate::orchestrator::ContentHasher;
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
/// How often a fetch that goes on says how far it has got, in the log.
const TELL_EVERY: Duration = Duration::from_secs(30);

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
    /// Connections from other agents it may still take.
    at_once: Arc<Semaphore>,
    _task: AbortOnDrop<()>,
}

impl PeerServer {
    /// Listen on `ip` (the address this agent reaches its orchestrator
    /// from, which other agents can likely reach too), on a port the
    /// system picks.
    pub(crate) async fn listen(ip: IpAddr, keys: PeerKeys, max_frame: usize) -> std::io::Result<Self> {
        let bound = spawn(async move {
            let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
            let addr = listener.local_addr()?;
            Ok::<_, std::io::Error>((listener, addr))
        });
        let (listener, addr) = bound.await.map_err(std::io::Error::other)??;
        let shelf = Arc::new(Shelf::default());
        let at_once = Arc::new(Semaphore::new(SERVING_AT_ONCE));
        let task = spawn(serve(listener, shelf.clone(), at_once.clone(), keys, max_frame));
        Ok(Self { addr, shelf, at_once, _task: AbortOnDrop(task) })
    }
}

impl Drop for PeerServer {
    /// Its session ended: requests still waiting end now.
    fn drop(&mut self) {
        let busy = SERVING_AT_ONCE - self.at_once.available_permits();
        if busy > 0 {
            tracing::info!(
                "the session ended while {busy} agents fetched from this one; they get it elsewhere"
            );
        }
        self.shelf.close();
    }
}

/// Run `task` where transfers between agents run: on a runtime of their
/// own (one thread), so that moving a large function never holds up the
/// session's tasks and executors, nor they it.
pub(crate) fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("distripool-peers")
            .enable_all()
            .build()
            .expect("a runtime for transfers between agents")
    });
    rt.spawn(task)
}

async fn serve(
    listener: TcpListener,
    shelf: Arc<Shelf>,
    at_once: Arc<Semaphore>,
    keys: PeerKeys,
    max_frame: usize,
) {
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
        spawn(async move {
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
    let mut sent = 0;
    let every = keys.timing.heartbeat;
    // Whole, or as it comes; if its fetch fails, whole once the orchestrator
    // sends it, from where the pieces stopped.
    while let Some(held) =
        waiting(&mut writer, fn_id, every, shelf.wait_for(FnId(fn_id), WAIT_FOR_FUNCTION)).await?
    {
        let total = match &held {
            Held::Whole(b) => b.len(),
            Held::Coming(c) => c.total,
        };
        while sent < total {
            let piece = match &held {
                Held::Whole(b) => b.slice(sent..total.min(sent + PIECE)),
                Held::Coming(c) => match waiting(&mut writer, fn_id, every, c.piece_at(sent)).await? {
                    Some(p) => p,
                    None => break,
                },
            };
            writer.write(&FromPeer::Piece { fn_id, total: total as u64 }, &piece).await?;
            writer.flush().await?;
            sent += piece.len();
        }
        if sent == total {
            break;
        }
    }
    if sent == 0 {
        writer.write(&FromPeer::Missing { fn_id }, b"").await?;
        writer.flush().await?;
    }
    // Wait for the fetcher to close: it has everything once it does.
    let _ = tokio::time::timeout(keys.timing.silence, reader.read_frame()).await;
    Ok(())
}

/// Wait for `until`, telling the fetcher every `every` that the function
/// is still on its way here.
async fn waiting<T>(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    fn_id: u64,
    every: Duration,
    until: impl std::future::Future<Output = T>,
) -> Result<T> {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            done = &mut until => return Ok(done),
            () = tokio::time::sleep(every) => {
                writer.write(&FromPeer::Waiting { fn_id }, b"").await?;
                writer.flush().await?;
            }
        }
    }
}

/// Pieces hashed in order off the runtime's thread; at most this many wait.
const HASH_QUEUE: usize = 8;

/// A fetched function's content id, hashed piece by piece as it arrives on
/// a thread beside the transfer, so that what is left once the last piece
/// is in is the hash's last step.
struct Checking {
    pieces: tokio::sync::mpsc::Sender<Bytes>,
    hashed: tokio::task::JoinHandle<ContentHasher>,
    needs: Vec<FnId>,
}

impl Checking {
    fn start(needs: Vec<FnId>) -> Self {
        let (pieces, mut rx) = tokio::sync::mpsc::channel::<Bytes>(HASH_QUEUE);
        let hashed = tokio::task::spawn_blocking(move || {
            let mut h = ContentHasher::default();
            while let Some(piece) = rx.blocking_recv() {
                h.update(&piece);
            }
            h
        });
        Self { pieces, hashed, needs }
    }

    async fn piece(&self, piece: &Bytes) {
        // Gone only if the hashing thread panicked, which `finish` says.
        let _ = self.pieces.send(piece.clone()).await;
    }

    /// `whole` if it is function `fn_id` (not if the hash could not end).
    async fn finish(self, fn_id: FnId, whole: Bytes) -> Option<Bytes> {
        drop(self.pieces);
        let id = self.hashed.await.ok()?.finish(&self.needs);
        (id == fn_id).then_some(whole)
    }
}

/// Fetch function `fn_id`, which names `needs`, from the agent serving at
/// `from`; what arrives must hash to that id. With `shelf`, its pieces are
/// served to other agents as they arrive.
pub(crate) async fn fetch(
    from: &str,
    fn_id: FnId,
    keys: &PeerKeys,
    max_frame: usize,
    shelf: Option<&Shelf>,
    needs: Vec<FnId>,
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
    // A source still receiving the function says so every heartbeat; one
    // silent past the limit (stopped, cut off) fails the fetch, and the
    // orchestrator sends the function instead.
    let (reader, mut writer) = framed(tcp, keys, session_keys, PIECE + 4096, 1 << 16);
    let mut reader = reader.with_silence_limit(keys.timing.silence);
    writer.write(&ToPeer::Fetch { fn_id: fn_id.0 }, b"").await?;
    writer.flush().await?;
    let mut whole: Option<Assembly> = None;
    let checking = Checking::start(needs);
    let mut coming = None;
    let mut coming_total = None;
    let started = std::time::Instant::now();
    let mut told = started;
    let received = async {
        loop {
            let frame =
                reader.read_frame().await?.ok_or_else(|| closed("the agent that holds the function"))?;
            let message = frame.message::<FromPeer>()?;
            if told.elapsed() >= TELL_EVERY {
                told = std::time::Instant::now();
                let total = coming_total.map_or("?".to_string(), |t: usize| format!("{:.1}", mib(t)));
                let why = match message {
                    FromPeer::Waiting { .. } => ", which is still receiving it itself",
                    _ => "",
                };
                tracing::info!(
                    "fetching function {:x} from the agent at {from}{why}: {:.1} of {total} MiB after {:.0} s",
                    fn_id.0,
                    mib(whole.as_ref().map_or(0, Assembly::len)),
                    started.elapsed().as_secs_f64()
                );
            }
            let total = match message {
                FromPeer::Waiting { fn_id: got } if got == fn_id.0 => continue,
                FromPeer::Piece { fn_id: got, total } if got == fn_id.0 => total,
                FromPeer::Piece { fn_id: got, .. } => {
                    return Err(refused(format!(
                        "the agent at {from} sent function {got:x}, not {:x}",
                        fn_id.0
                    )))
                }
                FromPeer::Missing { .. } => {
                    return Err(refused(format!("the agent at {from} does not hold it")))
                }
                FromPeer::Waiting { fn_id: got } => {
                    return Err(refused(format!(
                        "the agent at {from} is waiting for function {got:x}, not {:x}",
                        fn_id.0
                    )))
                }
            };
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            if coming_total.is_some_and(|t| t != total) {
                return Err(refused(format!("the agent at {from} changed the function's length mid-way")));
            }
            coming_total = Some(total);
            if total > max_frame {
                return Err(refused(format!(
                    "the function is {total} bytes, past the frame limit of {max_frame}"
                )));
            }
            if whole.is_none() {
                whole = Some(Assembly::new(total));
                coming = shelf.map(|s| s.coming(fn_id, total));
            }
            let assembly = whole.as_mut().expect("made above");
            if !assembly.push(&frame.payload, total) {
                return Err(refused(format!(
                    "the agent at {from} sent more than the function's {total} bytes"
                )));
            }
            let filled = assembly.len() == total;
            checking.piece(&frame.payload).await;
            if let Some(c) = &coming {
                c.push(frame.payload);
            }
            if filled {
                return Ok(());
            }
        }
    }
    .await;
    let outcome = match received {
        // Hashed as it came, off the thread that passes pieces on.
        Ok(()) => {
            let (whole, memfd) = whole.expect("a whole function").finish();
            match checking.finish(fn_id, whole).await {
                Some(whole) => {
                    crate::function_mem::hold(fn_id.0, memfd);
                    Ok(whole)
                }
                None => Err(refused(format!(
                    "the agent at {from} sent a function whose content is not {:x}",
                    fn_id.0
                ))),
            }
        }
        Err(e) => Err(e),
    };
    if let (Err(_), Some(shelf), Some(c)) = (&outcome, shelf, &coming) {
        shelf.failed(fn_id, c);
    }
    outcome
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn refused(why: String) -> Error {
    Error::Config(why)
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
