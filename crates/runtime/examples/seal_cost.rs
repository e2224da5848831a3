//! What sealing costs: the same frames over the same loopback TCP
//! connection, through the runtime's own `FrameWriter`/`FrameReader`, in the
//! clear and sealed (AES-256-GCM records), measured in one run; and the
//! cipher alone on one core (sealing and opening 64 KiB records).
//!
//! `cargo run --release -p distripool-runtime --example seal_cost`

use std::time::{Duration, Instant};

use distripool_protocol::cipher::{RECORD_MAX, RECORD_PREFIX, TAG_LEN};
use distripool_protocol::{FromAgent, SessionKeys};
use distripool_runtime::conn::{FrameReader, FrameWriter};
use tokio::net::{TcpListener, TcpStream};

const MAX_FRAME: usize = 1 << 30;

async fn run(sealed: bool, frames: usize, payload: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.unwrap(), server.unwrap());
    client.set_nodelay(true).unwrap();
    let (c, s) = ([1u8; 32], [2u8; 32]);
    let (sealer, opener) = if sealed {
        (
            Some(SessionKeys::for_agent(b"bench", &c, &s, b"").send),
            Some(SessionKeys::for_orchestrator(b"bench", &c, &s, b"").recv),
        )
    } else {
        (None, None)
    };
    let body = vec![7u8; payload];
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut w = FrameWriter::new(client, MAX_FRAME).with_sealer(sealer);
        for task in 0..frames as u64 {
            w.write(&FromAgent::Result { task, attempt: 1, micros: 0 }, &body).await.unwrap();
        }
        w.flush().await.unwrap();
    });
    let mut r = FrameReader::new(server, MAX_FRAME).with_opener(opener);
    for _ in 0..frames {
        let f = r.read_frame().await.unwrap().expect("a frame");
        assert_eq!(f.payload.len(), payload);
    }
    writer.await.unwrap();
    t0.elapsed()
}

/// Seal then open `total` bytes in full records on this one thread.
fn cipher_alone(total: usize) -> (f64, f64) {
    let (c, s) = ([1u8; 32], [2u8; 32]);
    let mut send = SessionKeys::for_agent(b"bench", &c, &s, b"").send;
    let mut recv = SessionKeys::for_orchestrator(b"bench", &c, &s, b"").recv;
    let records = total / RECORD_MAX;
    // The records are made (and their pages touched) before the clock
    // starts: only the cipher is timed, as in `open` below.
    let mut wire: Vec<Vec<u8>> = (0..records)
        .map(|_| {
            let mut r = Vec::with_capacity(RECORD_PREFIX + RECORD_MAX + TAG_LEN);
            r.resize(RECORD_PREFIX + RECORD_MAX, 7);
            r
        })
        .collect();
    let t0 = Instant::now();
    for r in &mut wire {
        send.seal_record(r).unwrap();
    }
    let seal = t0.elapsed();
    let t0 = Instant::now();
    for mut r in wire {
        recv.open(&mut r[RECORD_PREFIX..]).unwrap();
    }
    let open = t0.elapsed();
    let mib = (records * RECORD_MAX) as f64 / (1 << 20) as f64;
    (mib / seal.as_secs_f64(), mib / open.as_secs_f64())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cases = [("tiny frames (16 B payload)", 200_000usize, 16usize), ("64 MiB frames", 8, 64 << 20)];
    println!("\ncost of sealing every frame, loopback TCP, median of 3\n");
    println!("| frames | in the clear | sealed | sealed ÷ clear |");
    println!("|---|---:|---:|---:|");
    for (label, n, size) in cases {
        let median = |sealed: bool| {
            let mut t: Vec<Duration> = (0..3).map(|_| rt.block_on(run(sealed, n, size))).collect();
            t.sort();
            t[1]
        };
        let (clear, sealed) = (median(false), median(true));
        let rate = |d: Duration| {
            if size < 1024 {
                format!("{:.2} M frames/s", n as f64 / d.as_secs_f64() / 1e6)
            } else {
                format!("{:.0} MiB/s", (n * size) as f64 / d.as_secs_f64() / (1 << 20) as f64)
            }
        };
        println!(
            "| {label} | {} | {} | {:.2}× |",
            rate(clear),
            rate(sealed),
            clear.as_secs_f64() / sealed.as_secs_f64()
        );
    }
    let (seal, open) = cipher_alone(256 << 20);
    println!("\ncipher alone, one core, 64 KiB records: seal {seal:.0} MiB/s, open {open:.0} MiB/s");
}
