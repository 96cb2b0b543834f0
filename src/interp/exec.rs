//! The edge where a plan becomes a process: the real file-system [`Probe`], auxv reads, and `execve`.
//! `exec` only builds C strings and calls execve; it returns only when that failed.

use crate::interp::plan::{Plan, Probe};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The real file system.
pub struct RealProbe;

/// Loaders are a few hundred KiB; never read more than this looking for `--argv0`.
const MAX_LOADER_SCAN: u64 = 8 * 1024 * 1024;

impl Probe for RealProbe {
    fn is_file(&self, path: &Path) -> bool {
        crate::interp::sys::is_file(path)
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
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let Ok(f) = crate::interp::sys::open_read(loader) else { return false };
        // ld.so's own symbol versions are named in its dynamic strings, in its first 4 KiB (about 2.5
        // KiB in, for Debian 12's x86_64 and aarch64 loaders). One read settles glibc 2.34 on.
        let mut head = [0u8; 4096];
        if let Ok(n) = f.read_at(&mut head, 0) {
            if defines_glibc_2_34_or_later(&head[..n]) {
                return true;
            }
        }
        // Before 2.34 glibc installs ld-2.NN.so behind the ld-linux symlink: the name says the version.
        let mut buf = [0u8; 256];
        if let Some(name) = crate::interp::sys::link_target_name(loader, &mut buf) {
            if let Some(minor) = name.strip_prefix(b"ld-2.").and_then(|r| r.strip_suffix(b".so")) {
                if let Some(m) = std::str::from_utf8(minor).ok().and_then(|m| m.parse::<u32>().ok()) {
                    return m >= 33;
                }
            }
        }
        // Otherwise look for the option's own spelling in the loader (it is in its usage text).
        // Map it rather than copy it: the string sits two thirds into a 200 KiB file, and page-cache
        // faults are cheaper than copying every byte. Mapping and scanning it cost about 100 us per
        // loader-first exec in benches/interp, which is why the read above comes first.
        let size = crate::interp::sys::file_size(&f).unwrap_or(0).min(MAX_LOADER_SCAN) as usize;
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
        crate::interp::sys::canonical(path)
    }
}

/// Does this start of a loader name a glibc symbol version of 2.34 or later (`GLIBC_2.34`, ...)? ld.so
/// needs no other object, so every version it names is one it defines: its glibc is at least that,
/// and `--argv0` came in 2.33. Bounded: one pass over at most the bytes given.
pub fn defines_glibc_2_34_or_later(head: &[u8]) -> bool {
    // Horspool's skip over the name's last byte, not memmem (whose searcher is pages of code of its
    // own for 4 KiB of input) nor a byte-by-byte scan (20,000 instructions per loader-first exec).
    const NAME: &[u8] = b"GLIBC_2.";
    let mut i = 0;
    // A name cut at the end of the buffer proves nothing: a byte must follow it, and its digits.
    while i + NAME.len() < head.len() {
        let last = head[i + NAME.len() - 1];
        if last == b'.' && head[i..].starts_with(NAME) {
            let digits = &head[i + NAME.len()..];
            let n = digits.iter().take(4).take_while(|c| c.is_ascii_digit()).count();
            let minor = digits[..n].iter().fold(0u32, |v, &c| v * 10 + u32::from(c - b'0'));
            if n > 0 && n < digits.len() && minor >= 34 {
                return true;
            }
        }
        i += match last {
            b'G' => 7,
            b'L' => 6,
            b'I' => 5,
            b'B' => 4,
            b'C' => 3,
            b'_' => 2,
            b'2' => 1,
            _ => 8,
        };
    }
    false
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

/// Replaces this process with the plan's program. Returns only the error of a failed exec.
pub fn exec(plan: &Plan) -> io::Error {
    match Execve::new(plan) {
        Some(mut call) => call.exec(&plan.exe),
        None => nul_error(),
    }
}

/// What execve refuses before it looks at the file: a string with a NUL byte in it.
pub fn nul_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "an argument or environment entry contains a NUL byte")
}

/// The plan's arguments after argv[0] and its environment, made into execve's arrays once, so that
/// trying one qemu after another (src/interp/mod.rs) builds them once, not once per candidate.
///
/// Every string goes into one NUL-separated buffer with one pointer array per list: a CString each
/// (an allocation, a copy and a NUL scan per argument and environment entry) was the largest part of
/// the interpreter's own work before its execve.
pub struct Execve {
    /// Each string followed by its NUL; never changed after `new`, so the pointers stay valid.
    _buf: Vec<u8>,
    /// argv[0] (set by `exec`), the plan's other arguments, a null pointer.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Execve {
    /// None when a string holds a NUL byte ([`nul_error`]).
    pub fn new(plan: &Plan) -> Option<Execve> {
        let rest = plan.argv.get(1..).unwrap_or_default();
        let all = || rest.iter().chain(plan.env.iter()).map(|a| &**a);
        let mut buf: Vec<u8> = Vec::with_capacity(all().map(|s| s.len() + 1).sum());
        let mut starts = Vec::with_capacity(rest.len() + plan.env.len());
        for s in all() {
            if s.as_bytes().contains(&0) {
                return None;
            }
            starts.push(buf.len());
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
        }
        let at = |i: usize| buf[starts[i]..].as_ptr().cast::<libc::c_char>();
        // Filled by push into exact capacity: collect() and grow calls are generic code in pages of
        // their own (this path is counted in page faults, see benches/interp).
        let mut argv = Vec::with_capacity(rest.len() + 2);
        argv.push(std::ptr::null());
        for i in 0..rest.len() {
            argv.push(at(i));
        }
        argv.push(std::ptr::null());
        let mut envp = Vec::with_capacity(plan.env.len() + 1);
        for i in rest.len()..starts.len() {
            envp.push(at(i));
        }
        envp.push(std::ptr::null());
        Some(Execve { _buf: buf, argv, envp })
    }

    /// execve of `exe`, which is also the program's argv[0]. Returns only the error of a failed exec.
    pub fn exec(&mut self, exe: &Path) -> io::Error {
        let b = exe.as_os_str().as_bytes();
        if b.contains(&0) {
            return nul_error();
        }
        let mut path = Vec::with_capacity(b.len() + 1);
        path.extend_from_slice(b);
        path.push(0);
        self.argv[0] = path.as_ptr().cast();
        // SAFETY: every pointer is into `path` or the buffer `new` filled, each string followed by its
        // NUL; neither is changed or freed before execve returns; both arrays end with a null pointer,
        // as execve requires.
        unsafe { libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr()) };
        io::Error::last_os_error()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_versions_in_a_loader_head() {
        assert!(defines_glibc_2_34_or_later(b"\0ld-linux-aarch64.so.1\0GLIBC_2.17\0GLIBC_2.34\0GLIBC_PRIVATE\0"));
        assert!(defines_glibc_2_34_or_later(b"x\0GLIBC_2.40\0"));
        assert!(!defines_glibc_2_34_or_later(b"\0GLIBC_2.2.5\0GLIBC_2.3\0GLIBC_2.4\0GLIBC_2.17\0GLIBC_PRIVATE\0"));
        assert!(!defines_glibc_2_34_or_later(b"\0GLIBC_2.3"), "GLIBC_2.3 cut off may be 2.34; not proof");
        assert!(!defines_glibc_2_34_or_later(b"\0GLIBC_2.34"), "cut at the end: no terminator seen");
        assert!(!defines_glibc_2_34_or_later(b"GLIBC_2."));
        assert!(!defines_glibc_2_34_or_later(b""));
        // Every alignment of the name against the skip, and names overlapping false starts.
        for pad in 0..20 {
            let mut v = vec![b'x'; pad];
            v.extend_from_slice(b"GLIBC_GLIBC_2GLIBC_2.GLIBC_2.35\0");
            assert!(defines_glibc_2_34_or_later(&v), "pad {pad}");
            v.truncate(v.len() - 3);
            v.extend_from_slice(b"33\0");
            assert!(!defines_glibc_2_34_or_later(&v), "pad {pad}");
        }
    }

    /// The loaders on this machine: Debian's aarch64 cross glibc and the host's own.
    #[test]
    fn debian_loaders_are_answered_from_their_first_4_kib() {
        for l in ["/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1", "/lib64/ld-linux-x86-64.so.2"] {
            let Ok(d) = std::fs::read(l) else { continue };
            assert!(defines_glibc_2_34_or_later(&d[..d.len().min(4096)]), "{l}");
        }
    }
}
