//! Copies between Python buffers and memfds, with the GIL released.
//!
//! A large buffer is copied by several threads at once, each on its own
//! slice: one thread copies about 4 GB/s here, well short of what the memory
//! can take, and the page faults of fresh memory are paid in parallel too.
//! Writes into pages a memfd already has go through a shared mapping made
//! with `MAP_POPULATE`, because `pwrite`s to one file hold its lock and so
//! run one at a time; into pages it does not have yet, one `pwrite` is
//! faster than faulting them in through a mapping.

use std::ffi::{c_char, c_int, c_void};
use std::io;
use std::sync::{OnceLock, RwLock};

use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Below this, one thread copies: a thread costs tens of microseconds.
const PARALLEL_MIN: usize = 8 << 20;
/// Each thread copies at least this much.
const SLICE_MIN: usize = 4 << 20;
/// At most this many threads copy one buffer.
const MAX_THREADS: usize = 4;

/// How many threads copy `length` bytes.
fn threads_for(length: usize) -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    if length < PARALLEL_MIN {
        return 1;
    }
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cores.min(MAX_THREADS).min(length / SLICE_MIN).max(1)
}

/// Run `copy(start, end)` over `0..length` cut into `threads_for(length)`
/// page-aligned slices, one per thread; the first error wins.
fn in_slices<F>(length: usize, copy: F) -> io::Result<()>
where
    F: Fn(usize, usize) -> io::Result<()> + Sync,
{
    let n = threads_for(length);
    if n == 1 {
        return copy(0, length);
    }
    let slice = (length / n).next_multiple_of(4096);
    let bounds: Vec<(usize, usize)> =
        (0..n).map(|i| ((i * slice).min(length), ((i + 1) * slice).min(length))).collect();
    std::thread::scope(|s| {
        let copy = &copy;
        let mut result = Ok(());
        let mut others = Vec::with_capacity(n - 1);
        for &(a, b) in &bounds[1..] {
            match std::thread::Builder::new().spawn_scoped(s, move || copy(a, b)) {
                Ok(h) => others.push(h),
                // No thread to be had: this one copies the slice itself.
                Err(_) => result = result.and(copy(a, b)),
            }
        }
        result = result.and(copy(bounds[0].0, bounds[0].1));
        for h in others {
            let r = h.join().unwrap_or_else(|_| Err(io::Error::other("a copying thread panicked")));
            result = result.and(r);
        }
        result
    })
}

/// Fill `buf[start..end]` from `fd` at `offset + start`.
fn pread_exact(fd: c_int, buf: Ptr, offset: u64, start: usize, end: usize) -> io::Result<()> {
    let mut done = start;
    while done < end {
        // SAFETY: the caller owns `buf[start..end]` for this call's duration.
        let n = unsafe {
            libc::pread(fd, buf.0.add(done).cast(), end - done, (offset + done as u64) as libc::off_t)
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the buffer ends early")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Write `buf[start..end]` to `fd` at `offset + start`.
fn pwrite_all(fd: c_int, buf: Ptr, offset: u64, start: usize, end: usize) -> io::Result<()> {
    let mut done = start;
    while done < end {
        // SAFETY: the caller keeps `buf[start..end]` readable for this call.
        let n = unsafe {
            libc::pwrite(fd, buf.0.add(done).cast(), end - done, (offset + done as u64) as libc::off_t)
        };
        if n >= 0 {
            done += n as usize;
        } else {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// A new `bytes` of `length` bytes read from `fd` at `offset`, with the GIL
/// released. A large object's memory is a fresh mapping, so most of a read's
/// cost is page faults; several threads share them. (Asking for huge pages
/// measured faster at the median, but on this virtual machine about one read
/// in ten then stalled for ~90 ms.)
#[pyfunction]
pub fn read_bytes(py: Python<'_>, fd: i32, offset: u64, length: usize) -> PyResult<Bound<'_, PyBytes>> {
    let size = isize::try_from(length).map_err(|_| PyValueError::new_err("length too large"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of
    // `size` bytes, which nothing else can see until this function returns it.
    let obj = unsafe { pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
    if obj.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a new, owned reference.
    let bytes = unsafe { Bound::from_owned_ptr(py, obj) }.cast_into::<PyBytes>()?;
    // SAFETY: the object owns `length` writable bytes at this address, and
    // stays alive (we hold it) while they are written.
    let data = Ptr(unsafe { pyo3::ffi::PyBytes_AsString(obj) }.cast::<u8>());
    py.detach(|| in_slices(length, |a, b| pread_exact(fd, data, offset, a, b)))
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
    Ok(bytes)
}

/// Write the whole of `buffer` (any contiguous buffer) into `fd` at
/// `offset`, a multiple of the page size, with the GIL released.
///
/// Into pages the file already has, several threads copy through a mapping;
/// where it has none yet, one `pwrite` is faster (on this machine 25 ms for
/// 64 MiB, against 45 ms through a mapping, whose page faults on new shmem
/// pages are slow, and 9 ms into pages that exist).
#[pyfunction]
pub fn write_buffer(py: Python<'_>, fd: i32, offset: u64, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
    let view = Buffer::get(buffer)?;
    let (src, length) = (view.ptr(), view.len());
    if length == 0 {
        return Ok(());
    }
    if offset % 4096 != 0 {
        return Err(PyValueError::new_err("the offset must be a multiple of the page size"));
    }
    py.detach(|| {
        if threads_for(length) == 1 || !resident(fd, offset, length) {
            return pwrite_all(fd, src, offset, 0, length);
        }
        // `resident` found the range inside the file.
        let Some(map) = map_shared(fd, offset, length) else {
            return pwrite_all(fd, src, offset, 0, length);
        };
        copy_in_slices(src, Ptr(map.cast()), length);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(map, length) };
        Ok(())
    })
    .map_err(|e| PyOSError::new_err(e.to_string()))
}

/// A writable shared mapping of a whole memfd, kept while the memfd is
/// reused: a write through it saves making and populating a mapping each
/// time (2.5 ms for 64 MiB here).
#[pyclass(module = "distripool._native")]
pub struct SharedMapping {
    /// (address, length); None once closed. Writers hold the read lock
    /// while they copy, with the GIL released, so `close` waits for them.
    map: RwLock<Option<(usize, usize)>>,
}

#[pymethods]
impl SharedMapping {
    /// A mapping of all of `fd`, or None unless the file has every page
    /// already (faulting in new shmem pages through a mapping is slow).
    #[staticmethod]
    fn of_resident(fd: i32) -> PyResult<Option<SharedMapping>> {
        // SAFETY: fstat writes only into `st`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let length = st.st_size as usize;
        if length == 0 || !resident(fd, 0, length) {
            return Ok(None);
        }
        let Some(map) = map_shared(fd, 0, length) else {
            return Err(io::Error::last_os_error().into());
        };
        Ok(Some(SharedMapping { map: RwLock::new(Some((map as usize, length))) }))
    }

    /// The mapping's length in bytes (0 once closed).
    #[getter]
    fn length(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).map_or(0, |(_, len)| len)
    }

    /// Copy the whole of `buffer` to `offset`, with the GIL released. The
    /// memfd must not have shrunk since it was mapped.
    fn write(&self, py: Python<'_>, offset: usize, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
        let view = Buffer::get(buffer)?;
        let (src, length) = (view.ptr(), view.len());
        py.detach(|| {
            let guard = self.map.read().unwrap_or_else(|e| e.into_inner());
            let Some((addr, len)) = *guard else {
                return Err(PyValueError::new_err("the mapping is closed"));
            };
            if offset.checked_add(length).is_none_or(|end| end > len) {
                return Err(PyValueError::new_err("the write reaches past the end of the mapping"));
            }
            // The range is inside the mapping (checked above).
            copy_in_slices(src, Ptr((addr + offset) as *mut u8), length);
            Ok(())
        })
    }

    /// Unmap it (again is a no-op).
    fn close(&self) {
        let taken = self.map.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((addr, len)) = taken {
            // SAFETY: our mapping; no writer holds it (we hold the lock).
            unsafe { libc::munmap(addr as *mut c_void, len) };
        }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        self.close();
    }
}

/// A shared, writable, populated mapping of `length` bytes of `fd` from
/// `offset` (page-aligned), which must lie inside the file: past its end an
/// access would kill the process (SIGBUS).
fn map_shared(fd: c_int, offset: u64, length: usize) -> Option<*mut c_void> {
    // SAFETY: a new mapping, which nothing else refers to.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            offset as libc::off_t,
        )
    };
    (map != libc::MAP_FAILED).then_some(map)
}

/// Copy `length` bytes from `src` to `dst`, several threads at once when
/// large. Both must hold `length` bytes, and not overlap.
fn copy_in_slices(src: Ptr, dst: Ptr, length: usize) {
    let _ = in_slices(length, |a, b| {
        // SAFETY: in bounds (the caller's promise); each thread copies its
        // own slice.
        unsafe { std::ptr::copy_nonoverlapping(src.at(a).cast_const(), dst.at(a), b - a) };
        Ok(())
    });
}

/// Whether `fd` has every page of `offset..offset + length` (no hole there,
/// and the file reaches its end).
fn resident(fd: c_int, offset: u64, length: usize) -> bool {
    let end = offset + length as u64;
    // SAFETY: fstat writes only into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || (st.st_size as u64) < end {
        return false;
    }
    // SAFETY: lseek on a descriptor the caller owns; the position it moves
    // is not used, every access here is by offset.
    let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
    hole >= 0 && hole as u64 >= end
}

/// A pointer shared with the threads that copy through it while the GIL is
/// released.
#[derive(Clone, Copy)]
struct Ptr(*mut u8);
// SAFETY: each user hands disjoint slices of the memory to its threads, and
// the memory outlives them (they are scoped).
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The address `i` bytes on (a method, so that closures capture the
    /// whole `Ptr`, not its raw field).
    ///
    /// # Safety
    /// `i` must stay within the memory this points to.
    unsafe fn at(self, i: usize) -> *mut u8 {
        // SAFETY: the caller keeps `i` in bounds.
        unsafe { self.0.add(i) }
    }
}

/// The buffer protocol's view of an object (`Py_buffer`). Its layout has not
/// changed since Python 3.0; it is declared here because the 3.9 limited API
/// this module is built against leaves it out.
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut pyo3::ffi::PyObject,
    len: isize,
    itemsize: isize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut isize,
    strides: *mut isize,
    suboffsets: *mut isize,
    internal: *mut c_void,
}

unsafe extern "C" {
    fn PyObject_GetBuffer(obj: *mut pyo3::ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

/// A contiguous, byte-addressed view of a Python object, released on drop
/// (with the GIL held: it is not `Send`).
struct Buffer(Box<RawBuffer>);

impl Buffer {
    fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        // SAFETY: all-zero is a valid empty Py_buffer, filled in below.
        let mut raw: Box<RawBuffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: `obj` is alive; flags 0 (PyBUF_SIMPLE) asks for one
        // contiguous run of bytes, or an error.
        if unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *raw, 0) } != 0 {
            return Err(PyErr::take(obj.py())
                .unwrap_or_else(|| PyBufferError::new_err("the object has no contiguous buffer")));
        }
        Ok(Buffer(raw))
    }

    fn ptr(&self) -> Ptr {
        Ptr(self.0.buf.cast())
    }

    fn len(&self) -> usize {
        self.0.len as usize
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: a view obtained by `get`, released once.
        unsafe { PyBuffer_Release(&mut *self.0) };
    }
}
