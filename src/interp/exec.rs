//! The edge where a plan becomes a process: the real file-system [`Probe`], auxv reads, and `execve`.
//! `exec` only builds C strings and calls execve; it returns only when that failed.

use crate::interp::plan::{Plan, Probe};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The real file system.
pub struct RealProbe;

/// Loaders are a few hundred KiB; never read more than this looking for `--argv0`.
const MAX_LOADER_SCAN: u64 = 8 * 1024 * 1024;

impl Probe for RealProbe {
    fn is_file(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file())
    }
    fn list(&self, dir: &Path, prefix: &[u8]) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> =
            rd.flatten().filter(|e| e.file_name().as_bytes().starts_with(prefix)).map(|e| e.path()).take(64).collect();
        v.sort();
        v
    }
    fn loader_has_argv0(&self, loader: &Path) -> bool {
        // glibc before 2.34 installs ld-2.NN.so behind the ld-linux symlink: the name says the version.
        if let Ok(target) = std::fs::read_link(loader) {
            let name = target.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            if let Some(minor) = name.strip_prefix(b"ld-2.").and_then(|r| r.strip_suffix(b".so")) {
                if let Some(m) = std::str::from_utf8(minor).ok().and_then(|m| m.parse::<u32>().ok()) {
                    return m >= 33;
                }
            }
        }
        // Otherwise look for the option's own spelling in the loader (it is in its usage text).
        // Map it rather than copy it: the string sits two thirds into a 200 KiB file, and page-cache
        // faults are cheaper than copying every byte (this runs on every loader-first exec).
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::File::open(loader) else { return false };
        let size = f.metadata().map_or(0, |m| m.len()).min(MAX_LOADER_SCAN) as usize;
        if size == 0 {
            return false;
        }
        // SAFETY: a private read-only mapping of `size` bytes of an open regular file; the slice is
        // only read while the mapping lives and is unmapped right after. A file truncated meanwhile
        // could raise SIGBUS; loaders in a store are immutable.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0);
            if p == libc::MAP_FAILED {
                return false;
            }
            let found = memchr::memmem::find(std::slice::from_raw_parts(p as *const u8, size), b"--argv0").is_some();
            libc::munmap(p, size);
            found
        }
    }
    fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }
}

/// `getauxval`, 0 when absent.
pub fn auxv(key: libc::c_ulong) -> u64 {
    // SAFETY: getauxval only reads the process's auxiliary vector, has no preconditions and returns
    // 0 for absent keys.
    unsafe { libc::getauxval(key) as u64 }
}

pub fn page_size() -> u64 {
    match auxv(libc::AT_PAGESZ) {
        0 => 4096,
        n => n,
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "an argument or environment entry contains a NUL byte")
    })
}

/// Replaces this process with the plan's program. Returns only the error of a failed exec.
pub fn exec(plan: &Plan) -> io::Error {
    let build = || -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let exe = cstring(plan.exe.as_os_str())?;
        let argv = plan.argv.iter().map(|a| cstring(a)).collect::<io::Result<Vec<_>>>()?;
        let env = plan.env.iter().map(|a| cstring(a)).collect::<io::Result<Vec<_>>>()?;
        Ok((exe, argv, env))
    };
    match build() {
        Ok((exe, argv, env)) => match nix::unistd::execve(&exe, &argv, &env) {
            Err(e) => io::Error::from_raw_os_error(e as i32),
            Ok(never) => match never {},
        },
        Err(e) => e,
    }
}

/// Is this process chrooted? Its root differs from init's (`/proc/1/root`), or, where init's root
/// cannot be read (containers deny it), no mount is at `/` in our own mountinfo: the kernel lists only
/// mounts under the caller's root, and a chroot into a plain directory leaves the root mount above it.
/// None when /proc cannot say. Only error paths ask.
pub fn chrooted() -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/").ok()?;
    if let Ok(init) = std::fs::metadata("/proc/1/root/") {
        return Some((own.dev(), own.ino()) != (init.dev(), init.ino()));
    }
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    let root_mounted = info.split(|&b| b == b'\n').any(|l| l.split(|&b| b == b' ').nth(4) == Some(b"/"));
    if root_mounted {
        None
    } else {
        Some(true)
    }
}
