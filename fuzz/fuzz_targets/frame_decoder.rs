//! Arbitrary bytes into the frame decoder, as a byte stream arriving in
//! arbitrary pieces: it must never panic, never return a frame longer than the
//! cap, and split the same bytes the same way whatever the pieces.
#![no_main]

use bytes::BytesMut;
use distripool_protocol::FrameDecoder;
use libfuzzer_sys::fuzz_target;

const CAP: usize = 4096;

fuzz_target!(|input: (u8, Vec<u8>)| {
    let (piece, data) = input;
    let piece = usize::from(piece).max(1);
    let dec = FrameDecoder::new(CAP);

    // All at once.
    let mut whole = BytesMut::from(&data[..]);
    let mut frames_whole = Vec::new();
    while let Ok(Some(f)) = dec.decode(&mut whole) {
        assert!(f.header.len() + f.payload.len() + 4 <= CAP);
        frames_whole.push(f);
    }

    // In pieces.
    let mut buf = BytesMut::new();
    let mut frames_pieces = Vec::new();
    'outer: for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames_pieces.push(f),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    assert_eq!(frames_whole.len(), frames_pieces.len());
    assert_eq!(frames_whole, frames_pieces);
});
