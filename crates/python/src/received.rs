//! A large result as it arrived, left in the runtime's memory: the driver
//! reads the envelope's pickle from it, and takes each inline buffer out as
//! an object of its own (one copy each, by several threads with the GIL
//! released), instead of copying the whole payload into one `bytes` first
//! and each buffer out of that again.

use bytes::Bytes;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::memfd::Addr;

/// Payloads at least this large that are envelopes come to Python as a
/// `Received`; smaller ones as `bytes`.
pub const LARGE: usize = 1 << 20;

/// The first byte of an envelope (`_envelope.ENVELOPE`).
const ENVELOPE: u8 = 1;

/// Whether `data` goes to Python as a [`Received`].
pub fn stays(data: &Bytes) -> bool {
    data.len() >= LARGE && data[0] == ENVELOPE
}

/// A task's outcome, an envelope with large buffers inline, still where the
/// runtime read it.
#[pyclass(module = "distripool._native", frozen)]
pub struct Received {
    data: Bytes,
}

impl Received {
    pub fn new(data: Bytes) -> Self {
        Received { data }
    }

    fn range(&self, start: usize, length: usize) -> PyResult<std::ops::Range<usize>> {
        match start.checked_add(length) {
            Some(end) if end <= self.data.len() => Ok(start..end),
            _ => Err(PyValueError::new_err(format!(
                "bytes {start}..{} are past the end of a {}-byte payload",
                start.saturating_add(length),
                self.data.len()
            ))),
        }
    }
}

#[pymethods]
impl Received {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    fn __getitem__(&self, index: isize) -> PyResult<u8> {
        let i = if index < 0 { self.data.len() as isize + index } else { index };
        usize::try_from(i)
            .ok()
            .and_then(|i| self.data.get(i).copied())
            .ok_or_else(|| PyIndexError::new_err("index out of range"))
    }

    /// The first `end` bytes, as `bytes` (the envelope's header and pickle).
    fn head<'py>(&self, py: Python<'py>, end: usize) -> PyResult<Bound<'py, PyBytes>> {
        let r = self.range(0, end)?;
        Ok(PyBytes::new(py, &self.data[r]))
    }

    /// `length` bytes from `start` in a new object: `bytes`, or a
    /// `bytearray` if `writable`.
    fn take<'py>(
        &self,
        py: Python<'py>,
        start: usize,
        length: usize,
        writable: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let r = self.range(start, length)?;
        let size = isize::try_from(length).map_err(|_| PyValueError::new_err("length too large"))?;
        // SAFETY: a NULL source asks CPython for an uninitialised object of
        // `size` bytes, which nothing else can see until it is returned.
        let (obj, dst) = unsafe {
            if writable {
                let obj = pyo3::ffi::PyByteArray_FromStringAndSize(std::ptr::null(), size);
                (obj, if obj.is_null() { std::ptr::null_mut() } else { pyo3::ffi::PyByteArray_AsString(obj) })
            } else {
                let obj = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
                (obj, if obj.is_null() { std::ptr::null_mut() } else { pyo3::ffi::PyBytes_AsString(obj) })
            }
        };
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: `obj` is a new, owned reference.
        let out = unsafe { Bound::from_owned_ptr(py, obj) };
        let (src, dst) = (Addr::new(self.data[r].as_ptr().cast_mut()), Addr::new(dst.cast()));
        // SAFETY: the source lives as long as `self`; the new object owns
        // `length` writable bytes that nothing else sees yet.
        py.detach(|| unsafe { distripool_memfd::copy(src.get(), dst.get(), length) });
        Ok(out)
    }
}
