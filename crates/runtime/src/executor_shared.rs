//! How the agent writes to an executor through its memfds: a task whose
//! buffers are large (`TASK_SHARED`), a large function (`FUNCTION_SHARED`).

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{encode_header, lock, ExecWriter, KIND_FUNCTION_SHARED, KIND_TASK_SHARED};
use crate::function_mem::FunctionMemfd;
use crate::ids::{FnId, TaskId};
use crate::shared_mem::{self, Plan};

impl ExecWriter {
    /// A task, through memfds if its buffers are large; false if it goes
    /// as a plain TASK frame after all (counted as sent either way).
    pub(super) async fn put_shared(
        &mut self,
        task: TaskId,
        fn_id: FnId,
        payload: &Bytes,
    ) -> crate::Result<bool> {
        let plan = lock(&self.1).plan(task.0, fn_id.0, payload);
        let Plan::Shared { head, tail, reply } = plan else {
            return Ok(false);
        };
        let args = match tail {
            // The copy blocks for milliseconds: not on the runtime's threads.
            Some((tail, args)) => {
                let len = tail.len();
                let written = tokio::task::spawn_blocking(move || {
                    let mut args = args;
                    args.write(&tail).map(|()| args)
                })
                .await;
                match written {
                    Ok(Ok(args)) => Some((args, len)),
                    _ => {
                        lock(&self.1).sent(task.0, fn_id.0, None, None);
                        return Ok(false);
                    }
                }
            }
            None => None,
        };
        let prefix = shared_mem::prefix(args.as_ref().map(|(l, n)| (l, *n)), &reply);
        lock(&self.1).sent(task.0, fn_id.0, args.map(|(l, _)| l), Some(reply));
        let header = encode_header(KIND_TASK_SHARED, task.0, fn_id.0, prefix.len() + head.len());
        self.0.write_all(&header).await?;
        self.0.write_all(&prefix).await?;
        self.0.write_all(&head).await?;
        Ok(true)
    }

    /// A large function, through a memfd its executors share; false if it
    /// goes as a plain FUNCTION frame after all.
    pub(super) async fn put_shared_function(
        &mut self,
        fn_id: FnId,
        needs: &[FnId],
        bytes: &Bytes,
    ) -> crate::Result<bool> {
        if bytes.len() < shared_mem::AT_LEAST || !lock(&self.1).can_open {
            return Ok(false);
        }
        // The copy (or the wait for another executor's) blocks for
        // milliseconds: not on the runtime's threads.
        let copy = bytes.clone();
        let memfd = match tokio::task::spawn_blocking(move || FunctionMemfd::of(fn_id.0, &copy)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::debug!("function {fn_id} goes through the socket: no memfd for it ({e})");
                return Ok(false);
            }
            Err(_) => return Ok(false),
        };
        let prefix = memfd.prefix();
        // Kept until the function is forgotten.
        lock(&self.1).functions.insert(fn_id.0, memfd);
        let header =
            encode_header(KIND_FUNCTION_SHARED, fn_id.0, needs.len() as u64, needs.len() * 8 + prefix.len());
        self.0.write_all(&header).await?;
        for need in needs {
            self.0.write_all(&need.0.to_le_bytes()).await?;
        }
        self.0.write_all(&prefix).await?;
        Ok(true)
    }
}
