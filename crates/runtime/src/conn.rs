//! Framed connections and the handshake drivers.
//!
//! [`FrameReader`] turns a byte stream into [`Frame`]s, never buffering more
//! than one frame's verified length. [`FrameWriter`] writes a header and its
//! payload without first copying them into one buffer. On a sealed
//! connection both work through the record layer of
//! [`distripool_protocol::cipher`]: the writer packs everything queued before
//! a flush into records of at most 64 KiB and seals each once; the reader
//! opens each record before it looks at a byte of its plaintext. The two
//! handshake functions drive the sans-I/O state machines of
//! `distripool_protocol` under a deadline.

use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use distripool_protocol::cipher::{self, RECORD_MAX, RECORD_PREFIX, TAG_LEN};
use distripool_protocol::{
    frame, handshake::HandshakeMsg, Binding, ClientHandshake, Frame, FrameDecoder, Opener, Sealer,
    ServerHandshake, SessionKeys, HANDSHAKE_MAX_FRAME,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

pub use crate::batches::{write_batches, Sink};
use crate::bulk;
use crate::payload::Payload;
use crate::{random_bytes, Error, Result};

/// Why an authenticated session ended, on either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The peer closed the connection between frames.
    Closed,
    /// Nothing at all arrived from the peer for this long.
    Silent(Duration),
    /// Reading failed: a broken connection, a frame that failed to open.
    Connection(String),
    /// Writing failed.
    Send(String),
    /// The peer sent a message that is not valid where it arrived.
    Protocol(String),
    /// The agent cannot start executors at all.
    Executors(String),
    /// The agent finished what it held after the orchestrator asked it to
    /// drain, and said goodbye.
    Drained,
    /// This side is shutting down.
    Stopped,
    /// The agent held nothing for its idle timeout, and said goodbye.
    Idle(Duration),
    /// The agent's time limit came (its held tasks finished, or went
    /// elsewhere with its goodbye).
    TimeLimit,
}

impl SessionEnd {
    /// True when a new session would end the same way: the agent stops
    /// instead of dialing again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SessionEnd::Executors(_))
    }

    /// The end of a read that failed with `e`.
    pub(crate) fn of_read(e: Error, silence: Duration) -> Self {
        match e {
            Error::Timeout(_) => SessionEnd::Silent(silence),
            e => SessionEnd::Connection(e.to_string()),
        }
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Closed => f.write_str("connection closed"),
            SessionEnd::Idle(d) => write!(f, "idle for {d:?}"),
            SessionEnd::TimeLimit => f.write_str("time limit reached"),
            SessionEnd::Silent(d) => write!(f, "no word from the peer for {d:?}"),
            SessionEnd::Connection(e) => write!(f, "connection error: {e}"),
            SessionEnd::Send(e) => write!(f, "cannot send: {e}"),
            SessionEnd::Protocol(e) => write!(f, "protocol error: {e}"),
            SessionEnd::Executors(e) => write!(f, "{e}"),
            SessionEnd::Drained => f.write_str("drained by the orchestrator"),
            SessionEnd::Stopped => f.write_str("shutting down"),
        }
    }
}

/// A reader's buffer of frames, and of sealed records (two of the largest).
const READ_BUFFER: usize = 64 * 1024;
/// A sealed record with its prefix and tag, and the room a writer's record
/// buffer starts with.
const RECORD_FULL: usize = RECORD_PREFIX + RECORD_MAX + TAG_LEN;
const RECORD_START: usize = 1024;
const RAW_BUFFER: usize = 2 * RECORD_FULL;

pub struct FrameReader<R> {
    inner: R,
    /// Plaintext frames (opened records, on a sealed connection).
    buf: BytesMut,
    /// Sealed records as they arrive, before they are opened.
    raw: BytesMut,
    decoder: FrameDecoder,
    opener: Option<Opener>,
    /// An error met while looking ahead, returned by the next read.
    failed: Option<Error>,
    last_data: tokio::time::Instant,
    silence_limit: Option<Duration>,
    /// Fires at the earliest moment the silence limit could be reached; moved
    /// on when it fires too early, not at every read (a timer per read costs
    /// more than the read).
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_BUFFER),
            raw: BytesMut::new(),
            decoder: FrameDecoder::new(max_frame),
            opener: None,
            failed: None,
            last_data: tokio::time::Instant::now(),
            silence_limit: None,
            silence: None,
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

    /// Change the silence limit (the peer's own, once it is known).
    pub fn set_silence_limit(&mut self, limit: Duration) {
        self.silence_limit = Some(limit);
        self.silence = None;
    }

    /// Open (decrypt and verify) every record read from now on.
    pub fn with_opener(mut self, opener: Option<Opener>) -> Self {
        if opener.is_some() {
            self.raw = BytesMut::with_capacity(RAW_BUFFER);
        }
        self.opener = opener;
        self
    }

    /// True when the next [`read_frame`](Self::read_frame) returns without
    /// waiting for the socket: a whole frame (or an error) is at hand. Opens
    /// the records already received to find out.
    pub fn has_buffered_frame(&mut self) -> bool {
        if self.failed.is_none() {
            if let Err(e) = self.open_received() {
                self.failed = Some(e);
            }
        }
        self.failed.is_some() || !matches!(self.decoder.missing(&self.buf), Ok(n) if n > 0)
    }

    /// Open every complete record already received into `buf`; true if any
    /// was. Only opened records reach `buf`, so the frame length there is
    /// authenticated: room for the whole frame may be made at once. Record
    /// lengths are checked against their own small cap before anything is
    /// buffered for them.
    /// A record that fails after others opened is reported by the read
    /// after the frames those others completed.
    fn open_received(&mut self) -> Result<bool> {
        let Some(opener) = &mut self.opener else { return Ok(false) };
        let mut opened = false;
        loop {
            match opener.open_record(&mut self.raw) {
                Ok(Some(plain)) => {
                    let missing = self.decoder.missing(&self.buf)?;
                    self.buf.reserve(missing.max(plain.len()));
                    self.buf.extend_from_slice(&plain);
                    opened = true;
                }
                Ok(None) => return Ok(opened),
                Err(e) if opened => {
                    self.failed = Some(e.into());
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(body) = self.decoder.decode_raw(&mut self.buf)? {
                return Ok(Some(frame::parse_body(body.freeze())?));
            }
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.open_received()? {
                continue;
            }
            // A buffer read empty starts again at the front of its memory
            // once no frame split from it is alive: else a long stream of
            // small frames (heartbeats) would walk through all of it, and
            // every connection would come to keep all its pages resident,
            // however little it receives at once. Never a new allocation
            // here: while the last (large) frame is still in use, a fresh
            // small buffer would make the next large frame fault in fresh
            // pages instead of reusing the ones it frees.
            if self.buf.is_empty() && self.buf.capacity() < READ_BUFFER {
                // False while that frame is alive: tried again at the next read.
                let _ = self.buf.try_reclaim(READ_BUFFER);
            }
            if self.opener.is_some() {
                let want = Opener::missing(&self.raw)?;
                if self.raw.is_empty() && self.raw.capacity() < RAW_BUFFER {
                    let _ = self.raw.try_reclaim(RAW_BUFFER);
                }
                self.raw.reserve(want.max(RECORD_FULL));
            } else {
                // The length prefix is checked against the cap, but not
                // authenticated: grow the buffer with the bytes that actually
                // arrive (at most 1 MiB ahead), never by the claimed length alone.
                let missing = self.decoder.missing(&self.buf)?;
                self.buf.reserve(missing.clamp(8 * 1024, 1 << 20));
            }
            let target = if self.opener.is_some() { &mut self.raw } else { &mut self.buf };
            let mut read = std::pin::pin!(self.inner.read_buf(target));
            let n = match self.silence_limit {
                None => read.await?,
                Some(limit) => {
                    let last_data = self.last_data;
                    let silence = self
                        .silence
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(last_data + limit)));
                    loop {
                        tokio::select! {
                            biased;
                            n = &mut read => break n?,
                            () = silence.as_mut() => {
                                let deadline = last_data + limit;
                                if deadline <= tokio::time::Instant::now() {
                                    return Err(Error::Timeout("the peer has been silent too long"));
                                }
                                silence.as_mut().reset(deadline);
                            }
                        }
                    }
                }
            };
            if n > 0 {
                self.last_data = tokio::time::Instant::now();
            }
            if n == 0 {
                if self.buf.is_empty() && self.raw.is_empty() {
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
    /// The record being filled: room for its prefix, then plaintext.
    record: Vec<u8>,
    /// Frame bytes queued since [`take_written`](Self::take_written).
    written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, max_frame: usize) -> Self {
        Self {
            inner: BufWriter::with_capacity(64 * 1024, inner),
            max_frame,
            sealer: None,
            record: Vec::new(),
            written: 0,
        }
    }

    /// Seal (encrypt and authenticate) everything written from now on.
    /// Records are built in a buffer of their own, which batches the frames
    /// of a flush, and written whole: the stream gets no second buffer. That
    /// buffer starts small (an idle connection's heartbeats need little) and
    /// doubles as more is queued, up to a whole record.
    pub fn with_sealer(mut self, sealer: Option<Sealer>) -> Self {
        if sealer.is_some() {
            self.inner = BufWriter::with_capacity(0, self.inner.into_inner());
            self.record = Vec::with_capacity(RECORD_START);
            self.record.resize(RECORD_PREFIX, 0);
        }
        self.sealer = sealer;
        self
    }

    /// Queue one frame; call [`flush`](Self::flush) when no more are ready.
    pub async fn write<T: Serialize>(&mut self, msg: &T, payload: &[u8]) -> Result<()> {
        self.write_parts(msg, std::slice::from_ref(&payload)).await
    }

    /// Queue one frame whose payload is `parts` back to back, each written
    /// from where it is (sealed: into the records, the one copy sealing needs).
    pub async fn write_parts<T: Serialize, P: AsRef<[u8]>>(&mut self, msg: &T, parts: &[P]) -> Result<()> {
        let len = parts.iter().map(|p| p.as_ref().len()).sum();
        let prefix = frame::encode_prefix(msg, len, self.max_frame)?;
        self.written += (prefix.len() + len) as u64;
        if self.sealer.is_some() {
            self.push_sealed(&prefix).await?;
            for part in parts {
                self.push_sealed(part.as_ref()).await?;
            }
            return Ok(());
        }
        self.inner.write_all(&prefix).await?;
        for part in parts {
            self.inner.write_all(part.as_ref()).await?;
        }
        Ok(())
    }

    /// Append plaintext to the open record, sealing and sending each record
    /// as it fills: a large payload streams through one 64 KiB buffer.
    async fn push_sealed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.record.len() == RECORD_PREFIX && data.len() >= bulk::AT_LEAST {
                // Whole records, sealed on several threads (see bulk.rs).
                let (now, rest) = data.split_at(data.len().min(bulk::PIECE) / RECORD_MAX * RECORD_MAX);
                self.seal_piece(now).await?;
                data = rest;
                continue;
            }
            let room = RECORD_PREFIX + RECORD_MAX - self.record.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            let need = self.record.len() + now.len();
            if need > self.record.capacity() {
                // Doubling up to a whole record: a burst of a few KiB (a
                // hundred tasks) takes a few KiB, not a whole record's room.
                let room = need.max(2 * self.record.capacity()).min(RECORD_FULL);
                self.record.reserve_exact(room - self.record.len());
            }
            self.record.extend_from_slice(now);
            data = rest;
            if self.record.len() == RECORD_PREFIX + RECORD_MAX {
                self.seal_record().await?;
            }
        }
        Ok(())
    }

    async fn seal_piece(&mut self, plain: &[u8]) -> Result<()> {
        let Some(sealer) = &mut self.sealer else { return Ok(()) };
        let mut buf = bulk::take();
        let len = cipher::wire_len(plain.len());
        if buf.len() < len {
            buf.resize(len, 0);
        }
        sealer.seal_records_into(plain, &mut buf[..len], bulk::threads())?;
        self.inner.write_all(&buf[..len]).await?;
        bulk::give(buf);
        Ok(())
    }

    async fn seal_record(&mut self) -> Result<()> {
        let Some(sealer) = &mut self.sealer else { return Ok(()) };
        if self.record.len() == RECORD_PREFIX {
            return Ok(());
        }
        sealer.seal_record(&mut self.record)?;
        self.inner.write_all(&self.record).await?;
        self.record.truncate(RECORD_PREFIX);
        Ok(())
    }

    /// Frame bytes (lengths, headers, payloads; not the sealing overhead)
    /// queued since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.seal_record().await?;
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
    if matches!(len[0], 0x15 | 0x16) && len[1] == 0x03 {
        // A TLS record header (an alert or a handshake, version 3.x) where a
        // distripool handshake frame belongs.
        return Err(Error::Tls("the peer speaks TLS, but this side is not set up for TLS".into()));
    }
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
    binding: &Binding,
) -> Result<(u64, SessionKeys)> {
    let mut hs = ClientHandshake::new(key, binding.clone(), random_bytes());
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
}

/// Authenticate a connecting agent; returns the session's frame keys.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &[u8],
    binding: &Binding,
    session: u64,
) -> Result<SessionKeys> {
    let mut hs = ServerHandshake::new(key, binding.clone(), random_bytes());
    let step = hs.on_hello(recv_hs(s).await?);
    let challenge = reply_or_fail(s, step).await?;
    send_hs(s, &challenge).await?;
    let step = hs.on_proof(recv_hs(s).await?, session);
    let accept = reply_or_fail(s, step).await?;
    send_hs(s, &accept).await?;
    Ok(hs.session_keys().expect("keys exist after a successful handshake"))
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
/// acknowledging (an unplugged host, a silent firewall) within about the
/// silence limit, even while we have data queued for it.
pub fn tune_tcp(stream: &tokio::net::TcpStream, silence: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(3))
        .with_interval(Duration::from_secs(1))
        .with_retries(5);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(silence))?;
    Ok(())
}

/// A frame queued for a connection's writer task.
#[derive(Debug)]
pub struct Outgoing<M> {
    pub msg: M,
    pub payload: Payload,
}

impl<M> Outgoing<M> {
    pub fn new(msg: M) -> Self {
        Self { msg, payload: Payload::default() }
    }
    pub fn with_payload(msg: M, payload: impl Into<Payload>) -> Self {
        Self { msg, payload: payload.into() }
    }
}

impl<M> IntoIterator for Outgoing<M> {
    type Item = Self;
    type IntoIter = std::iter::Once<Self>;
    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self)
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

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
