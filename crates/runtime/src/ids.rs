//! The ids the runtime hands out, each its own type: a task's id cannot be
//! passed for a job's, nor a client's for a worker's. Frames carry them as
//! plain numbers; they are typed again as they arrive.

pub use distripool_scheduler::{define_id_type, GroupId, TaskId, WorkerId};

define_id_type!(
    /// One pool's connection to an orchestrator.
    ClientId
);
define_id_type!(
    /// One `map`, `apply` or imap of a client, numbered by the client.
    JobId
);

impl ClientId {
    /// The scheduler groups tasks by client.
    pub fn group(self) -> GroupId {
        GroupId(self.0)
    }
}
define_id_type!(
    /// A function, named by a hash of its pickled bytes, so that every client
    /// that sends the same function gives it the same id.
    FnId
);
define_id_type!(
    /// One executor of an agent's slot. Events from an executor that was
    /// replaced carry an older one and are ignored.
    Generation
);
