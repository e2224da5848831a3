//! Mutual authentication with a shared key, as two small state machines.
//!
//! ```text
//!  agent (client)                                   orchestrator (server)
//!  Hello{magic, version, role, cluster,
//!        sealed, nonce_c}                ───────►   checks magic, version, role, cluster, sealed
//!                                        ◄───────   Challenge{nonce_s, proof_s}
//!  verifies proof_s                                  proof_s = HMAC(key, "orchestrator"‖B‖nonce_c‖nonce_s)
//!  Proof{proof_c}                        ───────►   verifies proof_c
//!  proof_c = HMAC(key, "agent"‖B‖nonce_c‖nonce_s)
//!                                        ◄───────   Accept{session}
//! ```
//!
//! `B`, the *binding*, is the protocol version, the cluster name and whether
//! frames are sealed, each side computing it from its own settings. Versions,
//! roles, cluster names and sealing are compared before any key material is
//! touched, so a mismatch gives a precise error; and because the proofs and
//! the session keys cover `B`, a peer on the path that rewrites any of them in
//! the `Hello` only breaks the handshake. Each proof is bound to its role and
//! to both fresh nonces, so neither a replayed proof nor one side's proof used
//! as the other's is accepted. Proofs are compared in constant time. The
//! server proves itself first: an agent never sends anything derived from its
//! key to an orchestrator that does not hold the same key.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::PROTOCOL_VERSION;

/// Identifies distripool traffic; anything else is refused at once.
pub const MAGIC: [u8; 8] = *b"DSTRPOOL";

pub type Nonce = [u8; 32];
pub type Tag = [u8; 32];

/// Longest cluster name, in bytes of UTF-8.
pub const MAX_CLUSTER: usize = 64;

/// What both sides must agree on before they trust each other, besides the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Name of the cluster; workers of one cluster never join another's
    /// orchestrator, even when the clusters share a key.
    pub cluster: String,
    /// Whether every frame is sealed with the session keys (off only when
    /// both sides say so, or under TLS, which protects the stream itself).
    pub sealed: bool,
    /// A connection between two agents (one fetching what the other holds),
    /// not an agent's to its orchestrator: the client says [`Role::Peer`],
    /// and the transcript differs, so that neither kind of connection's
    /// proofs or keys serve the other.
    pub peer: bool,
}

impl Binding {
    pub fn new(cluster: impl Into<String>, sealed: bool) -> Self {
        Self { cluster: cluster.into(), sealed, peer: false }
    }

    /// The binding of connections between the agents of this cluster:
    /// always sealed, unless encryption is off altogether (there is no TLS
    /// between agents, so `tls` says whether the stream had been protected).
    pub fn for_peers(&self, tls: bool) -> Self {
        Self { cluster: self.cluster.clone(), sealed: self.sealed || tls, peer: true }
    }

    /// The role the client of such a connection says it has.
    pub fn client_role(&self) -> Role {
        if self.peer {
            Role::Peer
        } else {
            Role::Agent
        }
    }

    /// The bytes that proofs and session keys cover.
    pub fn transcript(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 1 + self.cluster.len() + 1);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.cluster.len() as u8);
        out.extend_from_slice(self.cluster.as_bytes());
        out.push(self.sealed as u8);
        if self.peer {
            out.extend_from_slice(b"peer");
        }
        out
    }
}

impl Default for Binding {
    fn default() -> Self {
        Self::new("default", true)
    }
}

/// Who a peer says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Agent,
    Orchestrator,
    /// An agent fetching something another agent holds.
    Peer,
}

/// Why the other side refused the handshake (sent in the clear; carries no detail
/// an unauthenticated peer could use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    Version {
        supported: u32,
    },
    Role,
    Auth,
    Malformed,
    Cluster,
    Sealing {
        orchestrator_seals: bool,
    },
    /// The agent has no key, and the orchestrator's proof needs one.
    NoKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeMsg {
    Hello { magic: [u8; 8], version: u32, role: Role, cluster: String, sealed: bool, nonce: Nonce },
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
    #[error("the peer speaks as {got:?}, but only an {expected:?} is accepted here")]
    WrongRole { expected: Role, got: Role },
    #[error("the worker belongs to cluster {theirs:?}, this orchestrator serves cluster {ours:?}")]
    WrongCluster { ours: String, theirs: String },
    #[error("the orchestrator serves another cluster than ours ({ours:?}); start the worker with the orchestrator's --cluster")]
    RejectedCluster { ours: String },
    #[error("encryption settings differ: the worker {}, the orchestrator {}; both sides must agree", seals(*agent), seals(*orchestrator))]
    SealingMismatch { agent: bool, orchestrator: bool },
    #[error("the peer could not prove it holds our authentication key (the keys differ)")]
    PeerFailedAuth,
    #[error("the peer refused our authentication key (the keys differ)")]
    RejectedAuth,
    #[error(
        "this worker has no key set, and the orchestrator requires one: give it the orchestrator's key \
         with --authkey-file, DISTRIPOOL_AUTHKEY or DISTRIPOOL_AUTHKEY_FILE"
    )]
    NoKey,
    #[error("the orchestrator has no key set, and this worker has one: start both with the same key")]
    PeerHasNoKey,
    #[error("the worker has no key set; give it this orchestrator's key")]
    RejectedNoKey,
    #[error("the peer refused the handshake: {0:?}")]
    Rejected(RejectReason),
    #[error("unexpected handshake message")]
    Unexpected,
}

fn seals(on: bool) -> &'static str {
    if on {
        "seals every frame"
    } else {
        "has encryption turned off"
    }
}

impl HandshakeError {
    /// The message to send the peer before closing, if any.
    pub fn reply(&self) -> Option<HandshakeMsg> {
        let reason = match self {
            HandshakeError::VersionMismatch { .. } => RejectReason::Version { supported: PROTOCOL_VERSION },
            HandshakeError::WrongRole { .. } => RejectReason::Role,
            HandshakeError::WrongCluster { .. } => RejectReason::Cluster,
            HandshakeError::SealingMismatch { orchestrator, .. } => {
                RejectReason::Sealing { orchestrator_seals: *orchestrator }
            }
            HandshakeError::PeerFailedAuth | HandshakeError::PeerHasNoKey => RejectReason::Auth,
            HandshakeError::NoKey => RejectReason::NoKey,
            HandshakeError::BadMagic | HandshakeError::Unexpected => RejectReason::Malformed,
            HandshakeError::RejectedAuth
            | HandshakeError::RejectedNoKey
            | HandshakeError::Rejected(_)
            | HandshakeError::RejectedCluster { .. } => return None,
        };
        Some(HandshakeMsg::Reject { reason })
    }

    /// True when the shared keys differ, as opposed to a protocol mismatch.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            HandshakeError::PeerFailedAuth
                | HandshakeError::RejectedAuth
                | HandshakeError::NoKey
                | HandshakeError::PeerHasNoKey
                | HandshakeError::RejectedNoKey
        )
    }
}

fn rejected(reason: RejectReason, ours: &Binding) -> HandshakeError {
    match reason {
        RejectReason::Auth => HandshakeError::RejectedAuth,
        RejectReason::NoKey => HandshakeError::RejectedNoKey,
        RejectReason::Cluster => HandshakeError::RejectedCluster { ours: ours.cluster.clone() },
        RejectReason::Sealing { orchestrator_seals } => {
            HandshakeError::SealingMismatch { agent: ours.sealed, orchestrator: orchestrator_seals }
        }
        RejectReason::Version { supported } => {
            HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: supported }
        }
        other => HandshakeError::Rejected(other),
    }
}

fn proof(key: &[u8], role: Role, binding: &[u8], client: &Nonce, server: &Nonce) -> Tag {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    // Within a connection between agents, the server proves itself as an
    // orchestrator does and the client as an agent; the binding's transcript
    // tells the two kinds of connection apart.
    mac.update(match role {
        Role::Agent | Role::Peer => b"distripool agent proof\0",
        Role::Orchestrator => b"distripool orchestrator proof\0",
    });
    mac.update(binding);
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
    binding: Binding,
    transcript: Vec<u8>,
    nonce: Nonce,
    server_nonce: Option<Nonce>,
}

impl ClientHandshake {
    pub fn new(key: &[u8], binding: Binding, nonce: Nonce) -> Self {
        let transcript = binding.transcript();
        Self { key: key.to_vec(), binding, transcript, nonce, server_nonce: None }
    }

    /// First message to send.
    pub fn hello(&self) -> HandshakeMsg {
        HandshakeMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role: self.binding.client_role(),
            cluster: self.binding.cluster.clone(),
            sealed: self.binding.sealed,
            nonce: self.nonce,
        }
    }

    /// Check the server's proof and answer with ours.
    pub fn on_challenge(&mut self, msg: HandshakeMsg) -> Result<HandshakeMsg, HandshakeError> {
        match msg {
            HandshakeMsg::Challenge { version, nonce, proof: theirs } => {
                if version != PROTOCOL_VERSION {
                    return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
                }
                let expected = proof(&self.key, Role::Orchestrator, &self.transcript, &self.nonce, &nonce);
                if !verify(&expected, &theirs) {
                    // Say which side lacks a key, when one does: that is
                    // the usual mistake, and "the keys differ" hides it.
                    if self.key.is_empty() {
                        return Err(HandshakeError::NoKey);
                    }
                    let keyless = proof(b"", Role::Orchestrator, &self.transcript, &self.nonce, &nonce);
                    if verify(&keyless, &theirs) {
                        return Err(HandshakeError::PeerHasNoKey);
                    }
                    return Err(HandshakeError::PeerFailedAuth);
                }
                self.server_nonce = Some(nonce);
                Ok(HandshakeMsg::Proof {
                    proof: proof(&self.key, Role::Agent, &self.transcript, &self.nonce, &nonce),
                })
            }
            HandshakeMsg::Reject { reason } => Err(rejected(reason, &self.binding)),
            // Another agent (or something posing as one) where an
            // orchestrator should answer.
            HandshakeMsg::Hello { role, .. } => {
                Err(HandshakeError::WrongRole { expected: Role::Orchestrator, got: role })
            }
            _ => Err(HandshakeError::Unexpected),
        }
    }

    /// This session's frame keys; only meaningful once the handshake succeeded.
    pub fn session_keys(&self) -> Option<crate::SessionKeys> {
        let server = self.server_nonce?;
        Some(crate::SessionKeys::for_agent(&self.key, &self.nonce, &server, &self.transcript))
    }

    /// The server's verdict on our proof; the session id on success.
    pub fn on_outcome(&mut self, msg: HandshakeMsg) -> Result<u64, HandshakeError> {
        match (msg, self.server_nonce) {
            (HandshakeMsg::Accept { session }, Some(_)) => Ok(session),
            (HandshakeMsg::Reject { reason }, _) => Err(rejected(reason, &self.binding)),
            _ => Err(HandshakeError::Unexpected),
        }
    }
}

/// The accepting side (an orchestrator).
pub struct ServerHandshake {
    key: Vec<u8>,
    binding: Binding,
    transcript: Vec<u8>,
    nonce: Nonce,
    client_nonce: Option<Nonce>,
}

impl ServerHandshake {
    pub fn new(key: &[u8], binding: Binding, nonce: Nonce) -> Self {
        let transcript = binding.transcript();
        Self { key: key.to_vec(), binding, transcript, nonce, client_nonce: None }
    }

    /// Check the client's hello and answer with our challenge and proof.
    pub fn on_hello(&mut self, msg: HandshakeMsg) -> Result<HandshakeMsg, HandshakeError> {
        let HandshakeMsg::Hello { magic, version, role, cluster, sealed, nonce } = msg else {
            return Err(HandshakeError::Unexpected);
        };
        if magic != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
        }
        if role != self.binding.client_role() {
            return Err(HandshakeError::WrongRole { expected: self.binding.client_role(), got: role });
        }
        if cluster != self.binding.cluster {
            return Err(HandshakeError::WrongCluster { ours: self.binding.cluster.clone(), theirs: cluster });
        }
        if sealed != self.binding.sealed {
            return Err(HandshakeError::SealingMismatch { agent: sealed, orchestrator: self.binding.sealed });
        }
        self.client_nonce = Some(nonce);
        Ok(HandshakeMsg::Challenge {
            version: PROTOCOL_VERSION,
            nonce: self.nonce,
            proof: proof(&self.key, Role::Orchestrator, &self.transcript, &nonce, &self.nonce),
        })
    }

    /// This session's frame keys; only meaningful once the handshake succeeded.
    pub fn session_keys(&self) -> Option<crate::SessionKeys> {
        let client = self.client_nonce?;
        Some(crate::SessionKeys::for_orchestrator(&self.key, &client, &self.nonce, &self.transcript))
    }

    /// Check the client's proof; on success answer `Accept{session}`.
    pub fn on_proof(&mut self, msg: HandshakeMsg, session: u64) -> Result<HandshakeMsg, HandshakeError> {
        let Some(client_nonce) = self.client_nonce else {
            return Err(HandshakeError::Unexpected);
        };
        match msg {
            HandshakeMsg::Proof { proof: theirs } => {
                let expected = proof(&self.key, Role::Agent, &self.transcript, &client_nonce, &self.nonce);
                if verify(&expected, &theirs) {
                    Ok(HandshakeMsg::Accept { session })
                } else {
                    Err(HandshakeError::PeerFailedAuth)
                }
            }
            HandshakeMsg::Reject { reason } => Err(rejected(reason, &self.binding)),
            _ => Err(HandshakeError::Unexpected),
        }
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
