//! The end of a fetch from another agent (see `peers.rs`).

use std::time::Instant;

use bytes::Bytes;
use distripool_protocol::FromAgent;

use super::{AgentComm, Session, Step};
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
}
