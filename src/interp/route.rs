//! Reaching qemu where it is not visible: a chroot or mount namespace that holds neither nixqimg nor
//! qemu. nixqimg got there because its binfmt_misc entry has F (the kernel opened nixqimg at
//! registration); the qemu it would exec is looked up by path and is missing. So `register` (and
//! `ns`) put a second entry beside nixqimg's own, `nixqimg-<arch>-qemu`: the architecture's magic
//! with a marker byte in EI_PAD (byte 9 = 'N'; every standard entry, nixqimg's included, requires
//! bytes 8-15 to be 0, so no real program matches it), flags OPF, interpreter a static qemu pinned
//! by F. When no qemu is visible, nixqimg copies the program's loader (a static program: the
//! program itself) into a close-on-exec memfd, sets the marker byte and execs `/proc/self/fd/N`:
//! - the kernel matches the marker entry and starts the pinned qemu;
//! - `O`: the kernel hands qemu the open file (AT_EXECFD), so qemu never needs the path, and the
//!   memfd itself closes at exec: the guest sees no descriptor it did not have;
//! - `P`: qemu (>= 6.0, from AT_FLAGS) gives the guest the argv[0] nixqimg passed. Both nixpkgs'
//!   static qemu and Debian's qemu-user-static read it; no wrapper name (Debian's
//!   `aarch64-binfmt-P`) is needed.
//!
//! The loader then runs the program as `LOADER --argv0 ARGV0 PROGRAM ARGS`. Limits, each failing
//! with a message that names the fix: `/proc` must be mounted in the chroot (the exec goes through
//! `/proc/self/fd`); the marker entry must be registered (an older registration, or `ns --flags P`);
//! a static program is copied whole, up to [`MAX_COPY`]. And the guest's `/proc/self/exe` does not
//! resolve: qemu answers it from the path it was started with, the closed memfd.
//!
//! This runs only when no qemu is visible: the normal path does not reach this module.

use super::plan::{Mode, Plan, Probe, Request};
use crate::arch::Arch;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the marker byte goes: e_ident[EI_PAD], the first padding byte.
pub const MARKER_AT: usize = 9;
pub const MARKER: u8 = b'N';
/// The flags of the marker entry (see the module docs for why each).
pub const FLAGS: &str = "OPF";
/// A static program routed through qemu is copied whole: never more than this.
pub const MAX_COPY: u64 = 512 << 20;

/// Name of the marker entry for `arch`: `nixqimg-aarch64-qemu`.
pub fn entry_name(arch: &Arch) -> String {
    format!("nixqimg-{}-qemu", arch.name)
}

/// The marker entry's magic and mask: the architecture's own, with [`MARKER`] required at [`MARKER_AT`].
pub fn magic_mask(arch: &Arch) -> (Vec<u8>, Vec<u8>) {
    let (mut magic, mut mask) = (arch.magic.to_vec(), arch.mask.to_vec());
    magic[MARKER_AT] = MARKER;
    mask[MARKER_AT] = 0xff;
    (magic, mask)
}

/// Why a routed exec could not start.
#[derive(Debug)]
pub enum RouteError {
    /// Nothing at all matched the marked file: no marker entry in this binfmt_misc instance.
    NoEntry,
    /// `/proc/self/fd` is not there (proc not mounted in the chroot).
    NoProc,
    TooBig(u64),
    /// The file's marker byte is already in use (not 0): it could not be told apart.
    Marked(PathBuf),
    Io(String, io::Error),
}

impl RouteError {
    /// The one-line message and its hint, for the interpreter's error line.
    pub fn describe(&self, arch: &Arch, looked: &str) -> (String, String) {
        let name = entry_name(arch);
        match self {
            RouteError::NoEntry => (
                format!("no qemu-{q} or qemu-{q}-static in {looked} (a chroot or container?), and no binfmt_misc entry {name} to reach the registered one", q = arch.qemu),
                format!("register with F and a static qemu installed: 'nixqimg register --replace {}' adds {name}; or install qemu-user-static inside", arch.nix_system),
            ),
            RouteError::NoProc => (
                "no qemu is visible here and /proc is not mounted, which reaching the registered qemu needs".into(),
                "mount proc in the chroot (mount -t proc proc ROOT/proc)".into(),
            ),
            RouteError::TooBig(n) => (
                format!("no qemu is visible here, and this static program ({n} bytes) is too big to hand to the registered qemu"),
                "install qemu-user-static inside the chroot".into(),
            ),
            RouteError::Marked(p) => (
                format!("{}: byte {MARKER_AT} of its ELF header is not 0, so it cannot be routed to the registered qemu", p.display()),
                "install qemu-user-static inside the chroot".into(),
            ),
            RouteError::Io(what, e) => (format!("no qemu is visible here; {what}: {e}"), String::new()),
        }
    }
}

/// What a routed exec runs: the file qemu gets (copied and marked) and the guest's argv and env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub file: PathBuf,
    pub argv: Vec<OsString>,
    pub env: Vec<OsString>,
}

/// The routed form of `plan` (made for `req` with no qemu found): loader-first for every dynamic
/// program, the program itself for a static one. A program the plan would run directly keeps what
/// direct means: its own loader at PT_INTERP with the chroot's ld.so.cache (no `--inhibit-cache`).
pub fn routed(req: &Request, plan: &Plan, probe: &dyn Probe) -> Routed {
    // qemu builds the guest's environment by pushing each of its own variables onto the head of a
    // list (see plan): handing it reversed gives the guest the caller's order. The qemu is static,
    // so LD_* in its environment cannot touch it.
    let env: Vec<OsString> = req
        .env
        .iter()
        .rev()
        .filter(|kv| !(req.secure && kv.as_bytes().starts_with(b"QEMU_")))
        .map(|kv| kv.to_os_string())
        .collect();
    let mut argv = vec![req.argv0.to_owned()];
    let file = match (&plan.mode, &req.facts.interp) {
        (Mode::LoaderFirst { loader, .. }, _) => {
            // Everything after the loader in the plan's qemu command line is the loader's own argv.
            let at = plan.argv.iter().position(|a| a == loader.as_os_str()).map_or(plan.argv.len(), |i| i + 1);
            argv.extend(plan.argv[at..].iter().map(|a| a.to_os_string()));
            loader.clone()
        }
        (Mode::Direct, Some(interp)) => {
            let loader = PathBuf::from(OsStr::from_bytes(interp));
            if probe.loader_has_argv0(&loader) {
                argv.push("--argv0".into());
                argv.push(req.argv0.to_owned());
            }
            argv.push(req.program.to_owned());
            argv.extend(req.args.iter().map(|a| a.to_os_string()));
            loader
        }
        (Mode::Direct, None) => {
            argv.extend(req.args.iter().map(|a| a.to_os_string()));
            PathBuf::from(req.program)
        }
    };
    Routed { file, argv, env }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// Copies `r.file` into a close-on-exec memfd, marks it and execs it. Returns only its error.
pub fn exec(r: &Routed) -> RouteError {
    let io = |what: &str, e: io::Error| RouteError::Io(format!("{what} {}", r.file.display()), e);
    if !Path::new("/proc/self/fd").is_dir() {
        return RouteError::NoProc;
    }
    let mut src = match File::open(&r.file) {
        Ok(f) => f,
        Err(e) => return io("cannot open", e),
    };
    let size = src.metadata().map(|m| m.len()).unwrap_or(0);
    if size > MAX_COPY {
        return RouteError::TooBig(size);
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"nixqimg-route".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return io("memfd_create for", io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    let mut mem = unsafe { File::from_raw_fd(fd) };
    // In-kernel copy (copy_file_range / sendfile) where the kernel allows it.
    if let Err(e) = io::copy(&mut src, &mut mem) {
        return io("cannot copy", e);
    }
    let mut byte = [0u8; 1];
    use std::os::unix::fs::FileExt;
    if let Err(e) = mem.read_exact_at(&mut byte, MARKER_AT as u64) {
        return io("cannot read", e);
    }
    if byte[0] != 0 {
        return RouteError::Marked(r.file.clone());
    }
    if let Err(e) = mem.seek(SeekFrom::Start(MARKER_AT as u64)).and_then(|_| mem.write_all(&[MARKER])) {
        return io("cannot mark the copy of", e);
    }
    let path = format!("/proc/self/fd/{}", mem.as_raw_fd());
    let built = || -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        Ok((
            cstring(OsStr::new(&path))?,
            r.argv.iter().map(|a| cstring(a)).collect::<io::Result<_>>()?,
            r.env.iter().map(|a| cstring(a)).collect::<io::Result<_>>()?,
        ))
    };
    let (p, argv, env) = match built() {
        Ok(b) => b,
        Err(e) => return RouteError::Io("cannot pass".into(), e),
    };
    let e = match nix::unistd::execve(&p, &argv, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    drop(mem);
    match e {
        nix::errno::Errno::ENOEXEC => RouteError::NoEntry,
        e => io("cannot exec the marked copy of", io::Error::from_raw_os_error(e as i32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ARCHES;

    #[test]
    fn no_standard_entry_takes_a_marked_file_and_the_marker_entry_takes_only_marked_ones() {
        for a in ARCHES {
            // Every entry nixqimg (and distributions) register requires the marker byte to be 0...
            assert_eq!(a.mask[MARKER_AT], 0xff, "{}", a.name);
            assert_eq!(a.magic[MARKER_AT], 0, "{}", a.name);
            let (magic, mask) = magic_mask(a);
            let mut marked = *a.magic;
            marked[MARKER_AT] = MARKER;
            let hit = |h: &[u8], m: &[u8], k: &[u8]| h.iter().zip(m).zip(k).all(|((h, m), k)| h & k == m & k);
            assert!(!hit(&marked, a.magic, a.mask), "{}: a standard entry would take the marked copy", a.name);
            assert!(hit(&marked, &magic, &mask), "{}", a.name);
            assert!(!hit(a.magic, &magic, &mask), "{}: the marker entry would take unmarked programs", a.name);
        }
    }
}
