//! The interpreter's own file-system calls, straight to libc. std::fs answers the same through statx
//! and its Metadata, code spread over pages of its own that every exec would fault in (benches/interp
//! counts the faults), and musl's open() adds an fcntl that openat() does not. A leaf: elf, config,
//! exec and the entry point use it, it uses none of them.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `f` called with `path` as a C string, from a stack buffer when it fits. None for a path holding a
/// NUL, which names no file.
fn with_c_path<T>(path: &Path, f: impl FnOnce(&std::ffi::CStr) -> T) -> Option<T> {
    let b = path.as_os_str().as_bytes();
    let mut buf = [0u8; 512];
    if b.len() < buf.len() {
        buf[..b.len()].copy_from_slice(b);
        std::ffi::CStr::from_bytes_with_nul(&buf[..=b.len()]).ok().map(f)
    } else {
        std::ffi::CString::new(b).ok().map(|c| f(&c))
    }
}

fn stat_mode(path: &Path, follow: bool) -> Option<libc::mode_t> {
    with_c_path(path, |c| {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
        // SAFETY: `c` is a NUL-terminated path and `st` has room for one struct stat.
        let ok = unsafe { libc::fstatat(libc::AT_FDCWD, c.as_ptr(), st.as_mut_ptr(), flags) } == 0;
        // SAFETY: fstatat returned 0, so it filled `st`.
        ok.then(|| unsafe { st.assume_init() }.st_mode)
    })
    .flatten()
}

/// Is `path` a regular file, symlinks followed?
pub fn is_file(path: &Path) -> bool {
    stat_mode(path, true).is_some_and(|m| m & libc::S_IFMT == libc::S_IFREG)
}

/// Is `path` itself a regular file (a symlink is not)?
pub fn is_plain_file(path: &Path) -> bool {
    stat_mode(path, false).is_some_and(|m| m & libc::S_IFMT == libc::S_IFREG)
}

/// The last component of the target of the symlink at `path`, into `buf`; None if `path` is no
/// symlink or the target does not fit.
pub fn link_target_name<'b>(path: &Path, buf: &'b mut [u8; 256]) -> Option<&'b [u8]> {
    let n = with_c_path(path, |c| {
        // SAFETY: `c` is a NUL-terminated path and `buf` is writable for its whole length.
        unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })?;
    let t = buf.get(..usize::try_from(n).ok().filter(|&n| n < buf.len())?)?;
    Some(t.rsplit(|&c| c == b'/').next().unwrap_or(t))
}

/// `path` with every symlink resolved, as std::fs::canonicalize gives it, but into a buffer of ours:
/// given none, realpath mallocs its answer, and musl's malloc sets itself up with five system calls
/// (brk, mmap, munmap) and pages of its own on the interpreter's path. Never inlined: its 4 KiB
/// buffer would grow the frame of every caller, a stack page each exec faults in whether the path
/// is resolved or not.
#[inline(never)]
pub fn canonical(path: &Path) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = [0u8; libc::PATH_MAX as usize];
    with_c_path(path, |c| {
        // SAFETY: `c` is a NUL-terminated path and `out` holds PATH_MAX bytes, the most realpath
        // writes (its answer and the NUL).
        let r = unsafe { libc::realpath(c.as_ptr(), out.as_mut_ptr().cast()) };
        (!r.is_null()).then(|| {
            let n = out.iter().position(|&b| b == 0).unwrap_or(out.len());
            std::path::PathBuf::from(std::ffi::OsString::from_vec(out[..n].to_vec()))
        })
    })
    .flatten()
}

/// The working directory, as std::env::current_dir gives it, from a buffer of ours: std's sat in
/// code pages of its own (and its Path::join in more), three page faults for every program started
/// by a relative path, as autoconf's `./conftest` is. None where std would fail too, or for a
/// directory deeper than PATH_MAX, where the caller asks std. Never inlined, as `canonical`.
#[inline(never)]
pub fn current_dir() -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = [0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its whole length; getcwd writes a NUL-terminated path into it,
    // or fails and returns NULL.
    let r = unsafe { libc::getcwd(buf.as_mut_ptr().cast(), buf.len()) };
    if r.is_null() {
        return None;
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(std::path::PathBuf::from(std::ffi::OsString::from_vec(buf[..n].to_vec())))
}

/// Opens `path` read-only and close-on-exec.
pub fn open_read(path: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let fd = with_c_path(path, |c| {
        // SAFETY: `c` is a NUL-terminated path; openat has no other preconditions.
        unsafe { libc::openat(libc::AT_FDCWD, c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }
    })
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this fd, owned by nobody else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The size of an open file.
pub fn file_size(f: &std::fs::File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // musl's fstat is fstatat(fd, "", AT_EMPTY_PATH), and reading its "" from musl's strings, apart
    // from the interpreter's read-only data (src/interp/text-order.ld), cost a page fault per exec.
    let empty: [libc::c_char; 1] = [0];
    // SAFETY: `empty` is a NUL-terminated empty path; with AT_EMPTY_PATH fstatat fills `st` for the
    // open fd when it returns 0, and only then is `st` read.
    if unsafe { libc::fstatat(f.as_raw_fd(), empty.as_ptr(), st.as_mut_ptr(), libc::AT_EMPTY_PATH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful fstatat above.
    Ok(unsafe { st.assume_init() }.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_is_what_std_canonicalize_says() {
        let d = std::env::temp_dir().join(format!("nixqimg-canon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("real/bin")).unwrap();
        std::fs::write(d.join("real/bin/x"), b"x").unwrap();
        std::os::unix::fs::symlink("real", d.join("link")).unwrap();
        std::os::unix::fs::symlink("../real/bin/x", d.join("real/x")).unwrap();
        for p in ["link/bin/x", "real/x", "link/./bin/../bin/x", "real"] {
            let p = d.join(p);
            assert_eq!(canonical(&p), Some(std::fs::canonicalize(&p).unwrap()), "{p:?}");
        }
        assert_eq!(canonical(&d.join("missing")), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn current_dir_is_what_std_says() {
        assert_eq!(current_dir(), Some(std::env::current_dir().unwrap()));
    }

    #[test]
    fn link_target_name_is_the_targets_last_component() {
        let d = std::env::temp_dir().join(format!("nixqimg-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink("../lib/ld-2.31.so", d.join("ld")).unwrap();
        std::os::unix::fs::symlink("ld-2.27.so", d.join("plain")).unwrap();
        std::fs::write(d.join("file"), b"x").unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(link_target_name(&d.join("ld"), &mut buf), Some(&b"ld-2.31.so"[..]));
        assert_eq!(link_target_name(&d.join("plain"), &mut buf), Some(&b"ld-2.27.so"[..]));
        assert_eq!(link_target_name(&d.join("file"), &mut buf), None);
        assert_eq!(link_target_name(&d.join("missing"), &mut buf), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
