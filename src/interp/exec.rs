//! The edge where a plan becomes a process: the real file-system [`Probe`], auxv reads, and `execve`.
//! `exec` only builds C strings and calls execve; it returns only when that failed.

use crate::interp::plan::{Plan, Probe};
use std::ffi::OsStr;
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

/// Does `b` hold a NUL byte? Eight bytes a step: `contains(&0)` compiles to a loop of five
/// instructions a byte, and a compiler's command line in a Nix build is kilobytes of arguments.
pub fn has_nul(b: &[u8]) -> bool {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = b.chunks_exact(8);
    // A zero byte, and only a zero byte, sets its high bit in (w - LOW) & !w (the borrow it starts
    // can set higher bytes too, but only above a zero byte, so "any" is exact).
    let zero_in = |w: u64| w.wrapping_sub(LOW) & !w & HIGH != 0;
    for w in words.by_ref() {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        if zero_in(u64::from_ne_bytes(a)) {
            return true;
        }
    }
    words.remainder().contains(&0)
}

/// What execve refuses before it looks at the file: a string with a NUL byte in it.
pub fn nul_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "an argument or environment entry contains a NUL byte")
}

/// Strings of the process's own, its arguments or its environment: as the views the interpreter
/// reads and as the C strings they were made from, index for index ([`Execve::with_own`]).
#[derive(Clone, Copy)]
pub struct Own<'a> {
    pub view: &'a [&'a OsStr],
    pub ptrs: &'a [*const libc::c_char],
}

impl Own<'_> {
    pub const NONE: Own<'static> = Own { view: &[], ptrs: &[] };

    fn len(&self) -> usize {
        self.view.len().min(self.ptrs.len())
    }

    /// Is `s` entry `j`, the same bytes at the same address?
    fn is(&self, j: usize, s: &OsStr) -> bool {
        let v = self.view[j];
        v.as_bytes().as_ptr() == s.as_bytes().as_ptr() && v.len() == s.len()
    }
}

/// The plan's arguments after argv[0] and its environment, made into execve's arrays once, so that
/// trying one qemu after another (src/interp/mod.rs) builds them once, not once per candidate.
///
/// Strings are copied into one NUL-separated buffer, with one pointer array per list: a CString each
/// (an allocation, a copy and a NUL scan per argument and environment entry) was the largest part of
/// the interpreter's own work before its execve. Environment entries that are the process's own
/// strings are not copied at all (see [`Execve::with_own`]).
pub struct Execve {
    /// Each copied string followed by its NUL; never changed after `new`, so the pointers stay valid.
    _buf: Vec<u8>,
    /// argv[0] (set by `exec`), the plan's other arguments, a null pointer.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Execve {
    /// None when a string holds a NUL byte ([`nul_error`]).
    pub fn new(plan: &Plan) -> Option<Execve> {
        // SAFETY: empty lists make no claim.
        unsafe { Execve::with_own(plan, Own::NONE, Own::NONE) }
    }

    /// As [`Execve::new`], with the strings the plan borrows from the process's own arguments and
    /// environment passed to execve as the C strings they already are: not copied and not scanned for
    /// NUL bytes. In a Nix build's environment (45 variables, 4.6 KiB) the copies had the arena touch
    /// two more pages per exec, each a page fault, and the scan cost five instructions a byte; a
    /// compiler's arguments run to kilobytes too. A string counts as the process's own when it is an
    /// entry of a view (the same bytes at the same address). The plan ends its argv with the
    /// program's arguments in order and keeps the environment in reverse (src/interp/plan.rs), so one
    /// walk back along each list finds them; from the first string not found on, the rest are copied.
    ///
    /// # Safety
    /// For `args` and for `env`: each `ptrs[j]` is a NUL-terminated string, valid and unchanged
    /// until the exec, whose bytes before the NUL are exactly `view[j]`.
    pub unsafe fn with_own(plan: &Plan, args: Own, env: Own) -> Option<Execve> {
        let rest = plan.argv.get(1..).unwrap_or_default();
        // The longest tail of `rest` that is the tail of the process's arguments.
        let mut tail = 0;
        while tail < rest.len() && tail < args.len() {
            if !args.is(args.len() - 1 - tail, &rest[rest.len() - 1 - tail]) {
                break;
            }
            tail += 1;
        }
        let head = &rest[..rest.len() - tail];
        let mut envp: Vec<*const libc::c_char> = Vec::with_capacity(plan.env.len() + 1);
        let mut copied = head.iter().map(|a| a.len() + 1).sum::<usize>();
        let mut misses = 0;
        let mut j = env.len();
        for kv in &plan.env {
            let mut own = None;
            while j > 0 {
                j -= 1;
                if env.is(j, kv) {
                    own = Some(env.ptrs[j]);
                    break;
                }
            }
            match own {
                Some(p) => envp.push(p),
                None => {
                    if has_nul(kv.as_bytes()) {
                        return None;
                    }
                    j = 0;
                    misses += 1;
                    copied += kv.len() + 1;
                    envp.push(std::ptr::null());
                }
            }
        }
        envp.push(std::ptr::null());
        let mut buf: Vec<u8> = Vec::with_capacity(copied);
        let mut starts = Vec::with_capacity(head.len() + misses);
        for a in head {
            if has_nul(a.as_bytes()) {
                return None;
            }
        }
        let copies = plan.env.iter().zip(&envp).filter(|(_, p)| p.is_null()).map(|(kv, _)| kv);
        for s in head.iter().chain(copies) {
            starts.push(buf.len());
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
        }
        let at = |i: usize| buf[starts[i]..].as_ptr().cast::<libc::c_char>();
        // Filled by push into exact capacity: collect() and grow calls are generic code in pages of
        // their own (this path is counted in page faults, see benches/interp).
        let mut argv = Vec::with_capacity(rest.len() + 2);
        argv.push(std::ptr::null());
        for i in 0..head.len() {
            argv.push(at(i));
        }
        for j in args.len() - tail..args.len() {
            argv.push(args.ptrs[j]);
        }
        argv.push(std::ptr::null());
        let mut next = head.len();
        let last = envp.len() - 1;
        for p in &mut envp[..last] {
            if p.is_null() {
                *p = at(next);
                next += 1;
            }
        }
        Some(Execve { _buf: buf, argv, envp })
    }

    /// execve of `exe`, which is also the program's argv[0]. Returns only the error of a failed exec.
    pub fn exec(&mut self, exe: &Path) -> io::Error {
        let b = exe.as_os_str().as_bytes();
        if has_nul(b) {
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

    /// The strings execve would get, read back through its arrays.
    fn strings(list: &[*const libc::c_char]) -> Vec<Vec<u8>> {
        let end = list.iter().position(|p| p.is_null()).expect("a null pointer ends the list");
        // SAFETY: every pointer before the null one is a NUL-terminated string Execve set up.
        list[..end].iter().map(|&p| unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec()).collect()
    }

    #[test]
    fn environment_entries_of_the_process_are_passed_as_they_are_and_others_copied() {
        use crate::interp::plan::Mode;
        use std::borrow::Cow;
        use std::ffi::CString;
        let own: Vec<CString> = ["A=1", "QEMU_X=2", "B=3", "C=4"].map(|s| CString::new(s).unwrap()).into();
        let view: Vec<&OsStr> = own.iter().map(|c| OsStr::from_bytes(c.to_bytes())).collect();
        let ptrs: Vec<*const libc::c_char> = own.iter().map(|c| c.as_ptr()).collect();
        let made = OsStr::new("D=5");
        let prefix = OsStr::from_bytes(&own[2].to_bytes()[..2]); // "B=", same address as "B=3"
        fn plan(env: Vec<&OsStr>) -> Plan<'_> {
            Plan {
                exe: "/q".into(),
                argv: vec![Cow::Borrowed(OsStr::new("/q")), Cow::Borrowed(OsStr::new("-0"))],
                env: env.into_iter().map(Cow::Borrowed).collect(),
                mode: Mode::Direct,
                why: Vec::new(),
            }
        }
        // SAFETY (here and below): ptrs[j] is the C string view[j] was made from, alive to the end.
        // Reversed, one left out, as plan() hands them over: all three passed by pointer.
        let p = plan(vec![view[3], view[2], view[0]]);
        let e = unsafe { Execve::with_own(&p, Own::NONE, Own { view: &view, ptrs: &ptrs }) }.unwrap();
        assert_eq!(e.envp[..3], [ptrs[3], ptrs[2], ptrs[0]]);
        assert_eq!(strings(&e.envp), [b"C=4".to_vec(), b"B=3".to_vec(), b"A=1".to_vec()]);
        assert_eq!(strings(&e.argv[1..]), [b"-0".to_vec()]);
        // A string of its own, a prefix at an environment string's address, and everything after the
        // first miss: copied, with the same bytes.
        let p = plan(vec![view[3], made, prefix, view[0]]);
        let e = unsafe { Execve::with_own(&p, Own::NONE, Own { view: &view, ptrs: &ptrs }) }.unwrap();
        assert_eq!(e.envp[0], ptrs[3]);
        assert!(!e.envp[1..4].contains(&ptrs[2]) && !e.envp[1..4].contains(&ptrs[0]));
        assert_eq!(strings(&e.envp), [b"C=4".to_vec(), b"D=5".to_vec(), b"B=".to_vec(), b"A=1".to_vec()]);
        // Without the process's strings every entry is copied; a NUL in a copied one is refused.
        let e = Execve::new(&p).unwrap();
        assert!(!e.envp.contains(&ptrs[3]));
        assert_eq!(strings(&e.envp).len(), 4);
        assert!(Execve::new(&plan(vec![OsStr::from_bytes(b"E=\0x")])).is_none());
    }

    #[test]
    fn the_programs_own_arguments_at_the_end_are_passed_as_they_are() {
        use crate::interp::plan::Mode;
        use std::borrow::Cow;
        use std::ffi::CString;
        let own: Vec<CString> = ["nixqimg", "/p", "a0", "x", "y z"].map(|s| CString::new(s).unwrap()).into();
        let view: Vec<&OsStr> = own.iter().map(|c| OsStr::from_bytes(c.to_bytes())).collect();
        let ptrs: Vec<*const libc::c_char> = own.iter().map(|c| c.as_ptr()).collect();
        let lit = |s: &'static str| Cow::Borrowed(OsStr::new(s));
        fn plan(argv: Vec<Cow<'_, OsStr>>) -> Plan<'_> {
            Plan { exe: "/q".into(), argv, env: Vec::new(), mode: Mode::Direct, why: Vec::new() }
        }
        // SAFETY (both calls below): ptrs[j] is the C string view[j] was made from, alive to the end.
        let args = Own { view: &view, ptrs: &ptrs };
        // As plan() makes it: argv0 borrowed mid-way, the program's path made absolute, then the
        // arguments. Only the tail that is the process's own goes by pointer.
        let p = plan(vec![
            lit("/q"),
            lit("-0"),
            Cow::Borrowed(view[2]),
            lit("--"),
            lit("/abs/p"),
            Cow::Borrowed(view[3]),
            Cow::Borrowed(view[4]),
        ]);
        let e = unsafe { Execve::with_own(&p, args, Own::NONE) }.unwrap();
        assert_eq!(e.argv[5..7], [ptrs[3], ptrs[4]]);
        assert!(!e.argv.contains(&ptrs[2]), "argv0 is not in the tail: copied");
        let want: Vec<Vec<u8>> =
            ["-0", "a0", "--", "/abs/p", "x", "y z"].iter().map(|s| s.as_bytes().to_vec()).collect();
        assert_eq!(strings(&e.argv[1..]), want);
        // A tail that stops matching (a copy of "y z" at another address) is copied from there back.
        let p = plan(vec![lit("/q"), Cow::Borrowed(view[3]), lit("y z")]);
        let e = unsafe { Execve::with_own(&p, args, Own::NONE) }.unwrap();
        assert!(!e.argv.contains(&ptrs[3]) && !e.argv.contains(&ptrs[4]));
        assert_eq!(strings(&e.argv[1..]), [b"x".to_vec(), b"y z".to_vec()]);
    }

    #[test]
    fn has_nul_finds_a_zero_at_every_place_and_nothing_else() {
        for len in 0..40 {
            let none: Vec<u8> = (0..len).map(|i| [1u8, 0x80, 0xff, 0x7f, b'a'][i % 5]).collect();
            assert!(!has_nul(&none), "len {len}");
            for at in 0..len {
                let mut v = none.clone();
                v[at] = 0;
                assert!(has_nul(&v), "len {len}, zero at {at}");
            }
        }
        // A 0x01 byte after a 0x00-free run borrows in (w - LOW): it must not read as a zero.
        assert!(!has_nul(&[0x01, 0x01, 0x80, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01]));
    }

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
