//! Giving agents the functions their tasks call: small ones in a frame of
//! their own, once per agent; large ones from another agent that holds
//! them, once one does (see `spread.rs`).

use distripool_protocol::ToAgent;

use super::{AgentLink, Core, FnEntry};
use crate::agent::{PIECE, SPREAD_AT_LEAST};
use crate::conn::Outgoing;
use crate::ids::{FnId, WorkerId};
use crate::orchestrator::spread::{Route, Spread};
use distripool_scheduler::IdMap;

impl Core {
    /// Queue for `worker`, which is to run a task of `fn_id` and holds it
    /// not, the function and what it needs first, each once per agent. An
    /// agent that holds a function holds its needs (evicting a need forgets
    /// the functions naming it).
    pub(super) fn give_function(
        dirty: &mut Vec<WorkerId>,
        fns: &IdMap<FnId, FnEntry>,
        spread: &mut Spread,
        worker: WorkerId,
        link: &mut AgentLink,
        fn_id: FnId,
    ) {
        let entry = &fns[&fn_id];
        let pieces = spread.serves_others(worker);
        for &need in &entry.needs {
            if link.fns.insert(need) {
                let route = spread.route(need, fns[&need].bytes.len(), worker);
                for out in Self::blob_frames(need, &fns[&need], route, pieces) {
                    Self::queue(dirty, worker, link, out);
                }
            }
        }
        let route = spread.route(fn_id, entry.bytes.len(), worker);
        for out in Self::blob_frames(fn_id, entry, route, pieces) {
            Self::queue(dirty, worker, link, out);
        }
    }

    /// The frames that give an agent blob `fn_id` by `route`: the blob (in
    /// pieces, to an agent that passes a large one on as it arrives); the
    /// agent to fetch it from; or, to wait, that it comes later.
    fn blob_frames(fn_id: FnId, entry: &FnEntry, route: Route, pieces: bool) -> Vec<Outgoing<ToAgent>> {
        let (fn_id, needs): (u64, Vec<u64>) = (fn_id.0, entry.needs.iter().map(|n| n.0).collect());
        let bytes = &entry.bytes;
        match route {
            Route::Direct if pieces && bytes.len() >= SPREAD_AT_LEAST => {
                let total = bytes.len() as u64;
                (0..bytes.len())
                    .step_by(PIECE)
                    .map(|at| {
                        let msg = ToAgent::Piece { fn_id, needs: needs.clone(), total };
                        Outgoing::with_payload(msg, bytes.slice(at..bytes.len().min(at + PIECE)))
                    })
                    .collect()
            }
            Route::Direct => vec![Outgoing::with_payload(ToAgent::Function { fn_id, needs }, bytes.clone())],
            Route::From(addr) => vec![Outgoing::new(ToAgent::Fetch { fn_id, needs, from: Some(addr) })],
            Route::Wait => vec![Outgoing::new(ToAgent::Fetch { fn_id, needs, from: None })],
        }
    }

    /// Tell `worker`, which waits for blob `fn_id`, where it comes from now.
    pub(super) fn give_blob(&mut self, worker: WorkerId, fn_id: FnId, route: Route) {
        let (Some(link), Some(entry)) = (self.agents.get_mut(&worker), self.fns.get(&fn_id)) else {
            return;
        };
        if link.fns.contains(&fn_id) && route != Route::Wait {
            for out in Self::blob_frames(fn_id, entry, route, self.spread.serves_others(worker)) {
                Self::queue(&mut self.dirty_agents, worker, link, out);
            }
        }
    }
}
