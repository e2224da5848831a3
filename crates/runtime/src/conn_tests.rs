//! Frames and sealed records through the reader and writer.

use super::*;
use distripool_protocol::FromAgent;

fn keys() -> (Sealer, Opener) {
    let (c, s) = ([1u8; 32], [2u8; 32]);
    (SessionKeys::for_agent(b"k", &c, &s, b"").send, SessionKeys::for_orchestrator(b"k", &c, &s, b"").recv)
}

/// A sealed writer and the reader at the other end of a 4 MiB pipe.
fn sealed_pipe() -> (FrameWriter<tokio::io::DuplexStream>, FrameReader<tokio::io::DuplexStream>) {
    let (sealer, opener) = keys();
    let (a, b) = tokio::io::duplex(1 << 22);
    (
        FrameWriter::new(a, 1 << 24).with_sealer(Some(sealer)),
        FrameReader::new(b, 1 << 24).with_opener(Some(opener)),
    )
}

#[tokio::test]
async fn look_ahead_sees_whole_frames_only() {
    let (mut w, mut r) = sealed_pipe();
    // A small frame, then the first records of a large one, all flushed:
    // after the small frame, nothing whole is at hand.
    w.write(&FromAgent::Pong { seq: 1 }, b"").await.unwrap();
    w.flush().await.unwrap();
    let big = vec![5u8; 3 * RECORD_MAX];
    w.push_sealed(
        &frame::encode_prefix(&FromAgent::Result { task: 1, attempt: 1, micros: 0 }, big.len(), 1 << 24)
            .unwrap(),
    )
    .await
    .unwrap();
    w.push_sealed(&big[..2 * RECORD_MAX]).await.unwrap();
    w.flush().await.unwrap();
    let first = r.read_frame().await.unwrap().unwrap();
    assert_eq!(first.message::<FromAgent>().unwrap(), FromAgent::Pong { seq: 1 });
    assert!(!r.has_buffered_frame(), "half a frame is not a frame");
    w.push_sealed(&big[2 * RECORD_MAX..]).await.unwrap();
    w.flush().await.unwrap();
    let second = r.read_frame().await.unwrap().unwrap();
    assert_eq!(second.payload.len(), big.len());
}

#[tokio::test]
async fn a_forged_record_seen_while_looking_ahead_fails_the_next_read() {
    let (mut sealer, opener) = keys();
    let (mut a, b) = tokio::io::duplex(1 << 20);
    let mut r = FrameReader::new(b, 1 << 20).with_opener(Some(opener));
    let mut record = vec![0u8; RECORD_PREFIX];
    record.extend_from_slice(&frame::encode(&FromAgent::Pong { seq: 1 }, b"", 1 << 20).unwrap());
    sealer.seal_record(&mut record).unwrap();
    let mut forged = record.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    a.write_all(&record).await.unwrap();
    a.write_all(&forged).await.unwrap();
    r.read_frame().await.unwrap().unwrap();
    // The second record fails to open; look-ahead must report it, not hide it.
    tokio::task::yield_now().await;
    assert!(r.has_buffered_frame());
    assert!(matches!(r.read_frame().await, Err(Error::Cipher(_))));
}

#[tokio::test]
async fn a_stream_of_small_frames_reuses_the_front_of_the_read_buffers() {
    // Heartbeats, one at a time, for as long as it takes to walk through the
    // buffers twice over: where they are written must not walk, or every
    // connection comes to keep all of its buffers' pages resident.
    let (sealer, opener) = keys();
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut w = FrameWriter::new(a, 1 << 20).with_sealer(Some(sealer));
    let mut r = FrameReader::new(b, 1 << 20).with_opener(Some(opener));
    let (mut buf_at, mut raw_at) = (Vec::new(), Vec::new());
    for seq in 0..(2 * RAW_BUFFER / 32) as u64 {
        w.write(&FromAgent::Pong { seq }, b"").await.unwrap();
        w.flush().await.unwrap();
        let f = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.message::<FromAgent>().unwrap(), FromAgent::Pong { seq });
        buf_at.push(r.buf.as_ptr() as usize);
        raw_at.push(r.raw.as_ptr() as usize);
    }
    let span = |at: &[usize]| at.iter().max().unwrap() - at.iter().min().unwrap();
    assert!(span(&raw_at) < 4096, "sealed records walked {} bytes into their buffer", span(&raw_at));
    assert!(span(&buf_at) < 4096, "frames walked {} bytes into their buffer", span(&buf_at));
}

#[tokio::test]
async fn a_large_frame_reuses_the_memory_the_last_one_freed() {
    // A session reads on while it still holds the last frame (passing it to
    // an executor); the next large frame must land in the memory that frame
    // leaves, not in fresh pages. (Sealed: a frame's length is authenticated,
    // so its room is made at once; a clear frame's buffer grows as it
    // arrives.)
    let (mut w, mut r) = sealed_pipe();
    let big = vec![9u8; 1 << 20];
    let msg = FromAgent::Result { task: 1, attempt: 1, micros: 0 };
    w.write(&msg, &big).await.unwrap();
    w.flush().await.unwrap();
    let first = r.read_frame().await.unwrap().unwrap();
    let at = first.payload.as_ptr() as usize;
    let next = tokio::time::timeout(Duration::ZERO, r.read_frame()).await;
    assert!(next.is_err(), "nothing more was sent");
    drop(first);
    w.write(&msg, &big).await.unwrap();
    w.flush().await.unwrap();
    let second = r.read_frame().await.unwrap().unwrap();
    let now = second.payload.as_ptr() as usize;
    assert_eq!(second.payload.len(), big.len());
    assert!(now.abs_diff(at) < 4096, "the second frame is at {now:#x}, the first was at {at:#x}");
}

#[tokio::test]
async fn a_sealed_writer_holds_little_until_it_has_much_to_send() {
    let (mut w, mut r) = sealed_pipe();
    for seq in 0..100 {
        w.write(&FromAgent::Pong { seq }, b"").await.unwrap();
        w.flush().await.unwrap();
    }
    // Heartbeats alone: the record buffer keeps its small start.
    assert!(w.record.capacity() <= RECORD_START, "{} bytes held", w.record.capacity());
    let big = vec![3u8; 3 * RECORD_MAX + 5];
    w.write(&FromAgent::Result { task: 1, attempt: 1, micros: 0 }, &big).await.unwrap();
    w.flush().await.unwrap();
    // Then one whole record's room, not a doubling past it.
    assert!((RECORD_FULL..2 * RECORD_FULL).contains(&w.record.capacity()), "{}", w.record.capacity());
    for seq in 0..100 {
        let f = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.message::<FromAgent>().unwrap(), FromAgent::Pong { seq });
    }
    let f = r.read_frame().await.unwrap().unwrap();
    assert_eq!(&f.payload[..], &big[..]);
}

#[tokio::test]
async fn a_large_payload_sealed_on_several_threads_arrives_exact_between_small_frames() {
    let (mut w, mut r) = sealed_pipe();
    let big: Vec<u8> = (0..9 * RECORD_MAX + 777).map(|i| (i % 253) as u8).collect();
    let parts = [bytes::Bytes::from_static(b"head"), bytes::Bytes::from(big.clone())];
    let result = FromAgent::Result { task: 3, attempt: 1, micros: 0 };
    let sent = result.clone();
    // More than the pipe holds: the reader takes it in as it is written.
    let writer = tokio::spawn(async move {
        w.write(&FromAgent::Pong { seq: 1 }, b"").await?;
        w.write_parts(&sent, &parts).await?;
        w.write(&FromAgent::Pong { seq: 2 }, b"").await?;
        w.flush().await?;
        Ok::<_, Error>(w)
    });
    let first = r.read_frame().await.unwrap().unwrap();
    assert_eq!(first.message::<FromAgent>().unwrap(), FromAgent::Pong { seq: 1 });
    let second = r.read_frame().await.unwrap().unwrap();
    assert_eq!(second.message::<FromAgent>().unwrap(), result);
    assert_eq!(&second.payload[..4], b"head");
    assert!(second.payload[4..] == big[..]);
    let third = r.read_frame().await.unwrap().unwrap();
    assert_eq!(third.message::<FromAgent>().unwrap(), FromAgent::Pong { seq: 2 });
    writer.await.unwrap().unwrap();
}
