//! Framed connections and the handshake drivers.
//!
//! [`FrameReader`] turns a byte stream into [`Frame`]s, never buffering more
//! than one frame's verified length. [`FrameWriter`] writes a header and its
//! payload without first copying them into one buffer. The two handshake
//! functions drive the sans-I/O state machines of `distripool_protocol` under
//! a deadline.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use distripool_protocol::{
    frame, handshake::HandshakeMsg, ClientHandshake, Frame, FrameDecoder, Opener, Sealer, ServerHandshake,
    SessionKeys, HANDSHAKE_MAX_FRAME,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

use crate::{random_bytes, Error, Result};

/// Longest a peer may take to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often each side shows it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a peer is declared gone.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    opener: Option<Opener>,
    last_data: tokio::time::Instant,
    silence_limit: Option<Duration>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            decoder: FrameDecoder::new(max_frame),
            opener: None,
            last_data: tokio::time::Instant::now(),
            silence_limit: None,
        }
    }

    /// Fail a read with [`Error::Timeout`] once the peer has sent nothing at
    /// all for `limit`. Any byte counts, so a large frame that takes long to
    /// arrive keeps its sender alive while it streams in; and since the clock
    /// runs from the last byte, not from the call, a read that is cancelled
    /// and started again does not reset it.
    pub fn with_silence_limit(mut self, limit: Duration) -> Self {
        self.silence_limit = Some(limit);
        self
    }

    /// Open (decrypt and verify) every frame read from now on.
    pub fn with_opener(mut self, opener: Option<Opener>) -> Self {
        self.opener = opener;
        self
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(mut body) = self.decoder.decode_raw(&mut self.buf)? {
                // Nothing inside a sealed frame is looked at before it verifies.
                if let Some(opener) = &mut self.opener {
                    let n = opener.open(&mut body)?;
                    body.truncate(n);
                }
                return Ok(Some(frame::parse_body(body.freeze())?));
            }
            // The length prefix is checked against the cap, but not yet
            // authenticated: grow the buffer with the bytes that actually
            // arrive (at most 1 MiB ahead), never by the claimed length alone.
            let missing = self.decoder.missing(&self.buf)?;
            self.buf.reserve(missing.clamp(8 * 1024, 1 << 20));
            let read = self.inner.read_buf(&mut self.buf);
            let n = match self.silence_limit {
                None => read.await?,
                Some(limit) => tokio::time::timeout_at(self.last_data + limit, read)
                    .await
                    .map_err(|_| Error::Timeout("the peer has been silent too long"))??,
            };
            if n > 0 {
                self.last_data = tokio::time::Instant::now();
            }
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                )));
            }
        }
    }
}

pub struct FrameWriter<W> {
    inner: BufWriter<W>,
    max_frame: usize,
    sealer: Option<Sealer>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, max_frame: usize) -> Self {
        Self { inner: BufWriter::with_capacity(64 * 1024, inner), max_frame, sealer: None }
    }

    /// Seal (encrypt and authenticate) every frame written from now on.
    pub fn with_sealer(mut self, sealer: Option<Sealer>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Queue one frame; call [`flush`](Self::flush) when no more are ready.
    pub async fn write<T: Serialize>(&mut self, msg: &T, payload: &[u8]) -> Result<()> {
        if let Some(sealer) = &mut self.sealer {
            let mut body = frame::encode_body(msg, payload, self.max_frame)?;
            let (prefix, tag) = sealer.seal(&mut body)?;
            self.inner.write_all(&prefix).await?;
            self.inner.write_all(&body).await?;
            self.inner.write_all(&tag).await?;
            return Ok(());
        }
        let prefix = frame::encode_prefix(msg, payload.len(), self.max_frame)?;
        self.inner.write_all(&prefix).await?;
        self.inner.write_all(payload).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.inner.flush().await?;
        Ok(())
    }
}

async fn send_hs<W: AsyncWrite + Unpin>(w: &mut W, msg: &HandshakeMsg) -> Result<()> {
    let bytes = frame::encode(msg, b"", HANDSHAKE_MAX_FRAME)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

async fn recv_hs<R: AsyncRead + Unpin>(r: &mut R) -> Result<HandshakeMsg> {
    // Read exactly one small frame; nothing beyond it is consumed, so the
    // stream can be handed on untouched afterwards.
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n > HANDSHAKE_MAX_FRAME {
        return Err(distripool_protocol::FrameError::TooLarge { len: n, max: HANDSHAKE_MAX_FRAME }.into());
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    let mut buf = BytesMut::with_capacity(4 + n);
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&body);
    let frame = FrameDecoder::new(HANDSHAKE_MAX_FRAME)
        .decode(&mut buf)?
        .ok_or(Error::Timeout("incomplete handshake frame"))?;
    Ok(frame.message()?)
}

/// Authenticate to an orchestrator as an agent; returns the session id and
/// the session's frame keys.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &[u8],
) -> Result<(u64, SessionKeys)> {
    let fut = async {
        let mut hs = ClientHandshake::new(key, random_bytes());
        send_hs(s, &hs.hello()).await?;
        let challenge = recv_hs(s).await?;
        match hs.on_challenge(challenge) {
            Ok(proof) => send_hs(s, &proof).await?,
            Err(e) => {
                if let Some(reply) = e.reply() {
                    let _ = send_hs(s, &reply).await;
                }
                return Err(e.into());
            }
        }
        let session = hs.on_outcome(recv_hs(s).await?)?;
        let keys = hs.session_keys().expect("keys exist after a successful handshake");
        Ok((session, keys))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Timeout("handshake with the orchestrator"))?
}

/// Authenticate a connecting agent; returns the session's frame keys.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &[u8],
    session: u64,
) -> Result<SessionKeys> {
    let fut = async {
        let mut hs = ServerHandshake::new(key, random_bytes());
        let step = hs.on_hello(recv_hs(s).await?);
        let challenge = reply_or_fail(s, step).await?;
        send_hs(s, &challenge).await?;
        let step = hs.on_proof(recv_hs(s).await?, session);
        let accept = reply_or_fail(s, step).await?;
        send_hs(s, &accept).await?;
        Ok(hs.session_keys().expect("keys exist after a successful handshake"))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await.map_err(|_| Error::Timeout("agent handshake"))?
}

async fn reply_or_fail<S: AsyncWrite + Unpin>(
    s: &mut S,
    step: std::result::Result<HandshakeMsg, distripool_protocol::HandshakeError>,
) -> Result<HandshakeMsg> {
    match step {
        Ok(m) => Ok(m),
        Err(e) => {
            if let Some(reply) = e.reply() {
                let _ = send_hs(s, &reply).await;
            }
            Err(e.into())
        }
    }
}

/// Socket options for every agent ↔ orchestrator connection: no Nagle delay
/// on small frames, and the kernel gives up on a peer that stops
/// acknowledging (an unplugged host, a silent firewall) within about
/// [`PEER_TIMEOUT`], even while we have data queued for it.
pub fn tune_tcp(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(3))
        .with_interval(Duration::from_secs(1))
        .with_retries(5);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(PEER_TIMEOUT))?;
    Ok(())
}

/// A frame queued for a connection's writer task.
#[derive(Debug)]
pub struct Outgoing<M> {
    pub msg: M,
    pub payload: Bytes,
}

impl<M> Outgoing<M> {
    pub fn new(msg: M) -> Self {
        Self { msg, payload: Bytes::new() }
    }
    pub fn with_payload(msg: M, payload: Bytes) -> Self {
        Self { msg, payload }
    }
}

/// Aborts the task when dropped, so a connection's helper tasks never
/// outlive the connection.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
