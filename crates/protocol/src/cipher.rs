//! Authenticated encryption of every frame after the handshake.
//!
//! Both sides derive two keys from the shared key and the handshake's two
//! fresh nonces with HKDF-SHA256, one per direction:
//!
//! ```text
//! prk      = HKDF-Extract(salt = "distripool v1 session" ‖ nonce_c ‖ nonce_s, ikm = key)
//! k_up     = HKDF-Expand(prk, "agent to orchestrator", 32)
//! k_down   = HKDF-Expand(prk, "orchestrator to agent", 32)
//! ```
//!
//! Each frame is then `len: u32 LE ‖ ChaCha20-Poly1305(body) ‖ tag`, where
//! `len` counts ciphertext and tag, the nonce is the frame's sequence number
//! in its direction (starting at 0), and `len` is the associated data. A
//! flipped bit, a replayed, dropped, reordered or injected frame fails to
//! open, and the connection is closed: the receiver only ever accepts the
//! next frame in sequence, exactly as the sender sealed it. Fresh nonces make
//! every session's keys different, so a frame recorded in one session is
//! noise in any other.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::handshake::Nonce as HsNonce;

/// Bytes the tag adds to every frame.
pub const TAG_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("a frame failed authentication (tampered, replayed, reordered or injected)")]
    Forged,
    #[error("a frame is too short to hold its authentication tag")]
    Truncated,
    #[error("the session has sent 2^64 frames")]
    Exhausted,
}

/// The two directions' keys of one session, from one side's point of view.
pub struct SessionKeys {
    pub send: Sealer,
    pub recv: Opener,
}

impl SessionKeys {
    /// Keys for the agent (client) side.
    pub fn for_agent(key: &[u8], client: &HsNonce, server: &HsNonce) -> Self {
        let (up, down) = derive(key, client, server);
        Self { send: Sealer::new(&up), recv: Opener::new(&down) }
    }

    /// Keys for the orchestrator (server) side.
    pub fn for_orchestrator(key: &[u8], client: &HsNonce, server: &HsNonce) -> Self {
        let (up, down) = derive(key, client, server);
        Self { send: Sealer::new(&down), recv: Opener::new(&up) }
    }
}

fn derive(key: &[u8], client: &HsNonce, server: &HsNonce) -> ([u8; 32], [u8; 32]) {
    let mut salt = Vec::with_capacity(21 + 64);
    salt.extend_from_slice(b"distripool v1 session");
    salt.extend_from_slice(client);
    salt.extend_from_slice(server);
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
    Nonce::from(n)
}

/// Seals outgoing frames, in order.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(Key::from_slice(key)), counter: 0 }
    }

    /// Encrypt `body` in place and return the frame's length prefix and tag:
    /// the wire bytes are `prefix ‖ body ‖ tag`.
    pub fn seal(&mut self, body: &mut [u8]) -> Result<([u8; 4], [u8; TAG_LEN]), CipherError> {
        let len = u32::try_from(body.len() + TAG_LEN).map_err(|_| CipherError::Truncated)?;
        let prefix = len.to_le_bytes();
        let n = nonce(self.counter);
        self.counter = self.counter.checked_add(1).ok_or(CipherError::Exhausted)?;
        let tag =
            self.cipher.encrypt_in_place_detached(&n, &prefix, body).map_err(|_| CipherError::Truncated)?;
        Ok((prefix, tag.into()))
    }
}

/// Opens incoming frames, in order.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Opener {
    fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(Key::from_slice(key)), counter: 0 }
    }

    /// Decrypt a frame's `ciphertext ‖ tag` in place; on success the first
    /// `frame.len() - TAG_LEN` bytes hold the plaintext body.
    pub fn open(&mut self, frame: &mut [u8]) -> Result<usize, CipherError> {
        if frame.len() < TAG_LEN {
            return Err(CipherError::Truncated);
        }
        let prefix = (frame.len() as u32).to_le_bytes();
        let (body, tag) = frame.split_at_mut(frame.len() - TAG_LEN);
        let tag = Tag::clone_from_slice(tag);
        self.cipher
            .decrypt_in_place_detached(&nonce(self.counter), &prefix, body, &tag)
            .map_err(|_| CipherError::Forged)?;
        self.counter = self.counter.checked_add(1).ok_or(CipherError::Exhausted)?;
        Ok(body.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        (SessionKeys::for_agent(b"k", &c, &s), SessionKeys::for_orchestrator(b"k", &c, &s))
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
        let mut other = SessionKeys::for_orchestrator(b"k", &[1; 32], &[3; 32]);
        assert_eq!(other.recv.open(&mut f.clone()), Err(CipherError::Forged));
        let mut wrong_key = SessionKeys::for_orchestrator(b"other", &[1; 32], &[2; 32]);
        assert_eq!(wrong_key.recv.open(&mut f.clone()), Err(CipherError::Forged));
        // The agent's own receive key is for the other direction.
        assert_eq!(agent.recv.open(&mut f.clone()), Err(CipherError::Forged));
    }

    #[test]
    fn truncated_frames_are_refused() {
        let (_, mut orch) = pair();
        assert_eq!(orch.recv.open(&mut [0u8; 15]), Err(CipherError::Truncated));
    }
}
