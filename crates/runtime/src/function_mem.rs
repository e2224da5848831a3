//! Large functions in memfds of the agent's. An executor maps a large
//! function (or a blob it needs) from a memfd the agent shares among all its
//! executors (`FUNCTION_SHARED`, see `executor.rs`), instead of each reading
//! it from its socket; its large buffers are then views of that mapping
//! (`_envelope.function_blob`). A function that arrives in pieces (from the
//! orchestrator, or fetched from another agent) is put together straight in
//! such a memfd ([`Assembly`]), so the one copy the agent makes of it is
//! the one its executors map.

use std::ffi::c_void;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};

use crate::shared_mem::Memfd;

/// A function in a memfd of its own. It lives while an executor may still
/// be sent it, and closes with its last holder.
pub struct FunctionMemfd {
    /// The memfd, once the function is copied into it. Locked while it is
    /// copied: another executor's writer wanting the same function waits for
    /// that copy instead of making a second, and nothing else waits for it.
    memfd: Mutex<Option<Memfd>>,
    len: usize,
}

/// The functions in memfds, by id (content-addressed: the same id is the
/// same bytes), while something holds them. Never locked across a copy.
static HELD: Mutex<Vec<(u64, Weak<FunctionMemfd>)>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, Weak<FunctionMemfd>)>> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|(_, w)| w.strong_count() > 0);
    held
}

impl FunctionMemfd {
    /// The memfd holding `bytes`, function `fn_id`: the one already made
    /// for it (given to another executor, or put together as it arrived),
    /// or a new one. Blocks while it copies: call it off the runtime's
    /// threads.
    pub fn of(fn_id: u64, bytes: &[u8]) -> io::Result<Arc<FunctionMemfd>> {
        let f = {
            let mut held = held();
            match held.iter().find(|(id, _)| *id == fn_id).and_then(|(_, w)| w.upgrade()) {
                Some(f) => f,
                None => {
                    let f = Arc::new(FunctionMemfd { memfd: Mutex::new(None), len: bytes.len() });
                    held.push((fn_id, Arc::downgrade(&f)));
                    f
                }
            }
        };
        let mut memfd = f.memfd.lock().unwrap_or_else(|e| e.into_inner());
        if memfd.is_none() {
            let m = sized(bytes.len())?;
            // SAFETY: `bytes` stays borrowed for the call.
            unsafe { distripool_memfd::write_from(m.fd.as_raw_fd(), bytes.as_ptr(), bytes.len(), 0)? };
            *memfd = Some(m);
        }
        drop(memfd);
        Ok(f)
    }

    /// A FUNCTION_SHARED frame's tail: u32 fd, u64 inode, u64 length.
    pub fn prefix(&self) -> [u8; 20] {
        let memfd = self.memfd.lock().unwrap_or_else(|e| e.into_inner());
        let (fd, inode) = memfd.as_ref().expect("filled before it is handed out").name();
        let mut p = [0u8; 20];
        p[..4].copy_from_slice(&fd.to_le_bytes());
        p[4..12].copy_from_slice(&inode.to_le_bytes());
        p[12..].copy_from_slice(&(self.len as u64).to_le_bytes());
        p
    }
}

/// A new memfd of `len` bytes.
fn sized(len: usize) -> io::Result<Memfd> {
    let memfd = Memfd::new()?;
    // SAFETY: plain syscall on our descriptor.
    if unsafe { libc::ftruncate(memfd.fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(memfd)
}

/// A function being put together from its pieces: in a shared mapping of
/// a new memfd, or, where none can be made, in memory of its own.
pub(crate) enum Assembly {
    Shared { map: Mapping, filled: usize },
    Heap(BytesMut),
}

/// A shared, writable mapping of a function's memfd; a finished assembly's
/// bytes keep it (and so the memfd) alive.
pub(crate) struct Mapping {
    addr: usize,
    len: usize,
    memfd: Arc<FunctionMemfd>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the whole mapping, which lives as long as `self`; once the
        // assembly is finished nothing writes to it.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Assembly {
    /// Room for a function of `total` bytes.
    pub(crate) fn new(total: usize) -> Self {
        match Self::mapped(total) {
            Ok(map) => Self::Shared { map, filled: 0 },
            Err(e) => {
                tracing::debug!(
                    "a function of {total} bytes is put together in the agent's own memory ({e})"
                );
                Self::Heap(BytesMut::with_capacity(total))
            }
        }
    }

    fn mapped(total: usize) -> io::Result<Mapping> {
        if total == 0 {
            return Err(io::Error::other("an empty function"));
        }
        let memfd = sized(total)?;
        // SAFETY: a new shared mapping of our memfd, inside the file.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let memfd = Arc::new(FunctionMemfd { memfd: Mutex::new(Some(memfd)), len: total });
        Ok(Mapping { addr: addr as usize, len: total, memfd })
    }

    /// Bytes put together so far.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Shared { filled, .. } => *filled,
            Self::Heap(b) => b.len(),
        }
    }

    /// Append the next piece; false, and nothing appended, if it would run
    /// past the function's end.
    pub(crate) fn push(&mut self, piece: &[u8], total: usize) -> bool {
        if self.len() + piece.len() > total {
            return false;
        }
        match self {
            Self::Shared { map, filled } => {
                // SAFETY: inside the mapping (checked above; its length is
                // `total`); only this assembly writes to it, and nothing
                // reads it before it is finished.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        piece.as_ptr(),
                        (map.addr + *filled) as *mut u8,
                        piece.len(),
                    );
                }
                *filled += piece.len();
            }
            Self::Heap(b) => b.extend_from_slice(piece),
        }
        true
    }

    /// The whole function, as bytes that read the memfd, and that memfd:
    /// once [`hold`] is given it, executors are given it, no second copy
    /// made.
    pub(crate) fn finish(self) -> (Bytes, Option<Weak<FunctionMemfd>>) {
        match self {
            Self::Shared { map, .. } => {
                let memfd = Arc::downgrade(&map.memfd);
                (Bytes::from_owner(map), Some(memfd))
            }
            Self::Heap(b) => (b.freeze(), None),
        }
    }
}

/// `memfd` holds function `fn_id` (checked, where it came from another
/// agent): executors sent the function map it, while it lives.
pub(crate) fn hold(fn_id: u64, memfd: Option<Weak<FunctionMemfd>>) {
    if let Some(memfd) = memfd {
        held().push((fn_id, memfd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_put_together_in_a_memfd_is_the_one_executors_are_given() {
        let whole: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i| (i % 251) as u8).collect();
        let mut a = Assembly::new(whole.len());
        assert!(matches!(a, Assembly::Shared { .. }));
        for piece in whole.chunks(1 << 20) {
            assert!(a.push(piece, whole.len()));
        }
        assert!(!a.push(b"x", whole.len()), "past the end is refused");
        let (bytes, memfd) = a.finish();
        assert!(bytes == whole);
        // Not given to executors before it is held (checked).
        let other = FunctionMemfd::of(0xfeed, b"abcd").unwrap();
        assert_eq!(other.len, 4);
        drop(other);
        hold(0xfeed, memfd);
        // The executors' memfd is the same one: nothing is copied again.
        let given = FunctionMemfd::of(0xfeed, b"not looked at: the id names the bytes").unwrap();
        assert_eq!(given.len, whole.len());
        let (fd, _) = given.memfd.lock().unwrap().as_ref().unwrap().name();
        let mut read = vec![0u8; whole.len()];
        // SAFETY: reads into our own buffer.
        let n = unsafe { libc::pread(fd as i32, read.as_mut_ptr().cast(), read.len(), 0) };
        assert_eq!(n as usize, whole.len());
        assert!(read == whole);
        // Once nothing holds it, the next executor gets a new copy.
        drop((bytes, given));
        let fresh = FunctionMemfd::of(0xfeed, b"abc").unwrap();
        assert_eq!(fresh.len, 3);
    }
}
