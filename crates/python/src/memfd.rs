//! Copies between Python buffers and memfds, with the GIL released: the
//! Python face of `distripool-memfd`, which does the copying.

use std::ffi::{c_char, c_int, c_void};

use distripool_memfd::{read_to, write_from, Mapping};
use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A new `bytes` of `length` bytes read from `fd` at `offset`, with the GIL
/// released. A large object's memory is a fresh mapping, so most of a read's
/// cost is page faults; several threads share them. (Asking for huge pages
/// measured faster at the median, but on this virtual machine about one read
/// in ten then stalled for ~90 ms.)
#[pyfunction]
pub fn read_bytes(py: Python<'_>, fd: i32, offset: u64, length: usize) -> PyResult<Bound<'_, PyBytes>> {
    let (bytes, data) = uninitialised(py, length)?;
    // SAFETY: nothing else sees the new object's bytes yet.
    py.detach(|| unsafe { read_to(fd, data.get(), length, offset) })
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
    Ok(bytes)
}

/// `b"".join(parts)`, copied with the GIL released (several threads for a
/// large part) into the new object: a pool function's pickle and the arrays
/// beside it (`_envelope.function_blob`). Its memory is a fresh mapping,
/// whose page faults cost more than the copy; threads share them.
#[pyfunction]
pub fn join_buffers<'py>(py: Python<'py>, parts: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyBytes>> {
    let views = parts.iter().map(Buffer::get).collect::<PyResult<Vec<_>>>()?;
    let sources: Vec<(Addr, usize)> = views.iter().map(|v| (v.addr(), v.len())).collect();
    let (bytes, data) = uninitialised(py, sources.iter().map(|(_, n)| n).sum())?;
    py.detach(|| {
        let mut at = 0;
        for &(src, n) in &sources {
            // SAFETY: the views keep each part alive and in place until they
            // drop, after this; the parts fill the object end to end.
            unsafe { distripool_memfd::copy(src.get(), data.get().add(at), n) };
            at += n;
        }
    });
    drop(views);
    Ok(bytes)
}

/// A new `bytes` object of `length` bytes not yet written, and where they
/// are. Nothing else can see it until the caller returns it.
fn uninitialised(py: Python<'_>, length: usize) -> PyResult<(Bound<'_, PyBytes>, Addr)> {
    let size = isize::try_from(length).map_err(|_| PyValueError::new_err("length too large"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of
    // `size` bytes.
    let obj = unsafe { pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
    if obj.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `obj` is a new, owned reference.
    let bytes = unsafe { Bound::from_owned_ptr(py, obj) }.cast_into::<PyBytes>()?;
    // SAFETY: the object owns `length` writable bytes at this address, and
    // stays alive (the caller holds it) while they are written.
    let data = Addr(unsafe { pyo3::ffi::PyBytes_AsString(bytes.as_ptr()) }.cast::<u8>());
    Ok((bytes, data))
}

/// Write the whole of `buffer` (any contiguous buffer) into `fd` at
/// `offset`, a multiple of the page size, with the GIL released.
#[pyfunction]
pub fn write_buffer(py: Python<'_>, fd: i32, offset: u64, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
    let view = Buffer::get(buffer)?;
    let (src, length) = (view.addr(), view.len());
    if offset % 4096 != 0 {
        return Err(PyValueError::new_err("the offset must be a multiple of the page size"));
    }
    // SAFETY: the view keeps the buffer alive and in place until it is dropped.
    py.detach(|| unsafe { write_from(fd, src.get(), length, offset) })
        .map_err(|e| PyOSError::new_err(e.to_string()))
}

/// A writable shared mapping of a whole memfd (see `distripool_memfd::Mapping`).
#[pyclass(module = "distripool._native")]
pub struct SharedMapping {
    inner: Mapping,
}

#[pymethods]
impl SharedMapping {
    /// A mapping of all of `fd`, or None unless the file has every page
    /// already (faulting in new shmem pages through a mapping is slow).
    #[staticmethod]
    fn of_resident(fd: i32) -> PyResult<Option<SharedMapping>> {
        Ok(Mapping::of_resident(fd)?.map(|inner| SharedMapping { inner }))
    }

    /// The mapping's length in bytes (0 once closed).
    #[getter]
    fn length(&self) -> usize {
        self.inner.len()
    }

    /// Copy the whole of `buffer` to `offset`, with the GIL released. The
    /// memfd must not have shrunk since it was mapped.
    fn write(&self, py: Python<'_>, offset: usize, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
        let view = Buffer::get(buffer)?;
        let (src, length) = (view.addr(), view.len());
        // SAFETY: the view keeps the buffer alive and in place until it is dropped.
        py.detach(|| unsafe { self.inner.write(offset, src.get(), length) })
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Unmap it (again is a no-op).
    fn close(&self) {
        self.inner.close();
    }
}

/// An address handed to code that runs with the GIL released.
#[derive(Clone, Copy)]
pub(crate) struct Addr(*mut u8);
// SAFETY: the memory it points to outlives the call it is handed to, and
// that call is the only one using it.
unsafe impl Send for Addr {}
unsafe impl Sync for Addr {}

impl Addr {
    pub(crate) fn new(p: *mut u8) -> Self {
        Addr(p)
    }

    /// The pointer (a method, so that closures capture the whole `Addr`).
    pub(crate) fn get(self) -> *mut u8 {
        self.0
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
pub(crate) struct Buffer(Box<RawBuffer>);

impl Buffer {
    pub(crate) fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
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

    pub(crate) fn addr(&self) -> Addr {
        Addr(self.0.buf.cast())
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len as usize
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: a view obtained by `get`, released once.
        unsafe { PyBuffer_Release(&mut *self.0) };
    }
}
