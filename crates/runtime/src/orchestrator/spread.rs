//! Which agent each agent gets a large function from. The orchestrator
//! sends one itself to the first agent that needs it; every later one
//! fetches it from an agent that holds it or is fetching it (see
//! `agent/peers.rs`, which passes pieces on as they arrive): a chain, each
//! holder serving one fetch at a time and, while another holder has served
//! none, none again, so that every link carries the function once each
//! way. An agent that finds no holder free waits for one (a holder serves a
//! second time only when nothing else would free one); one whose fetch
//! fails gets the function from the orchestrator, and the holder it tried
//! is not named again.

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
    /// Agents on the orchestrator's machine (they joined over loopback, or
    /// in-process): only they may fetch from an agent that serves on a
    /// loopback address.
    local: distripool_scheduler::IdSet<WorkerId>,
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
    /// Whether a holder the fetching agent can reach has it, or is busy
    /// serving it.
    fn holds_any(&self, reaches: impl Fn(WorkerId) -> bool) -> bool {
        self.free.iter().any(|&(w, _)| reaches(w)) || self.fetching.values().any(|&(w, _)| reaches(w))
    }

    /// The holder to fetch from now: the newest that has served none; one
    /// that has, only when no fetch under way could free another.
    /// Only holders `reaches` says the fetching agent can reach count.
    fn take_source(&mut self, reaches: impl Fn(WorkerId) -> bool) -> Option<(WorkerId, u32)> {
        let at = match self.free.iter().rposition(|&(w, served)| served == 0 && reaches(w)) {
            Some(at) => at,
            None if self.fetching.is_empty() => self.free.iter().rposition(|&(w, _)| reaches(w))?,
            None => return None,
        };
        Some(self.free.remove(at))
    }

    /// `worker` fetches it from `source`, and passes the pieces on as they
    /// come: it is a holder at once.
    fn fetch(
        &mut self,
        worker: WorkerId,
        source: (WorkerId, u32),
        serving: &IdMap<WorkerId, String>,
    ) -> Route {
        let addr = serving[&source.0].clone();
        self.fetching.insert(worker, source);
        if serving.contains_key(&worker) {
            self.free.push((worker, 0));
        }
        Route::From(addr)
    }
}

impl Spread {
    /// `worker` serves other agents at `addr`.
    /// `worker` joined from `peer` (`local` for the in-process agent).
    pub(crate) fn joined(&mut self, worker: WorkerId, peer: &str) {
        if peer == "local" || is_loopback(peer) {
            self.local.insert(worker);
        }
    }

    pub(crate) fn serves(&mut self, worker: WorkerId, addr: String) {
        self.serving.insert(worker, addr);
    }

    /// Whether `worker` serves other agents (it is then sent a large
    /// function in pieces, to pass each on as it arrives).
    pub(crate) fn serves_others(&self, worker: WorkerId) -> bool {
        self.serving.contains_key(&worker)
    }

    /// How `worker` gets `fn_id`, `len` bytes long, which it needs now.
    pub(crate) fn route(&mut self, fn_id: FnId, len: usize, worker: WorkerId) -> Route {
        if len < SPREAD_AT_LEAST {
            return Route::Direct;
        }
        let blob = self.blobs.entry(fn_id).or_default();
        let reaches = reach(&self.serving, &self.local, worker);
        if let Some(source) = blob.take_source(&reaches) {
            return blob.fetch(worker, source, &self.serving);
        }
        if blob.holds_any(&reaches) {
            blob.waiting.push_back(worker);
            return Route::Wait;
        }
        if self.serving.contains_key(&worker) {
            blob.free.push((worker, 0));
        }
        Route::Direct
    }

    /// `worker` fetched `fn_id`: the agent it fetched from is free again.
    /// Returns the agents that may fetch it now, and from where.
    pub(crate) fn fetched(&mut self, fn_id: FnId, worker: WorkerId) -> Vec<(WorkerId, Route)> {
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return Vec::new();
        };
        if let Some((source, served)) = blob.fetching.remove(&worker) {
            if self.serving.contains_key(&source) {
                blob.free.insert(0, (source, served + 1));
            }
        }
        self.assign(fn_id)
    }

    /// `worker` could not fetch `fn_id`; the orchestrator sends it (and
    /// `worker` goes on serving it, from the orchestrator's copy). The agent
    /// it tried is named no more, for any function.
    pub(crate) fn not_fetched(&mut self, fn_id: FnId, worker: WorkerId) -> Vec<(WorkerId, Route)> {
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return Vec::new();
        };
        if let Some((source, _)) = blob.fetching.remove(&worker) {
            self.stop_serving(source);
        }
        self.assign(fn_id)
    }

    /// `worker` is gone.
    pub(crate) fn left(&mut self, worker: WorkerId) -> Vec<(FnId, WorkerId, Route)> {
        self.stop_serving(worker);
        self.local.remove(&worker);
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

    /// Pair waiting agents with free holders they can reach; one that can
    /// reach no holder any more gets it from the orchestrator.
    fn assign(&mut self, fn_id: FnId) -> Vec<(WorkerId, Route)> {
        let mut out = Vec::new();
        let Some(blob) = self.blobs.get_mut(&fn_id) else {
            return out;
        };
        for worker in std::mem::take(&mut blob.waiting) {
            let reaches = reach(&self.serving, &self.local, worker);
            if let Some(source) = blob.take_source(&reaches) {
                out.push((worker, blob.fetch(worker, source, &self.serving)));
            } else if !blob.holds_any(&reaches) {
                if self.serving.contains_key(&worker) {
                    blob.free.push((worker, 0));
                }
                out.push((worker, Route::Direct));
            } else {
                blob.waiting.push_back(worker);
            }
        }
        out
    }
}

/// Whether `worker` can reach each holder: one serving on a loopback
/// address only from the same machine.
fn reach<'a>(
    serving: &'a IdMap<WorkerId, String>,
    local: &'a distripool_scheduler::IdSet<WorkerId>,
    worker: WorkerId,
) -> impl Fn(WorkerId) -> bool + 'a {
    let here = local.contains(&worker);
    move |holder| here || serving.get(&holder).is_some_and(|addr| !is_loopback(addr))
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
#[path = "spread_tests.rs"]
mod tests;
