//! Arbitrary bytes as sealed frames: opening must never panic, and must never
//! accept anything the other side did not seal.
#![no_main]

use distripool_protocol::SessionKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frames: Vec<Vec<u8>>| {
    let mut keys = SessionKeys::for_orchestrator(b"k", &[1; 32], &[2; 32]);
    for mut f in frames.into_iter().take(16) {
        assert!(keys.recv.open(&mut f).is_err(), "a forged frame was accepted");
    }
});
