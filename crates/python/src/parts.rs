//! A task's payload as Python hands it over: one `bytes`, or a list of parts
//! (the envelope's pickle, then its large buffers, see `_envelope.py`) that
//! stay apart all the way to the socket (`distripool_runtime::Payload`).
//!
//! A large `bytes` part (or a view of one) is held, not copied: the object
//! cannot change, and Rust keeps a reference to it until the task is done
//! (the reference is dropped without the GIL; PyO3 lets go of the object
//! the next time this module runs). Any other large buffer (a NumPy array)
//! may be changed by its owner while the task waits or is retried, so it is
//! copied, once, with the GIL released, into memory kept from the last such
//! copy: fresh memory would cost a page fault per 4 KiB, more than the copy.

use std::sync::Mutex;

use bytes::Bytes;
use distripool_runtime::Payload;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyMemoryView};

use crate::memfd::{Addr, Buffer};

/// Parts at least this large are held (`bytes`) or copied into kept memory.
const LARGE: usize = 1 << 20;
/// Kept memory for copies of large buffers, idle, at most.
const RETAIN: usize = 256 << 20;

/// The payload `obj` stands for: `bytes`, or a list of bytes-like parts.
pub fn payload(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Payload> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Payload::from(held_or_copied(b)));
    }
    if let Ok(list) = obj.cast::<PyList>() {
        let mut parts = Vec::with_capacity(list.len());
        for item in list.iter() {
            parts.push(part(py, &item)?);
        }
        return Ok(Payload::from_parts(parts));
    }
    Err(PyTypeError::new_err(format!(
        "a task's payload is bytes or a list of buffers, not {}",
        obj.get_type().name()?
    )))
}

/// `hash()`, which hashes `len` bytes: without the GIL when they are many
/// (a large function or blob takes milliseconds); a small one takes less
/// than letting the GIL go and taking it back.
pub fn hashing<T: Send>(py: Python<'_>, len: usize, hash: impl FnOnce() -> T + Send) -> T {
    if len >= LARGE {
        py.detach(hash)
    } else {
        hash()
    }
}

/// A `bytes` object's content: held when large, else copied.
pub fn held_or_copied(b: &Bound<'_, PyBytes>) -> Bytes {
    let data = b.as_bytes();
    if data.len() < LARGE {
        Bytes::copy_from_slice(data)
    } else {
        bytes_held(b)
    }
}

fn part(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(held_or_copied(b));
    }
    let view = Buffer::get(obj)?;
    let (src, len) = (view.addr(), view.len());
    if len < LARGE {
        // SAFETY: the view keeps `len` bytes at `src` alive while it lives.
        return Ok(Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(src.get(), len) }));
    }
    if let Some(held) = view_of_bytes(obj, src.get(), len) {
        return Ok(held);
    }
    let mut kept = Kept::take(len);
    let dst = Addr::new(kept.buf.as_mut_ptr());
    // SAFETY: the view keeps the source alive and in place until it drops,
    // after the copy; `kept` holds at least `len` bytes and is ours alone.
    py.detach(|| unsafe { distripool_memfd::copy(src.get(), dst.get(), len) });
    kept.len = len;
    Ok(Bytes::from_owner(kept))
}

/// A memoryview of (part of) a `bytes` object, as that object's own memory.
fn view_of_bytes(obj: &Bound<'_, PyAny>, at: *const u8, len: usize) -> Option<Bytes> {
    let base = obj.cast::<PyMemoryView>().ok()?.getattr("obj").ok()?;
    let base = base.cast::<PyBytes>().ok()?;
    let whole = base.as_bytes();
    let start = (at as usize).checked_sub(whole.as_ptr() as usize)?;
    (start + len <= whole.len()).then(|| bytes_held(base).slice(start..start + len))
}

fn bytes_held(b: &Bound<'_, PyBytes>) -> Bytes {
    Bytes::from_owner(PyBackedBytes::from(b.clone()))
}

/// Idle buffers kept for the next copies, and their total size.
static SPARE: Mutex<(Vec<Box<[u8]>>, usize)> = Mutex::new((Vec::new(), 0));

/// A copy of a large buffer, in memory that goes back to `SPARE` when the
/// task no longer needs it.
struct Kept {
    buf: Box<[u8]>,
    len: usize,
}

impl Kept {
    /// The smallest spare buffer that holds `len` bytes, or a new one.
    fn take(len: usize) -> Kept {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..spare.0.len()).filter(|&i| spare.0[i].len() >= len).min_by_key(|&i| spare.0[i].len());
        let buf = match best {
            Some(i) => {
                let buf = spare.0.swap_remove(i);
                spare.1 -= buf.len();
                buf
            }
            None => {
                drop(spare);
                vec![0u8; len].into_boxed_slice()
            }
        };
        Kept { buf, len: 0 }
    }
}

impl AsRef<[u8]> for Kept {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.1 + buf.len() <= RETAIN {
            spare.1 += buf.len();
            spare.0.push(buf);
        }
    }
}
