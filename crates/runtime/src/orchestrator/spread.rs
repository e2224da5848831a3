//! Which agent each agent gets a large function from. The orchestrator
//! sends one itself to the first agent that needs it; every later one
//! fetches it from an agent that holds it (see `agent/peers.rs`): a chain,
//! each holder serving one fetch at a time and, while another holder has
//! served none, none again, so that every link carries the function once
//! each way. An agent that finds no holder free waits for one (a holder
//! serves a second time only when nothing else would free one); one whose
//! fetch fails gets the function from the orchestrator, and the holder it
//! tried is not named again.

use std::collections::VecDeque;

use distripool_scheduler::IdMap;

use crate::agent::SPREAD_AT_LEAST;
use crate::ids::{FnId, WorkerId};

/// How an agent is to get a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// From the orchestrator, in a `Function` frame.
    Direct,
    /// From the agent serving at this address.
    From(String),
    /// Later: the agent holds its tasks until told.
    Wait,
}

#[derive(Default)]
pub(crate) struct Spread {
    /// Where each agent that serves others does.
    serving: IdMap<WorkerId, String>,
    blobs: IdMap<FnId, Holders>,
}

#[derive(Default)]
struct Holders {
    /// Agents that hold it (or are being sent it: they serve it once it is
    /// in) and serve no fetch of it now, newest last, with the fetches
    /// each has served.
    free: Vec<(WorkerId, u32)>,
    /// Each agent fetching it, with the agent it fetches from (and the
    /// fetches that one had served before).
    fetching: IdMap<WorkerId, (WorkerId, u32)>,
    /// Agents waiting for a holder to be free, in order.
    waiting: VecDeque<WorkerId>,
}

impl Holders {
    fn holds_any(&self) -> bool {
        !self.free.is_empty() || !self.fetching.is_empty()
    }

    /// The holder to fetch from now: the newest that has served none; one
    /// that has, only when no fetch under way could free another.
    fn take_source(&mut self) -> Option<(WorkerId, u32)> {
        let at = match self.free.iter().rposition(|&(_, served)| served == 0) {
            Some(at) => at,
            None if self.fetching.is_empty() && !self.free.is_empty() => self.free.len() - 1,
            None => return None,
        };
        Some(self.free.remove(at))
    }
}

impl Spread {
    /// `worker` serves other agents at `addr`.
    pub(crate) fn serves(&mut self, worker: WorkerId, addr: String) {
        self.serving.insert(worker, addr);
    }

    /// How `worker` gets `fn_id`, `len` bytes long, which it needs now.
    pub(crate) fn route(&mut self, fn_id: FnId, len: usize, worker: WorkerId) -> Route {
        if len < SPREAD_AT_LEAST {
            return Route::Direct;
        }
        let blob = self.blobs.entry(fn_id).or_default();
        if let Some(source) = blob.take_source() {
            let addr = self.serving[&source.0].clone();
            blob.fetching.insert(worker, source);
            return Route::From(addr);
        }
        if blob.holds_any() {
            blob.waiting.push_back(worker);
            return Route::Wait;
        }
        if self.serving.contains_key(&worker) {
            blob.free.push((worker, 0));
        }
        Route::Direct
    }

    /// `worker` fetched `fn_id` and serves it now. Returns the agents that
    /// may fetch it now, and from where.
    pub(crate) fn fetched(&mut self, fn_id: FnId, worker: WorkerId) -> Vec<(WorkerId, Route)> {
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return Vec::new();
        };
        if let Some((source, served)) = blob.fetching.remove(&worker) {
            if self.serving.contains_key(&source) {
                blob.free.insert(0, (source, served + 1));
            }
        }
        if self.serving.contains_key(&worker) {
            blob.free.push((worker, 0));
        }
        self.assign(fn_id)
    }

    /// `worker` could not fetch `fn_id`; the orchestrator sends it. The
    /// agent it tried is named no more, for any function.
    pub(crate) fn not_fetched(&mut self, fn_id: FnId, worker: WorkerId) -> Vec<(WorkerId, Route)> {
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return Vec::new();
        };
        if let Some((source, _)) = blob.fetching.remove(&worker) {
            self.stop_serving(source);
        }
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return Vec::new();
        };
        if self.serving.contains_key(&worker) {
            blob.free.push((worker, 0));
        }
        self.assign(fn_id)
    }

    /// `worker` is gone.
    pub(crate) fn left(&mut self, worker: WorkerId) -> Vec<(FnId, WorkerId, Route)> {
        self.stop_serving(worker);
        let ids: Vec<FnId> = self.blobs.keys().copied().collect();
        let mut moves = Vec::new();
        for fn_id in ids {
            let blob = self.blobs.get_mut(&fn_id).expect("listed");
            blob.waiting.retain(|w| *w != worker);
            if let Some((source, served)) = blob.fetching.remove(&worker) {
                if self.serving.contains_key(&source) {
                    blob.free.insert(0, (source, served));
                }
            }
            // Fetching from it fails on its own, and is reported.
            moves.extend(self.assign(fn_id).into_iter().map(|(w, r)| (fn_id, w, r)));
        }
        moves
    }

    /// `fn_id` is evicted everywhere.
    pub(crate) fn forget(&mut self, fn_id: FnId) {
        self.blobs.remove(&fn_id);
    }

    /// Name nothing served by `worker` again; what waited on it is
    /// reassigned by the caller.
    fn stop_serving(&mut self, worker: WorkerId) {
        self.serving.remove(&worker);
        for blob in self.blobs.values_mut() {
            blob.free.retain(|&(w, _)| w != worker);
        }
    }

    /// Pair waiting agents with free holders; with no holder left at all,
    /// the first waiting agent gets it from the orchestrator.
    fn assign(&mut self, fn_id: FnId) -> Vec<(WorkerId, Route)> {
        let mut out = Vec::new();
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return out;
        };
        while !blob.waiting.is_empty() {
            if let Some(source) = blob.take_source() {
                let worker = blob.waiting.pop_front().expect("not empty");
                let addr = self.serving[&source.0].clone();
                blob.fetching.insert(worker, source);
                out.push((worker, Route::From(addr)));
            } else if !blob.holds_any() {
                let worker = blob.waiting.pop_front().expect("not empty");
                if self.serving.contains_key(&worker) {
                    blob.free.push((worker, 0));
                }
                out.push((worker, Route::Direct));
            } else {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "spread_tests.rs"]
mod tests;
