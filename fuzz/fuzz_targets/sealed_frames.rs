//! Arbitrary bytes as a stream of sealed records: opening must never panic,
//! never buffer past the record cap, and never accept anything the other
//! side did not seal. Genuine records may be mixed in (the fuzzer picks
//! where), so the decoder is also driven past valid records into garbage.
#![no_main]

use bytes::BytesMut;
use distripool_protocol::cipher::{RECORD_MAX, RECORD_PREFIX, TAG_LEN};
use distripool_protocol::{Opener, SessionKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<Vec<u8>>, u8)| {
    let (chunks, genuine) = input;
    let (c, s) = ([1u8; 32], [2u8; 32]);
    let mut sender = SessionKeys::for_agent(b"k", &c, &s, b"cluster").send;
    let mut keys = SessionKeys::for_orchestrator(b"k", &c, &s, b"cluster");
    let mut raw = BytesMut::new();
    let mut sealed = 0usize;
    for (i, chunk) in chunks.into_iter().take(16).enumerate() {
        if i < usize::from(genuine % 4) {
            // A genuine record, sealed with the real key.
            let mut r = vec![0u8; RECORD_PREFIX];
            r.extend_from_slice(&chunk[..chunk.len().min(RECORD_MAX)]);
            sender.seal_record(&mut r).unwrap();
            raw.extend_from_slice(&r);
            sealed += 1;
        } else {
            raw.extend_from_slice(&chunk);
        }
        loop {
            match keys.recv.open_record(&mut raw) {
                Ok(Some(_)) => {
                    assert!(sealed > 0, "a forged record was accepted");
                    sealed -= 1;
                }
                Ok(None) => {
                    // Waiting for more: never for more than one record.
                    let want = Opener::missing(&raw).unwrap();
                    assert!(raw.len() + want <= RECORD_PREFIX + RECORD_MAX + TAG_LEN);
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
