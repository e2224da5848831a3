//! What an agent serves other agents: the large functions it holds, and
//! those it is fetching itself, piece by piece, so that it passes each
//! piece on as it arrives (a chain of agents then moves a function in about
//! the time of one link, not one link after another).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ids::FnId;

/// A function travels between agents in pieces of this size (the last may
/// be shorter), each a frame: a piece is passed on once it is whole.
pub(crate) const PIECE: usize = 4 << 20;

/// One function on the shelf.
#[derive(Clone)]
pub(crate) enum Held {
    Whole(Bytes),
    Coming(Arc<Coming>),
}

/// A function this agent is still fetching: the pieces it has, in order.
pub(crate) struct Coming {
    pub(crate) total: usize,
    pieces: Mutex<(Vec<Bytes>, bool)>,
    grew: Notify,
}

impl Coming {
    fn lock(&self) -> MutexGuard<'_, (Vec<Bytes>, bool)> {
        self.pieces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next piece arrived.
    pub(crate) fn push(&self, piece: Bytes) {
        self.lock().0.push(piece);
        self.grew.notify_waiters();
    }

    /// The fetch failed: no more pieces come.
    pub(crate) fn fail(&self) {
        self.lock().1 = true;
        self.grew.notify_waiters();
    }

    /// The piece that starts at byte `at`, once it is here; None if the
    /// fetch failed first.
    pub(crate) async fn piece_at(&self, at: usize) -> Option<Bytes> {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            {
                let guard = self.lock();
                if let Some(p) = guard.0.get(at / PIECE) {
                    return Some(p.clone());
                }
                if guard.1 {
                    return None;
                }
            }
            grew.await;
        }
    }
}

#[derive(Default)]
pub(crate) struct Shelf {
    held: Mutex<HashMap<FnId, Held>>,
    arrived: Notify,
    /// Its session ended: nothing more comes, and requests end now.
    closed: std::sync::atomic::AtomicBool,
}

impl Shelf {
    fn lock(&self) -> MutexGuard<'_, HashMap<FnId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The whole function is here.
    pub(crate) fn put(&self, fn_id: FnId, bytes: Bytes) {
        self.lock().insert(fn_id, Held::Whole(bytes));
        self.arrived.notify_waiters();
    }

    /// It is arriving: its pieces go into the returned [`Coming`], the one
    /// already on the shelf if it is there.
    pub(crate) fn coming(&self, fn_id: FnId, total: usize) -> Arc<Coming> {
        let mut held = self.lock();
        if let Some(Held::Coming(c)) = held.get(&fn_id) {
            return c.clone();
        }
        let coming = Arc::new(Coming { total, pieces: Mutex::default(), grew: Notify::new() });
        held.entry(fn_id).or_insert_with(|| Held::Coming(coming.clone()));
        drop(held);
        self.arrived.notify_waiters();
        coming
    }

    /// The fetch of `coming` failed: take it off (it may come whole later).
    pub(crate) fn failed(&self, fn_id: FnId, coming: &Arc<Coming>) {
        coming.fail();
        let mut held = self.lock();
        if matches!(held.get(&fn_id), Some(Held::Coming(c)) if Arc::ptr_eq(c, coming)) {
            held.remove(&fn_id);
        }
    }

    pub(crate) fn remove(&self, fn_id: FnId) {
        self.lock().remove(&fn_id);
    }

    /// The session ended: what is still coming never will, and requests
    /// waiting for a function end (their agents then get it elsewhere).
    pub(crate) fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for held in self.lock().drain().map(|(_, h)| h) {
            if let Held::Coming(c) = held {
                c.fail();
            }
        }
        self.arrived.notify_waiters();
    }

    pub(crate) fn get(&self, fn_id: FnId) -> Option<Held> {
        self.lock().get(&fn_id).cloned()
    }

    /// `fn_id` once it is here, whole or coming (the orchestrator may name
    /// this agent before the function reaches it), or None after `limit`.
    pub(crate) async fn wait_for(&self, fn_id: FnId, limit: Duration) -> Option<Held> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            if let Some(held) = self.get(fn_id) {
                return Some(held);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}
