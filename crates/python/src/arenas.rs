//! Freed pymalloc arenas kept for reuse, in executors.
//!
//! CPython's small-object allocator takes memory in arenas (256 KiB to
//! 1 MiB, mapped fresh from the kernel) and unmaps an arena as soon as all
//! its objects are gone. An executor that runs a chunk of many small values
//! builds them, sends them and frees them, over and over: each chunk mapped
//! its arenas anew, and every page of them faulted in again (25 000 faults
//! for 30 maps of 200 000 tiny items, a tenth of the executors' CPU). Keeping
//! the freed arenas, up to a bound, lets the next chunk reuse pages that are
//! already there, as `MALLOC_TRIM_THRESHOLD_` does for the executors' heap.
//! The driver, which builds and takes apart the chunks, keeps them too: its
//! pages for a map's items and results are the last map's.

use std::ffi::c_void;
use std::sync::Mutex;

use pyo3::prelude::*;

type Alloc = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void, *mut c_void, usize);

/// `PyObjectArenaAllocator` (stable since CPython 3.4, outside the limited
/// API, so declared here).
#[repr(C)]
#[derive(Clone, Copy)]
struct ArenaAllocator {
    ctx: *mut c_void,
    alloc: Option<Alloc>,
    free: Option<Free>,
}

extern "C" {
    fn PyObject_GetArenaAllocator(allocator: *mut ArenaAllocator);
    fn PyObject_SetArenaAllocator(allocator: *mut ArenaAllocator);
}

struct Kept {
    /// The interpreter's own allocator, for what is not kept.
    original: ArenaAllocator,
    /// Freed arenas: address and size.
    arenas: Vec<(usize, usize)>,
    bytes: usize,
    limit: usize,
}

// SAFETY: the raw `ctx` pointer is only handed back to the allocator it came
// from; the interpreter calls the arena functions with its lock held.
unsafe impl Send for Kept {}

static KEPT: Mutex<Option<Kept>> = Mutex::new(None);

unsafe extern "C" fn alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let k = kept.as_mut().expect("installed before use");
    if let Some(i) = k.arenas.iter().rposition(|&(_, s)| s == size) {
        let (at, _) = k.arenas.swap_remove(i);
        k.bytes -= size;
        return at as *mut c_void;
    }
    let original = k.original;
    drop(kept);
    // SAFETY: the interpreter's allocator, called as it would be.
    unsafe { original.alloc.expect("the interpreter's arena allocator")(original.ctx, size) }
}

unsafe extern "C" fn free(_ctx: *mut c_void, at: *mut c_void, size: usize) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let k = kept.as_mut().expect("installed before use");
    if k.bytes + size <= k.limit && k.arenas.len() < k.arenas.capacity() {
        k.arenas.push((at as usize, size));
        k.bytes += size;
        return;
    }
    let original = k.original;
    drop(kept);
    // SAFETY: an arena the interpreter's allocator gave, returned to it.
    unsafe { original.free.expect("the interpreter's arena allocator")(original.ctx, at, size) }
}

/// Freed arenas kept at most, in bytes.
const LIMIT: usize = 32 << 20;

/// Keep up to 32 MiB of freed small-object arenas for reuse instead of
/// unmapping them. Once per process; later calls change nothing.
#[pyfunction]
pub(crate) fn keep_arenas() {
    let limit = LIMIT;
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.is_some() {
        return;
    }
    let mut original = ArenaAllocator { ctx: std::ptr::null_mut(), alloc: None, free: None };
    // SAFETY: plain calls of the interpreter's API, with the GIL held (a
    // #[pyfunction] runs with it), which arena calls also need.
    unsafe { PyObject_GetArenaAllocator(&mut original) };
    if original.alloc.is_none() || original.free.is_none() {
        return;
    }
    // Room for the arenas of the smallest size (256 KiB) within the limit:
    // `free` never allocates.
    *kept = Some(Kept { original, arenas: Vec::with_capacity(limit / (256 << 10) + 1), bytes: 0, limit });
    drop(kept);
    let mut ours = ArenaAllocator { ctx: std::ptr::null_mut(), alloc: Some(alloc), free: Some(free) };
    // SAFETY: as above; the interpreter copies the struct.
    unsafe { PyObject_SetArenaAllocator(&mut ours) };
}
