//! Large functions that come in pieces from the orchestrator, or from
//! another agent (see `peers.rs`).

use std::time::Instant;

use bytes::Bytes;
use distripool_protocol::FromAgent;

use super::{AgentComm, Session, SessionEnd, Step};
use crate::conn::Outgoing;
use crate::ids::FnId;

impl Session {
    /// A fetch from another agent ended: with the function, which is served
    /// in turn, or with why not (the orchestrator then sends it itself).
    pub(crate) fn on_fetched(
        &mut self,
        fn_id: FnId,
        outcome: Result<Bytes, String>,
        now: Instant,
        comm: &mut impl AgentComm,
    ) -> Step {
        // Forgotten meanwhile, or sent by the orchestrator after all.
        let Some(needs) = self.fns.coming_needs(fn_id) else {
            return Ok(());
        };
        match outcome {
            Ok(bytes) => {
                comm.shelve(fn_id, Some(bytes.clone()));
                let ready = self.fns.arrived(fn_id, bytes, needs);
                self.queue.extend(ready);
                comm.send(Outgoing::new(FromAgent::Holds { fn_id: fn_id.0 }));
            }
            Err(reason) => comm.send(Outgoing::new(FromAgent::NotFetched { fn_id: fn_id.0, reason })),
        }
        self.feed(now, comm)
    }

    /// The next piece of a function the orchestrator sends in pieces: served
    /// on as it comes, and the function's once it is whole.
    pub(super) fn on_piece(
        &mut self,
        fn_id: FnId,
        needs: Vec<u64>,
        total: u64,
        piece: Bytes,
        comm: &mut impl AgentComm,
    ) -> Step {
        let needs: Vec<FnId> = needs.into_iter().map(FnId).collect();
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        comm.shelve_piece(fn_id, total, piece.clone());
        if let Some(whole) =
            self.fns.piece(fn_id, needs.clone(), total, &piece).map_err(SessionEnd::Protocol)?
        {
            comm.shelve(fn_id, Some(whole.clone()));
            let ready = self.fns.arrived(fn_id, whole, needs);
            self.queue.extend(ready);
        }
        Ok(())
    }
}
