//! Large payloads sealed on several threads at once.
//!
//! A connection's writer seals everything it sends: a copy and a pass of
//! AES-GCM over every byte (one core seals about 6 GiB/s here, into memory
//! already mapped), which a 64 MiB argument would otherwise wait for on one
//! thread before anything else can happen to it. A run of whole records is sealed
//! instead by [`Sealer::seal_records`] on up to [`threads`] threads, in
//! pieces of [`PIECE`] bytes, each into a buffer shared by all connections
//! (a piece is written whole before its buffer goes back).

use std::sync::Mutex;

use distripool_protocol::cipher::RECORD_MAX;

/// Plaintext this large, with no record begun, is sealed in pieces.
pub const AT_LEAST: usize = 1 << 20;
/// Plaintext sealed and written at once: 64 records.
pub const PIECE: usize = 64 * RECORD_MAX;
/// Buffers kept for the next pieces, at most (one per connection writing a
/// large payload at the same moment).
const KEEP: usize = 4;
/// Threads sealing one piece, at most.
const MAX_THREADS: usize = 4;

static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer for a piece's records, holding what the last piece left in it:
/// the sealer overwrites every byte it uses, so nothing is cleared.
pub fn take() -> Vec<u8> {
    IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
}

/// Give a buffer back for the next piece.
pub fn give(buf: Vec<u8>) {
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < KEEP {
        idle.push(buf);
    }
}

/// How many threads seal a piece: the CPUs this process may use, at most 4.
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS))
}
