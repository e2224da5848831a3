//! The one writer loop of every connection: a batch of queued items, one
//! flush, and a heartbeat while the connection is quiet.

use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWrite;

use crate::conn::{FrameWriter, Outgoing};
use crate::Result;

/// Where a batching writer puts what it is sent: items one by one, then one
/// flush per batch.
pub trait Sink<T> {
    fn put(&mut self, item: T) -> impl std::future::Future<Output = Result<()>> + Send;
    fn flush(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
}

impl<W: AsyncWrite + Unpin + Send, M: Serialize + Send + Sync> Sink<Outgoing<M>> for FrameWriter<W> {
    async fn put(&mut self, f: Outgoing<M>) -> Result<()> {
        self.write_parts(&f.msg, f.payload.parts()).await
    }
    async fn flush(&mut self) -> Result<()> {
        FrameWriter::flush(self).await
    }
}

/// The one writer loop of every connection (orchestrator and agent sessions,
/// agent to executor): put what arrives on `rx` into `sink`, in order, until
/// `rx` closes. Everything already queued goes out before one flush (one
/// syscall; on a sealed connection, as few records as the bytes need). With
/// a `heartbeat`, each tick's item shows the peer we are alive, unless we
/// wrote in the last half tick (the peer's silence limit, at least two
/// ticks, counts bytes). `flushed` sees the sink after each flush.
pub async fn write_batches<S, T, B, F>(
    mut sink: S,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<B>,
    mut heartbeat: Option<(Duration, F)>,
    mut flushed: impl FnMut(&mut S),
) -> Result<()>
where
    S: Sink<T>,
    B: IntoIterator<Item = T>,
    F: FnMut() -> T,
{
    let mut tick = heartbeat.as_ref().map(|(every, _)| {
        let mut t = tokio::time::interval(*every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut last_flush: Option<tokio::time::Instant> = None;
    loop {
        let mut first = match (tick.as_mut(), heartbeat.as_mut()) {
            (Some(tick), Some((every, make))) => tokio::select! {
                batch = rx.recv() => match batch {
                    Some(b) => Some(b),
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    if last_flush.is_some_and(|t| t.elapsed() < *every / 2) {
                        continue;
                    }
                    sink.put(make()).await?;
                    None
                }
            },
            // No heartbeat (an executor's socket, the busiest path): no
            // timer to poll beside the queue.
            _ => match rx.recv().await {
                Some(b) => Some(b),
                None => return Ok(()),
            },
        };
        while let Some(batch) = first.take().or_else(|| rx.try_recv().ok()) {
            for item in batch {
                sink.put(item).await?;
            }
        }
        sink.flush().await?;
        last_flush = tick.is_some().then(tokio::time::Instant::now);
        flushed(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{sleep, Instant};

    /// Records when each item was put, and whether it was a heartbeat.
    struct Recorder {
        t0: Instant,
        put: Vec<(Duration, bool)>,
    }

    impl Sink<bool> for &mut Recorder {
        async fn put(&mut self, heartbeat: bool) -> Result<()> {
            self.put.push((self.t0.elapsed(), heartbeat));
            Ok(())
        }
        async fn flush(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_written_stand_in_for_heartbeats_and_a_quiet_connection_beats() {
        let mut rec = Recorder { t0: Instant::now(), put: Vec::new() };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<bool>>();
        let feeder = tokio::spawn(async move {
            // Busy for 3 s (a frame every 300 ms), then quiet for 2.2 s.
            for _ in 0..10 {
                sleep(Duration::from_millis(300)).await;
                tx.send(vec![false]).unwrap();
            }
            sleep(Duration::from_millis(2200)).await;
        });
        let every = Duration::from_secs(1);
        write_batches(&mut rec, &mut rx, Some((every, || true)), |_| {}).await.unwrap();
        feeder.await.unwrap();
        let beats: Vec<u64> =
            rec.put.iter().filter(|(_, beat)| *beat).map(|(at, _)| at.as_millis() as u64).collect();
        // The first tick beats (nothing written yet); the ticks at 1, 2 and
        // 3 s follow a frame by at most 300 ms; those at 4 and 5 s beat.
        assert_eq!(beats, [0, 4000, 5000]);
        assert_eq!(rec.put.len(), 13, "every frame and beat put once: {:?}", rec.put);
        let gaps = rec.put.windows(2).map(|w| w[1].0 - w[0].0);
        assert!(gaps.max().unwrap() <= every * 3 / 2, "a gap longer than 1.5 ticks: {:?}", rec.put);
    }
}
