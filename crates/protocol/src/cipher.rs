//! Authenticated encryption of the byte stream after the handshake.
//!
//! Both sides derive two keys from the shared key and the handshake's
//! transcript (both fresh nonces, the protocol version and the cluster name)
//! with HKDF-SHA256, one per direction:
//!
//! ```text
//! prk      = HKDF-Extract(salt = "distripool v1 session" ‖ nonce_c ‖ nonce_s ‖ binding, ikm = key)
//! k_up     = HKDF-Expand(prk, "agent to orchestrator", 32)
//! k_down   = HKDF-Expand(prk, "orchestrator to agent", 32)
//! ```
//!
//! The plaintext stream of frames is cut into *records* of at most
//! [`RECORD_MAX`] bytes, each sent as
//! `len: u32 LE ‖ AES-256-GCM(chunk) ‖ tag`, where `len` counts
//! ciphertext and tag, the nonce is the record's sequence number in its
//! direction (starting at 0), and `len` is the associated data. Every
//! [`REKEY_INTERVAL`] records both sides replace the direction's key with
//! `HKDF-Expand(key, "distripool rekey")`, which keeps each key far below
//! the amount of data AES-GCM may safely protect, however long a session lives. A writer puts
//! every frame queued before a flush into one record (so a burst of small
//! frames costs one seal), and streams a large frame through records of
//! `RECORD_MAX` bytes (so memory and the work done before a byte is verified
//! stay bounded, whatever the frame size).
//!
//! A flipped bit, a replayed, dropped, reordered or injected record fails to
//! open, and the connection is closed: the receiver only ever accepts the next
//! record in sequence, exactly as the sender sealed it, and looks at no
//! plaintext before its record verified. A record length over the cap is
//! refused before anything is buffered for it. Fresh nonces make every
//! session's keys different, so a record from one session is noise in any other.

use bytes::{Buf, BytesMut};
use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use sha2::Sha256;

use crate::handshake::Nonce as HsNonce;

/// Bytes the tag adds to every record.
pub const TAG_LEN: usize = 16;

/// Most plaintext bytes in one record.
pub const RECORD_MAX: usize = 64 * 1024;

/// Bytes of a record's length prefix.
pub const RECORD_PREFIX: usize = 4;

/// Records sealed under one key before both sides move to the next
/// (2^20 records: at most 64 GiB per key).
pub const REKEY_INTERVAL: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("a frame failed authentication (tampered, replayed, reordered or injected)")]
    Forged,
    #[error("a frame is too short to hold its authentication tag")]
    Truncated,
    #[error("the session has sent 2^64 records")]
    Exhausted,
    #[error("a record of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// The two directions' keys of one session, from one side's point of view.
pub struct SessionKeys {
    pub send: Sealer,
    pub recv: Opener,
}

impl SessionKeys {
    /// Keys for the agent (client) side. `binding` is the handshake's
    /// transcript binding (protocol version, cluster); both sides must pass
    /// the same bytes.
    pub fn for_agent(key: &[u8], client: &HsNonce, server: &HsNonce, binding: &[u8]) -> Self {
        let (up, down) = derive(key, client, server, binding);
        Self { send: Sealer::new(&up), recv: Opener::new(&down) }
    }

    /// Keys for the orchestrator (server) side.
    pub fn for_orchestrator(key: &[u8], client: &HsNonce, server: &HsNonce, binding: &[u8]) -> Self {
        let (up, down) = derive(key, client, server, binding);
        Self { send: Sealer::new(&down), recv: Opener::new(&up) }
    }
}

fn derive(key: &[u8], client: &HsNonce, server: &HsNonce, binding: &[u8]) -> ([u8; 32], [u8; 32]) {
    let mut salt = Vec::with_capacity(21 + 64 + binding.len());
    salt.extend_from_slice(b"distripool v1 session");
    salt.extend_from_slice(client);
    salt.extend_from_slice(server);
    salt.extend_from_slice(binding);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key);
    let mut up = [0u8; 32];
    let mut down = [0u8; 32];
    hk.expand(b"agent to orchestrator", &mut up).expect("32 bytes is a valid HKDF length");
    hk.expand(b"orchestrator to agent", &mut down).expect("32 bytes is a valid HKDF length");
    (up, down)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// One direction's key and record counter, shared by [`Sealer`] and [`Opener`].
struct Direction {
    secret: [u8; 32],
    key: LessSafeKey,
    counter: u64,
}

impl Direction {
    fn new(secret: &[u8; 32]) -> Self {
        Self { secret: *secret, key: aead_key(secret), counter: 0 }
    }

    /// The nonce of the next record.
    fn nonce(&self) -> Nonce {
        nonce(self.counter)
    }

    /// Count a record as done; moves to the next key at each interval.
    fn advance(&mut self) -> Result<(), CipherError> {
        self.counter = self.counter.checked_add(1).ok_or(CipherError::Exhausted)?;
        if self.counter % REKEY_INTERVAL == 0 {
            let hk = Hkdf::<Sha256>::from_prk(&self.secret).expect("32 bytes is a valid PRK");
            let mut next = [0u8; 32];
            hk.expand(b"distripool rekey", &mut next).expect("32 bytes is a valid HKDF length");
            self.secret = next;
            self.key = aead_key(&next);
        }
        Ok(())
    }
}

fn aead_key(secret: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret).expect("AES-256 takes a 32-byte key"))
}

/// Seals outgoing records, in order.
pub struct Sealer(Direction);

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        Self(Direction::new(key))
    }

    /// Encrypt `body` in place and return the record's length prefix and tag:
    /// the wire bytes are `prefix ‖ body ‖ tag`.
    pub fn seal(&mut self, body: &mut [u8]) -> Result<([u8; 4], [u8; TAG_LEN]), CipherError> {
        let len = u32::try_from(body.len() + TAG_LEN).map_err(|_| CipherError::Truncated)?;
        let prefix = len.to_le_bytes();
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(self.0.nonce(), Aad::from(&prefix), body)
            .map_err(|_| CipherError::Truncated)?;
        self.0.advance()?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok((prefix, out))
    }

    /// Seal one record in place. `record` holds [`RECORD_PREFIX`] bytes of
    /// room followed by at most [`RECORD_MAX`] bytes of plaintext; afterwards
    /// it holds the whole wire record `len ‖ ciphertext ‖ tag`.
    pub fn seal_record(&mut self, record: &mut Vec<u8>) -> Result<(), CipherError> {
        let plain = record.len().checked_sub(RECORD_PREFIX).ok_or(CipherError::Truncated)?;
        if plain > RECORD_MAX {
            return Err(CipherError::TooLarge { len: plain, max: RECORD_MAX });
        }
        let (prefix, tag) = self.seal(&mut record[RECORD_PREFIX..])?;
        record[..RECORD_PREFIX].copy_from_slice(&prefix);
        record.extend_from_slice(&tag);
        Ok(())
    }
}

impl Sealer {
    /// Append to `out` the wire records of `plain`, cut into records of
    /// [`RECORD_MAX`] bytes (the last may be shorter), sealed by up to
    /// `threads` threads at once: the very bytes [`seal_record`]
    /// (Self::seal_record) would give one record at a time.
    pub fn seal_records(
        &mut self,
        plain: &[u8],
        out: &mut Vec<u8>,
        threads: usize,
    ) -> Result<(), CipherError> {
        let start = out.len();
        out.resize(start + wire_len(plain.len()), 0);
        self.seal_records_into(plain, &mut out[start..], threads)
    }

    /// [`seal_records`](Self::seal_records) into `out`, which is exactly
    /// [`wire_len`]`(plain.len())` bytes long: every byte of it is written,
    /// so memory reused from an earlier piece need not be cleared first.
    pub fn seal_records_into(
        &mut self,
        plain: &[u8],
        out: &mut [u8],
        threads: usize,
    ) -> Result<(), CipherError> {
        assert_eq!(out.len(), wire_len(plain.len()), "room for exactly the records of the plaintext");
        let records = plain.len().div_ceil(RECORD_MAX);
        let in_key = (REKEY_INTERVAL - self.0.counter % REKEY_INTERVAL).min(records as u64) as usize;
        let (now, later) = plain.split_at((in_key * RECORD_MAX).min(plain.len()));
        let (out, out_later) = out.split_at_mut(wire_len(now.len()));
        let per = in_key.div_ceil(threads.max(1)).max(1);
        let (key, first) = (&self.0.key, self.0.counter);
        let mut results = Vec::new();
        let runs: Vec<&[u8]> = now.chunks(per * RECORD_MAX).collect();
        std::thread::scope(|s| {
            let mut wire = out;
            let mut handles = Vec::new();
            for (i, &run) in runs.iter().enumerate() {
                let (mine, rest) = std::mem::take(&mut wire).split_at_mut(wire_len(run.len()));
                wire = rest;
                let counter = first + (i * per) as u64;
                if i + 1 == runs.len() {
                    // The last run is this thread's own.
                    results.push(seal_run(key, counter, run, mine));
                } else {
                    handles.push(s.spawn(move || seal_run(key, counter, run, mine)));
                }
            }
            for h in handles {
                results.push(h.join().unwrap_or(Err(CipherError::Truncated)));
            }
        });
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        for _ in 0..in_key {
            self.0.advance()?;
        }
        if later.is_empty() {
            return Ok(());
        }
        // Under the next key, from its first record.
        self.seal_records_into(later, out_later, threads)
    }
}

/// Wire bytes of `plain` cut into records.
pub fn wire_len(plain: usize) -> usize {
    plain + plain.div_ceil(RECORD_MAX) * (RECORD_PREFIX + TAG_LEN)
}

/// Seal `plain`'s records, numbered from `counter`, into `out` (exactly
/// their wire length).
fn seal_run(key: &LessSafeKey, mut counter: u64, plain: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
    let mut at = 0;
    for chunk in plain.chunks(RECORD_MAX) {
        let prefix = ((chunk.len() + TAG_LEN) as u32).to_le_bytes();
        let record = &mut out[at..at + RECORD_PREFIX + chunk.len() + TAG_LEN];
        record[..RECORD_PREFIX].copy_from_slice(&prefix);
        let (body, tag) = record[RECORD_PREFIX..].split_at_mut(chunk.len());
        body.copy_from_slice(chunk);
        let t = key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&prefix), body)
            .map_err(|_| CipherError::Truncated)?;
        tag.copy_from_slice(t.as_ref());
        counter += 1;
        at += record.len();
    }
    Ok(())
}

/// Opens incoming records, in order.
pub struct Opener(Direction);

impl Opener {
    fn new(key: &[u8; 32]) -> Self {
        Self(Direction::new(key))
    }

    /// Decrypt a record's `ciphertext ‖ tag` in place; on success the first
    /// `frame.len() - TAG_LEN` bytes hold the plaintext.
    pub fn open(&mut self, frame: &mut [u8]) -> Result<usize, CipherError> {
        if frame.len() < TAG_LEN {
            return Err(CipherError::Truncated);
        }
        let prefix = (frame.len() as u32).to_le_bytes();
        let (body, tag) = frame.split_at_mut(frame.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (*tag).try_into().expect("tag length");
        // Only a record that verified moves the counter on.
        self.0
            .key
            .open_in_place_separate_tag(self.0.nonce(), Aad::from(&prefix), Tag::from(tag), body, 0..)
            .map_err(|_| CipherError::Forged)?;
        self.0.advance()?;
        Ok(body.len())
    }

    /// How many more bytes `raw` must hold before
    /// [`open_record`](Self::open_record) can return; checks the length
    /// prefix against the cap as soon as it is there.
    pub fn missing(raw: &[u8]) -> Result<usize, CipherError> {
        if raw.len() < RECORD_PREFIX {
            return Ok(RECORD_PREFIX - raw.len());
        }
        let len = record_len(raw)?;
        Ok((RECORD_PREFIX + len).saturating_sub(raw.len()))
    }

    /// Take one sealed record off the front of `raw` and open it: the
    /// verified plaintext, or `Ok(None)` while the record is incomplete.
    pub fn open_record(&mut self, raw: &mut BytesMut) -> Result<Option<BytesMut>, CipherError> {
        if raw.len() < RECORD_PREFIX {
            return Ok(None);
        }
        let len = record_len(raw)?;
        if raw.len() < RECORD_PREFIX + len {
            return Ok(None);
        }
        raw.advance(RECORD_PREFIX);
        let mut record = raw.split_to(len);
        let n = self.open(&mut record)?;
        record.truncate(n);
        Ok(Some(record))
    }
}

fn record_len(raw: &[u8]) -> Result<usize, CipherError> {
    let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    if len > RECORD_MAX + TAG_LEN {
        return Err(CipherError::TooLarge { len, max: RECORD_MAX + TAG_LEN });
    }
    if len < TAG_LEN {
        return Err(CipherError::Truncated);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        (SessionKeys::for_agent(b"k", &c, &s, b"b"), SessionKeys::for_orchestrator(b"k", &c, &s, b"b"))
    }

    fn sealed(sealer: &mut Sealer, msg: &[u8]) -> Vec<u8> {
        let mut body = msg.to_vec();
        let (_, tag) = sealer.seal(&mut body).unwrap();
        body.extend_from_slice(&tag);
        body
    }

    #[test]
    fn frames_round_trip_in_both_directions() {
        let (mut agent, mut orch) = pair();
        for i in 0..5u8 {
            let mut f = sealed(&mut agent.send, &[i; 40]);
            assert_ne!(&f[..40], &[i; 40][..], "ciphertext differs from plaintext");
            let n = orch.recv.open(&mut f).unwrap();
            assert_eq!(&f[..n], &[i; 40][..]);
            let mut g = sealed(&mut orch.send, b"down");
            let n = agent.recv.open(&mut g).unwrap();
            assert_eq!(&g[..n], b"down");
        }
    }

    #[test]
    fn records_sealed_on_several_threads_are_those_sealed_one_by_one() {
        let plain: Vec<u8> = (0..(9 * RECORD_MAX + 1234)).map(|i| (i * 7 % 251) as u8).collect();
        // From the start of a key, and across a key change.
        for before in [0, REKEY_INTERVAL - 3] {
            let (mut one, _) = pair();
            let (mut many, mut orch) = pair();
            one.send.0.counter = before;
            many.send.0.counter = before;
            orch.recv.0.counter = before;
            let mut expect = Vec::new();
            for chunk in plain.chunks(RECORD_MAX) {
                let mut record = vec![0u8; RECORD_PREFIX];
                record.extend_from_slice(chunk);
                one.send.seal_record(&mut record).unwrap();
                expect.extend_from_slice(&record);
            }
            for threads in [1, 3, 16] {
                let (mut many, _) = pair();
                many.send.0.counter = before;
                let mut out = b"kept".to_vec();
                many.send.seal_records(&plain, &mut out, threads).unwrap();
                assert_eq!(&out[..4], b"kept");
                assert!(out[4..] == expect[..], "{threads} threads from record {before}");
                assert_eq!(many.send.0.counter, one.send.0.counter);
                // Into memory an earlier piece left its bytes in.
                let (mut again, _) = pair();
                again.send.0.counter = before;
                let mut reused = vec![0xa5u8; wire_len(plain.len())];
                again.send.seal_records_into(&plain, &mut reused, threads).unwrap();
                assert!(reused == expect, "{threads} threads into reused memory from record {before}");
            }
            let mut out = Vec::new();
            many.send.seal_records(&plain, &mut out, 2).unwrap();
            let mut raw = BytesMut::from(&out[..]);
            let mut opened = Vec::new();
            while let Some(p) = orch.recv.open_record(&mut raw).unwrap() {
                opened.extend_from_slice(&p);
            }
            assert!(opened == plain);
            // The next record goes on from where the sealed ones ended.
            let mut record = vec![0u8; RECORD_PREFIX];
            record.extend_from_slice(b"after");
            many.send.seal_record(&mut record).unwrap();
            let mut raw = BytesMut::from(&record[..]);
            assert_eq!(&orch.recv.open_record(&mut raw).unwrap().unwrap()[..], b"after");
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let (mut agent, _) = pair();
        let f = sealed(&mut agent.send, b"payload");
        for bit in 0..f.len() * 8 {
            let (_, mut orch) = pair();
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(orch.recv.open(&mut g), Err(CipherError::Forged), "bit {bit}");
        }
    }

    #[test]
    fn replayed_reordered_and_dropped_frames_are_caught() {
        let (mut agent, mut orch) = pair();
        let f0 = sealed(&mut agent.send, b"zero");
        let f1 = sealed(&mut agent.send, b"one");
        let f2 = sealed(&mut agent.send, b"two");
        // Reordered: frame 1 first.
        assert_eq!(orch.recv.open(&mut f1.clone()), Err(CipherError::Forged));
        assert!(orch.recv.open(&mut f0.clone()).is_ok());
        // Replayed.
        assert_eq!(orch.recv.open(&mut f0.clone()), Err(CipherError::Forged));
        // Dropped: frame 1 never arrives.
        let (_, mut fresh) = pair();
        fresh.recv.open(&mut f0.clone()).unwrap();
        assert_eq!(fresh.recv.open(&mut f2.clone()), Err(CipherError::Forged));
    }

    #[test]
    fn a_frame_from_another_session_or_direction_is_noise() {
        let (mut agent, _) = pair();
        let f = sealed(&mut agent.send, b"hello");
        let mut other = SessionKeys::for_orchestrator(b"k", &[1; 32], &[3; 32], b"b");
        assert_eq!(other.recv.open(&mut f.clone()), Err(CipherError::Forged));
        let mut other_binding = SessionKeys::for_orchestrator(b"k", &[1; 32], &[2; 32], b"c");
        assert_eq!(other_binding.recv.open(&mut f.clone()), Err(CipherError::Forged));
        let mut wrong_key = SessionKeys::for_orchestrator(b"other", &[1; 32], &[2; 32], b"b");
        assert_eq!(wrong_key.recv.open(&mut f.clone()), Err(CipherError::Forged));
        // The agent's own receive key is for the other direction.
        assert_eq!(agent.recv.open(&mut f.clone()), Err(CipherError::Forged));
    }

    #[test]
    fn truncated_frames_are_refused() {
        let (_, mut orch) = pair();
        assert_eq!(orch.recv.open(&mut [0u8; 15]), Err(CipherError::Truncated));
    }

    fn record(sealer: &mut Sealer, plain: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_PREFIX];
        r.extend_from_slice(plain);
        sealer.seal_record(&mut r).unwrap();
        r
    }

    #[test]
    fn records_open_from_a_byte_stream_cut_anywhere() {
        let (mut agent, mut orch) = pair();
        let mut wire = record(&mut agent.send, b"first");
        wire.extend(record(&mut agent.send, &[9u8; RECORD_MAX]));
        for cut in [0, 1, 3, 4, 10, 30, wire.len() - 1] {
            let (mut a, mut o) = pair();
            let mut again = record(&mut a.send, b"first");
            again.extend(record(&mut a.send, &[9u8; RECORD_MAX]));
            assert_eq!(again, wire, "sealing is deterministic for the same keys");
            let mut raw = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(p) = o.recv.open_record(&mut raw).unwrap() {
                got.extend_from_slice(&p);
            }
            assert!(Opener::missing(&raw).unwrap() > 0);
            raw.extend_from_slice(&wire[cut..]);
            while let Some(p) = o.recv.open_record(&mut raw).unwrap() {
                got.extend_from_slice(&p);
            }
            assert_eq!(got.len(), 5 + RECORD_MAX);
            assert!(raw.is_empty());
        }
        let mut raw = BytesMut::from(&wire[..]);
        assert_eq!(&orch.recv.open_record(&mut raw).unwrap().unwrap()[..], b"first");
    }

    #[test]
    fn oversized_and_undersized_records_are_refused_before_buffering() {
        let (_, mut orch) = pair();
        let mut raw = BytesMut::from(&((RECORD_MAX + TAG_LEN + 1) as u32).to_le_bytes()[..]);
        assert!(matches!(orch.recv.open_record(&mut raw), Err(CipherError::TooLarge { .. })));
        assert!(Opener::missing(&raw).is_err());
        let mut raw = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert!(matches!(orch.recv.open_record(&mut raw), Err(CipherError::TooLarge { .. })));
        let mut raw = BytesMut::from(&[3u8, 0, 0, 0, 1, 2, 3][..]);
        assert_eq!(orch.recv.open_record(&mut raw), Err(CipherError::Truncated));
        // A sealer refuses to build a record over the cap.
        let (mut agent, _) = pair();
        let mut big = vec![0u8; RECORD_PREFIX + RECORD_MAX + 1];
        assert!(matches!(agent.send.seal_record(&mut big), Err(CipherError::TooLarge { .. })));
    }

    #[test]
    fn keys_move_on_at_each_interval_in_step_on_both_sides() {
        let (mut agent, mut orch) = pair();
        // Jump both directions to just before the interval instead of sealing
        // a million records.
        agent.send.0.counter = REKEY_INTERVAL - 2;
        orch.recv.0.counter = REKEY_INTERVAL - 2;
        let before = agent.send.0.secret;
        for i in 0..4u8 {
            let mut f = sealed(&mut agent.send, &[i; 10]);
            let n = orch.recv.open(&mut f).unwrap();
            assert_eq!(&f[..n], &[i; 10][..]);
        }
        assert_ne!(agent.send.0.secret, before, "the key changed at the interval");
        assert_eq!(agent.send.0.secret, orch.recv.0.secret);
        // A receiver that did not move on cannot read the new key's records.
        let (_, mut stale) = pair();
        stale.recv.0.counter = REKEY_INTERVAL + 2;
        let mut f = sealed(&mut agent.send, b"x");
        assert_eq!(stale.recv.open(&mut f), Err(CipherError::Forged));
    }
}
