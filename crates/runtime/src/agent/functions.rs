//! The functions a session holds, and those still on their way from another
//! agent (see `peers.rs`); tasks that call one of those wait beside the
//! queue until it is here.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::function_mem::{self, Assembly};

use super::session::Queued;
use crate::ids::FnId;

#[derive(Default)]
pub(crate) struct Functions {
    /// Each function (or need) and the needs it names.
    held: HashMap<FnId, (Bytes, Vec<FnId>)>,
    /// Functions another agent is to send, with the needs each names.
    coming: HashMap<FnId, Vec<FnId>>,
    /// Tasks that call a function still coming (or one that needs one), in
    /// the order they came.
    waiting: VecDeque<Queued>,
    /// Functions the orchestrator sends in pieces: what has come.
    assembling: HashMap<FnId, Assembly>,
}

impl Functions {
    pub(crate) fn get(&self, fn_id: &FnId) -> Option<&(Bytes, Vec<FnId>)> {
        self.held.get(fn_id)
    }

    /// The function is here: the tasks that waited only for it are returned,
    /// in order, for the queue.
    pub(crate) fn arrived(&mut self, fn_id: FnId, bytes: Bytes, needs: Vec<FnId>) -> Vec<Queued> {
        self.coming.remove(&fn_id);
        self.held.insert(fn_id, (bytes, needs));
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let (ready, still): (VecDeque<Queued>, VecDeque<Queued>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|q| !self.is_coming(q.fn_id));
        self.waiting = still;
        ready.into()
    }

    /// Another agent is to send it; hold the tasks that call it till then.
    pub(crate) fn expect(&mut self, fn_id: FnId, needs: Vec<FnId>) {
        if !self.held.contains_key(&fn_id) {
            self.coming.insert(fn_id, needs);
        }
    }

    /// The needs a function still coming names; None if it is not coming
    /// (it was forgotten meanwhile, or came from the orchestrator).
    pub(crate) fn coming_needs(&self, fn_id: FnId) -> Option<Vec<FnId>> {
        self.coming.get(&fn_id).cloned()
    }

    /// Whether `fn_id`, or something it needs, is still on its way.
    pub(crate) fn is_coming(&self, fn_id: FnId) -> bool {
        self.coming.contains_key(&fn_id)
            || self
                .held
                .get(&fn_id)
                .is_some_and(|(_, needs)| needs.iter().any(|n| self.coming.contains_key(n)))
    }

    /// Keep `q` aside if its function is still coming; else hand it back.
    /// On every task's path: nothing to look up while nothing is coming.
    pub(crate) fn hold_if_coming(&mut self, q: Queued) -> Option<Queued> {
        if !self.coming.is_empty() && self.is_coming(q.fn_id) {
            self.waiting.push_back(q);
            return None;
        }
        Some(q)
    }

    pub(crate) fn forget(&mut self, fn_id: FnId) {
        self.held.remove(&fn_id);
        self.coming.remove(&fn_id);
        self.assembling.remove(&fn_id);
    }

    /// The next piece of a function the orchestrator sends in pieces; the
    /// whole function once this was the last, or why the pieces are wrong.
    pub(crate) fn piece(
        &mut self,
        fn_id: FnId,
        needs: Vec<FnId>,
        total: usize,
        piece: &[u8],
    ) -> Result<Option<Bytes>, String> {
        if !self.assembling.contains_key(&fn_id) {
            self.expect(fn_id, needs);
            self.assembling.insert(fn_id, Assembly::new(total));
        }
        let whole = self.assembling.get_mut(&fn_id).expect("inserted");
        if !whole.push(piece, total) {
            return Err(format!("function {:x} came in pieces of more than its {total} bytes", fn_id.0));
        }
        if whole.len() < total {
            return Ok(None);
        }
        let (bytes, memfd) = self.assembling.remove(&fn_id).expect("assembling").finish();
        function_mem::hold(fn_id.0, memfd);
        Ok(Some(bytes))
    }

    /// Tasks waiting for a function.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Drop the waiting tasks `drop` picks.
    pub(crate) fn cancel(&mut self, drop: impl Fn(&Queued) -> bool) {
        self.waiting.retain(|q| !drop(q));
    }
}
