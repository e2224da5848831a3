//! The distripool wire format, free of I/O.
//!
//! Everything that crosses a socket between an orchestrator and a worker agent
//! is a [frame](frame): a little-endian `u32` length, then a small serde header
//! (a [`ToAgent`] or [`FromAgent`] message) and an opaque payload. Payloads are
//! pickles produced and consumed by Python; Rust never decodes them.
//!
//! Before any message is exchanged, both peers run the [handshake]: versions
//! and roles are checked first, then each side proves that it holds the shared
//! key with an HMAC over fresh nonces. Nothing else is accepted before that.
//! Every frame after it is encrypted and authenticated with keys derived for
//! that session ([`cipher`]).

pub mod cipher;
pub mod frame;
pub mod handshake;
pub mod message;

pub use cipher::{CipherError, Opener, Sealer, SessionKeys};
pub use frame::{Frame, FrameDecoder, FrameError};
pub use handshake::{Binding, ClientHandshake, HandshakeError, Role, ServerHandshake};
pub use message::{FromAgent, FromPeer, Labels, ToAgent, ToPeer};

/// Version of the wire protocol. Peers with another version are refused
/// during the handshake, before any key material is used.
pub const PROTOCOL_VERSION: u32 = 9;

/// Largest frame accepted before the peer is authenticated.
pub const HANDSHAKE_MAX_FRAME: usize = 512;

/// Default largest frame accepted from an authenticated peer (1 GiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

/// Largest serde header inside a frame; payload bytes do not count.
pub const MAX_HEADER: usize = 64 * 1024;
