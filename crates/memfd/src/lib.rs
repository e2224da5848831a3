//! Copies between memory and memfds, for the buffers distripool keeps in
//! shared memory. The Python binding calls these with the GIL released.
//!
//! A large buffer is copied by several threads at once, each on its own
//! slice: one thread copies about 4 GB/s here, well short of what the memory
//! can take, and the page faults of fresh memory are paid in parallel too.
//! Writes into pages a memfd already has go through a shared mapping made
//! with `MAP_POPULATE`, because `pwrite`s to one file hold its lock and so
//! run one at a time; into pages it does not have yet, one `pwrite` is
//! faster than faulting them in through a mapping.

use std::ffi::{c_int, c_void};
use std::io;
use std::sync::{OnceLock, RwLock};

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

/// Fill `length` bytes at `dst` from `fd` at `offset`, several threads at
/// once when large.
///
/// # Safety
/// `dst` must be valid for writes of `length` bytes, and nothing else may
/// access them until this returns.
pub unsafe fn read_to(fd: c_int, dst: *mut u8, length: usize, offset: u64) -> io::Result<()> {
    let data = Ptr(dst);
    in_slices(length, |a, b| pread_exact(fd, data, offset, a, b))
}

/// Write `length` bytes from `src` into `fd` at `offset`, a multiple of the
/// page size.
///
/// Into pages the file already has, several threads copy through a mapping;
/// where it has none yet, one `pwrite` is faster (on this machine 25 ms for
/// 64 MiB, against 45 ms through a mapping, whose page faults on new shmem
/// pages are slow, and 9 ms into pages that exist).
///
/// # Safety
/// `src` must be valid for reads of `length` bytes until this returns.
pub unsafe fn write_from(fd: c_int, src: *const u8, length: usize, offset: u64) -> io::Result<()> {
    if length == 0 {
        return Ok(());
    }
    if offset % 4096 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the offset must be a multiple of the page size",
        ));
    }
    let src = Ptr(src.cast_mut());
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
}

/// A writable shared mapping of a whole memfd, kept while the memfd is
/// reused: a write through it saves making and populating a mapping each
/// time (2.5 ms for 64 MiB here).
pub struct Mapping {
    /// (address, length); None once closed. Writers hold the read lock
    /// while they copy, so `close` waits for them.
    map: RwLock<Option<(usize, usize)>>,
}

/// Why a write through a [`Mapping`] was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum MappingError {
    Closed,
    PastTheEnd { offset: usize, length: usize, mapped: usize },
}

impl std::fmt::Display for MappingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MappingError::Closed => f.write_str("the mapping is closed"),
            MappingError::PastTheEnd { offset, length, mapped } => write!(
                f,
                "the write of {length} bytes at {offset} reaches past the end of the mapping ({mapped} bytes)"
            ),
        }
    }
}

impl std::error::Error for MappingError {}

impl Mapping {
    /// A mapping of all of `fd`, or None unless the file has every page
    /// already (faulting in new shmem pages through a mapping is slow).
    pub fn of_resident(fd: c_int) -> io::Result<Option<Mapping>> {
        // SAFETY: fstat writes only into `st`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let length = st.st_size as usize;
        if length == 0 || !resident(fd, 0, length) {
            return Ok(None);
        }
        let Some(map) = map_shared(fd, 0, length) else {
            return Err(io::Error::last_os_error());
        };
        Ok(Some(Mapping { map: RwLock::new(Some((map as usize, length))) }))
    }

    /// The mapping's length in bytes (0 once closed).
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).map_or(0, |(_, len)| len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `length` bytes from `src` to `offset`. The memfd must not have
    /// shrunk since it was mapped.
    ///
    /// # Safety
    /// `src` must be valid for reads of `length` bytes until this returns.
    pub unsafe fn write(&self, offset: usize, src: *const u8, length: usize) -> Result<(), MappingError> {
        let guard = self.map.read().unwrap_or_else(|e| e.into_inner());
        let Some((addr, len)) = *guard else {
            return Err(MappingError::Closed);
        };
        if offset.checked_add(length).is_none_or(|end| end > len) {
            return Err(MappingError::PastTheEnd { offset, length, mapped: len });
        }
        // The range is inside the mapping (checked above).
        copy_in_slices(Ptr(src.cast_mut()), Ptr((addr + offset) as *mut u8), length);
        Ok(())
    }

    /// Unmap it (again is a no-op).
    pub fn close(&self) {
        let taken = self.map.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((addr, len)) = taken {
            // SAFETY: our mapping; no writer holds it (we hold the lock).
            unsafe { libc::munmap(addr as *mut c_void, len) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.close();
    }
}

/// A shared, writable, populated mapping of `length` bytes of `fd` from
/// `offset` (page-aligned), which must lie inside the file: past its end an
/// access would kill the process (SIGBUS).
pub fn map_shared(fd: c_int, offset: u64, length: usize) -> Option<*mut c_void> {
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
/// large (memory to memory, as the copies into and out of memfds are).
///
/// # Safety
/// Both must hold `length` bytes, not overlap, and stay alive and unused
/// elsewhere for the call.
pub unsafe fn copy(src: *const u8, dst: *mut u8, length: usize) {
    copy_in_slices(Ptr(src.cast_mut()), Ptr(dst), length);
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

#[cfg(test)]
mod tests;
