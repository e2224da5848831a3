use super::*;

/// A new memfd of `len` bytes (a hole: no page exists yet).
fn memfd(len: usize) -> c_int {
    // SAFETY: a plain syscall with a valid, NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"distripool-memfd-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: our descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
    fd
}

fn close(fd: c_int) {
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(fd) };
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read_back(fd: c_int, len: usize, offset: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: `out` holds `len` bytes and is ours alone.
    unsafe { read_to(fd, out.as_mut_ptr(), len, offset) }.unwrap();
    out
}

#[test]
fn small_and_large_buffers_round_trip_into_holes_and_into_existing_pages() {
    // 20 MiB: past PARALLEL_MIN, so several threads copy each way.
    for len in [1, 4096, 100_000, 20 << 20] {
        let fd = memfd(len + 8192);
        let first = pattern(len, 1);
        // Into a hole: one pwrite.
        unsafe { write_from(fd, first.as_ptr(), len, 4096) }.unwrap();
        assert!(read_back(fd, len, 4096) == first, "{len} bytes into a hole");
        // Into pages that now exist: through a mapping when large.
        let second = pattern(len, 7);
        unsafe { write_from(fd, second.as_ptr(), len, 4096) }.unwrap();
        assert!(read_back(fd, len, 4096) == second, "{len} bytes into existing pages");
        close(fd);
    }
}

#[test]
fn bad_offsets_and_short_files_are_errors_not_crashes() {
    let fd = memfd(8192);
    let data = pattern(100, 3);
    let err = unsafe { write_from(fd, data.as_ptr(), data.len(), 100) }.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let mut out = vec![0u8; 10_000];
    let err = unsafe { read_to(fd, out.as_mut_ptr(), out.len(), 0) }.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "reading past the end");
    assert!(unsafe { read_to(-1, out.as_mut_ptr(), 10, 0) }.is_err());
    close(fd);
}

#[test]
fn a_mapping_exists_only_over_resident_pages_and_refuses_writes_past_its_end() {
    let len = 16 << 20;
    let fd = memfd(len);
    assert!(Mapping::of_resident(fd).unwrap().is_none(), "all holes");
    let zeros = vec![0u8; len];
    unsafe { write_from(fd, zeros.as_ptr(), len, 0) }.unwrap();
    let map = Mapping::of_resident(fd).unwrap().expect("every page exists now");
    assert_eq!(map.len(), len);
    let data = pattern(len - 4096, 9);
    unsafe { map.write(4096, data.as_ptr(), data.len()) }.unwrap();
    assert!(read_back(fd, data.len(), 4096) == data);
    let err = unsafe { map.write(4097, data.as_ptr(), data.len()) }.unwrap_err();
    assert_eq!(err, MappingError::PastTheEnd { offset: 4097, length: data.len(), mapped: len });
    map.close();
    map.close();
    assert_eq!(map.len(), 0);
    assert_eq!(unsafe { map.write(0, data.as_ptr(), 1) }, Err(MappingError::Closed));
    close(fd);
}
