//! Mutual authentication with a shared key, as two small state machines.
//!
//! ```text
//!  agent (client)                                   orchestrator (server)
//!  Hello{magic, version, role, nonce_c}  ───────►   checks magic, version, role
//!                                        ◄───────   Challenge{nonce_s, proof_s}
//!  verifies proof_s                                  proof_s = HMAC(key, "orchestrator"‖v‖nonce_c‖nonce_s)
//!  Proof{proof_c}                        ───────►   verifies proof_c
//!  proof_c = HMAC(key, "agent"‖v‖nonce_c‖nonce_s)
//!                                        ◄───────   Accept{session}
//! ```
//!
//! Versions and roles are compared before any key material is touched, so a
//! mismatch gives a precise error. Each proof is bound to its role and to both
//! fresh nonces, so neither a replayed proof nor one side's proof used as the
//! other's is accepted. Proofs are compared in constant time. The server
//! proves itself first: an agent never sends anything derived from its key to
//! an orchestrator that does not hold the same key.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::PROTOCOL_VERSION;

/// Identifies distripool traffic; anything else is refused at once.
pub const MAGIC: [u8; 8] = *b"DSTRPOOL";

pub type Nonce = [u8; 32];
pub type Tag = [u8; 32];

/// Who a peer says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Agent,
    Orchestrator,
}

/// Why the other side refused the handshake (sent in the clear; carries no detail
/// an unauthenticated peer could use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    Version { supported: u32 },
    Role,
    Auth,
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeMsg {
    Hello { magic: [u8; 8], version: u32, role: Role, nonce: Nonce },
    Challenge { version: u32, nonce: Nonce, proof: Tag },
    Proof { proof: Tag },
    Accept { session: u64 },
    Reject { reason: RejectReason },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer is not speaking the distripool protocol")]
    BadMagic,
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}; install the same distripool version on both sides")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("peer connected as {got:?} but only {expected:?} may connect here")]
    WrongRole { expected: Role, got: Role },
    #[error("the peer could not prove it holds our authentication key (the keys differ)")]
    PeerFailedAuth,
    #[error("the peer refused our authentication key (the keys differ)")]
    RejectedAuth,
    #[error("the peer refused the handshake: {0:?}")]
    Rejected(RejectReason),
    #[error("unexpected handshake message")]
    Unexpected,
}

impl HandshakeError {
    /// The message to send the peer before closing, if any.
    pub fn reply(&self) -> Option<HandshakeMsg> {
        let reason = match self {
            HandshakeError::VersionMismatch { .. } => RejectReason::Version { supported: PROTOCOL_VERSION },
            HandshakeError::WrongRole { .. } => RejectReason::Role,
            HandshakeError::PeerFailedAuth => RejectReason::Auth,
            HandshakeError::BadMagic | HandshakeError::Unexpected => RejectReason::Malformed,
            HandshakeError::RejectedAuth | HandshakeError::Rejected(_) => return None,
        };
        Some(HandshakeMsg::Reject { reason })
    }

    /// True when the shared keys differ, as opposed to a protocol mismatch.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, HandshakeError::PeerFailedAuth | HandshakeError::RejectedAuth)
    }
}

fn rejected(reason: RejectReason) -> HandshakeError {
    match reason {
        RejectReason::Auth => HandshakeError::RejectedAuth,
        other => HandshakeError::Rejected(other),
    }
}

fn proof(key: &[u8], role: Role, client: &Nonce, server: &Nonce) -> Tag {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(match role {
        Role::Agent => b"distripool agent proof\0",
        Role::Orchestrator => b"distripool orchestrator proof\0",
    });
    mac.update(&PROTOCOL_VERSION.to_le_bytes());
    mac.update(client);
    mac.update(server);
    mac.finalize().into_bytes().into()
}

fn verify(expected: &Tag, got: &Tag) -> bool {
    expected.ct_eq(got).into()
}

/// The connecting side (an agent).
pub struct ClientHandshake {
    key: Vec<u8>,
    nonce: Nonce,
    server_nonce: Option<Nonce>,
}

impl ClientHandshake {
    pub fn new(key: &[u8], nonce: Nonce) -> Self {
        Self { key: key.to_vec(), nonce, server_nonce: None }
    }

    /// First message to send.
    pub fn hello(&self) -> HandshakeMsg {
        HandshakeMsg::Hello { magic: MAGIC, version: PROTOCOL_VERSION, role: Role::Agent, nonce: self.nonce }
    }

    /// Check the server's proof and answer with ours.
    pub fn on_challenge(&mut self, msg: HandshakeMsg) -> Result<HandshakeMsg, HandshakeError> {
        match msg {
            HandshakeMsg::Challenge { version, nonce, proof: theirs } => {
                if version != PROTOCOL_VERSION {
                    return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
                }
                let expected = proof(&self.key, Role::Orchestrator, &self.nonce, &nonce);
                if !verify(&expected, &theirs) {
                    return Err(HandshakeError::PeerFailedAuth);
                }
                self.server_nonce = Some(nonce);
                Ok(HandshakeMsg::Proof { proof: proof(&self.key, Role::Agent, &self.nonce, &nonce) })
            }
            HandshakeMsg::Reject { reason } => Err(rejected(reason)),
            _ => Err(HandshakeError::Unexpected),
        }
    }

    /// This session's frame keys; only meaningful once the handshake succeeded.
    pub fn session_keys(&self) -> Option<crate::SessionKeys> {
        let server = self.server_nonce?;
        Some(crate::SessionKeys::for_agent(&self.key, &self.nonce, &server))
    }

    /// The server's verdict on our proof; the session id on success.
    pub fn on_outcome(&mut self, msg: HandshakeMsg) -> Result<u64, HandshakeError> {
        match (msg, self.server_nonce) {
            (HandshakeMsg::Accept { session }, Some(_)) => Ok(session),
            (HandshakeMsg::Reject { reason }, _) => Err(rejected(reason)),
            _ => Err(HandshakeError::Unexpected),
        }
    }
}

/// The accepting side (an orchestrator).
pub struct ServerHandshake {
    key: Vec<u8>,
    nonce: Nonce,
    client_nonce: Option<Nonce>,
}

impl ServerHandshake {
    pub fn new(key: &[u8], nonce: Nonce) -> Self {
        Self { key: key.to_vec(), nonce, client_nonce: None }
    }

    /// Check the client's hello and answer with our challenge and proof.
    pub fn on_hello(&mut self, msg: HandshakeMsg) -> Result<HandshakeMsg, HandshakeError> {
        let HandshakeMsg::Hello { magic, version, role, nonce } = msg else {
            return Err(HandshakeError::Unexpected);
        };
        if magic != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
        }
        if role != Role::Agent {
            return Err(HandshakeError::WrongRole { expected: Role::Agent, got: role });
        }
        self.client_nonce = Some(nonce);
        Ok(HandshakeMsg::Challenge {
            version: PROTOCOL_VERSION,
            nonce: self.nonce,
            proof: proof(&self.key, Role::Orchestrator, &nonce, &self.nonce),
        })
    }

    /// This session's frame keys; only meaningful once the handshake succeeded.
    pub fn session_keys(&self) -> Option<crate::SessionKeys> {
        let client = self.client_nonce?;
        Some(crate::SessionKeys::for_orchestrator(&self.key, &client, &self.nonce))
    }

    /// Check the client's proof; on success answer `Accept{session}`.
    pub fn on_proof(&mut self, msg: HandshakeMsg, session: u64) -> Result<HandshakeMsg, HandshakeError> {
        let Some(client_nonce) = self.client_nonce else {
            return Err(HandshakeError::Unexpected);
        };
        match msg {
            HandshakeMsg::Proof { proof: theirs } => {
                let expected = proof(&self.key, Role::Agent, &client_nonce, &self.nonce);
                if verify(&expected, &theirs) {
                    Ok(HandshakeMsg::Accept { session })
                } else {
                    Err(HandshakeError::PeerFailedAuth)
                }
            }
            HandshakeMsg::Reject { reason } => Err(rejected(reason)),
            _ => Err(HandshakeError::Unexpected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        client_key: &[u8],
        server_key: &[u8],
    ) -> (Result<u64, HandshakeError>, Result<HandshakeMsg, HandshakeError>) {
        let mut c = ClientHandshake::new(client_key, [1; 32]);
        let mut s = ServerHandshake::new(server_key, [2; 32]);
        let challenge = s.on_hello(c.hello()).unwrap();
        match c.on_challenge(challenge) {
            Ok(p) => {
                let verdict = s.on_proof(p, 42);
                let reply = match &verdict {
                    Ok(m) => m.clone(),
                    Err(e) => e.reply().unwrap(),
                };
                (c.on_outcome(reply), verdict)
            }
            Err(e) => {
                // The client tells the server why it stops.
                let verdict = s.on_proof(e.reply().unwrap(), 42);
                (Err(e), verdict)
            }
        }
    }

    #[test]
    fn same_key_is_accepted_on_both_sides() {
        let (client, server) = run(b"secret", b"secret");
        assert_eq!(client, Ok(42));
        assert_eq!(server, Ok(HandshakeMsg::Accept { session: 42 }));
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let (client, server) = run(b"secret", b"other");
        assert_eq!(client, Err(HandshakeError::PeerFailedAuth));
        assert_eq!(server, Err(HandshakeError::RejectedAuth));
        assert!(client.unwrap_err().is_auth_failure());
        assert!(server.unwrap_err().is_auth_failure());
    }

    #[test]
    fn forged_client_proof_is_refused() {
        let c = ClientHandshake::new(b"k", [1; 32]);
        let mut s = ServerHandshake::new(b"k", [2; 32]);
        let HandshakeMsg::Challenge { proof, .. } = s.on_hello(c.hello()).unwrap() else { panic!() };
        // Reflecting the server's own proof back must not work: proofs are role-bound.
        assert_eq!(s.on_proof(HandshakeMsg::Proof { proof }, 1), Err(HandshakeError::PeerFailedAuth));
    }

    #[test]
    fn replayed_proof_from_an_earlier_session_is_refused() {
        let mut c = ClientHandshake::new(b"k", [1; 32]);
        let mut s1 = ServerHandshake::new(b"k", [2; 32]);
        let proof = c.on_challenge(s1.on_hello(c.hello()).unwrap()).unwrap();
        let mut s2 = ServerHandshake::new(b"k", [3; 32]);
        s2.on_hello(c.hello()).unwrap();
        assert_eq!(s2.on_proof(proof, 1), Err(HandshakeError::PeerFailedAuth));
    }

    #[test]
    fn version_magic_and_role_are_checked_first() {
        let mut s = ServerHandshake::new(b"k", [2; 32]);
        let hello = |magic, version, role| HandshakeMsg::Hello { magic, version, role, nonce: [0; 32] };
        assert_eq!(
            s.on_hello(hello(*b"HTTP/1.1", PROTOCOL_VERSION, Role::Agent)),
            Err(HandshakeError::BadMagic)
        );
        let err = s.on_hello(hello(MAGIC, PROTOCOL_VERSION + 1, Role::Agent)).unwrap_err();
        assert!(matches!(err, HandshakeError::VersionMismatch { .. }));
        assert_eq!(
            err.reply(),
            Some(HandshakeMsg::Reject { reason: RejectReason::Version { supported: PROTOCOL_VERSION } })
        );
        let err = s.on_hello(hello(MAGIC, PROTOCOL_VERSION, Role::Orchestrator)).unwrap_err();
        assert_eq!(err.reply(), Some(HandshakeMsg::Reject { reason: RejectReason::Role }));
        // A proof before any hello is out of order.
        assert_eq!(s.on_proof(HandshakeMsg::Proof { proof: [0; 32] }, 1), Err(HandshakeError::Unexpected));
    }

    #[test]
    fn client_reports_a_version_mismatch_from_the_server() {
        let mut c = ClientHandshake::new(b"k", [1; 32]);
        let err = c
            .on_challenge(HandshakeMsg::Reject { reason: RejectReason::Version { supported: 9 } })
            .unwrap_err();
        assert_eq!(err, HandshakeError::Rejected(RejectReason::Version { supported: 9 }));
        let err = c.on_challenge(HandshakeMsg::Challenge { version: 9, nonce: [0; 32], proof: [0; 32] });
        assert!(matches!(err, Err(HandshakeError::VersionMismatch { theirs: 9, .. })));
    }

    #[test]
    fn accept_without_a_verified_challenge_is_unexpected() {
        let mut c = ClientHandshake::new(b"k", [1; 32]);
        assert_eq!(c.on_outcome(HandshakeMsg::Accept { session: 1 }), Err(HandshakeError::Unexpected));
    }

    #[test]
    fn handshake_messages_fit_the_pre_auth_frame_cap() {
        let c = ClientHandshake::new(b"k", [0xff; 32]);
        let msgs = [
            c.hello(),
            HandshakeMsg::Challenge { version: u32::MAX, nonce: [0xff; 32], proof: [0xff; 32] },
            HandshakeMsg::Proof { proof: [0xff; 32] },
            HandshakeMsg::Accept { session: u64::MAX },
        ];
        for m in msgs {
            let bytes = crate::frame::encode(&m, b"", crate::HANDSHAKE_MAX_FRAME).unwrap();
            assert!(bytes.len() <= crate::HANDSHAKE_MAX_FRAME);
        }
    }
}
