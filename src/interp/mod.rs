//! Interpreter mode: what runs when the kernel's binfmt_misc starts nixqimg for a foreign ELF.
//!
//! The kernel (registration flag `P`) gives us `[nixqimg, PATH, ARGV0, ARGS...]` and sets bit 0 of
//! AT_FLAGS; with `O`/`C` it also opens the program for us (AT_EXECFD). This path runs for every
//! foreign exec of a build: no clap, no logging unless asked, bounded reads, and on failure one line
//! `nixqimg: PATH: what went wrong (what to do)` with exit 126, or 127 when a file is missing.
//!
//! The folder is the hot path: `mod.rs` (the binfmt entry point) → `elf` (bounded reads of the ELF's
//! facts) → `plan` (pure: facts + host facts → the exec) → `exec` (the execve edge), with `config`.
//! It imports only the shared leaves `arch`, `error` and `logging` (tests/layout.rs keeps it so), so it
//! could be built alone as a separate binary should a measurement ask for one.

pub mod config;
pub mod elf;
pub mod exec;
#[cfg(test)]
mod fuzz;
mod paths;
pub mod plan;
pub mod route;
pub mod sys;

use crate::arch::Arch;
use crate::error::code;
use config::Config;
use exec::RealProbe;
use plan::{PlanError, Probe, Request};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Name under which nixqimg assumes `P`-style argv even where the kernel does not set AT_FLAGS
/// (Linux < 5.12): register a symlink with this name.
pub const BINFMT_NAME: &str = "nixqimg-binfmt";

/// Did the kernel start us as a `P` interpreter?
pub fn started_by_binfmt(argv0: Option<&OsStr>) -> bool {
    exec::auxv(libc::AT_FLAGS) & 1 != 0
        || argv0.and_then(|a| paths::file_name(Path::new(a))).is_some_and(|n| n == BINFMT_NAME)
}

struct Fail {
    what: String,
    hint: &'static str,
    code: u8,
}

/// Runs the interpreter; returns the exit code only when it could not exec qemu. `argv` holds the C
/// strings `args` was made from, index for index, or nothing.
pub fn main(args: &[&OsStr], argv: &[*const libc::c_char]) -> u8 {
    let path = args.get(1).copied().unwrap_or_default();
    match run(args, argv) {
        Ok(never) => match never {},
        Err(f) => {
            let _ = std::io::stderr().write_all(&error_line(path.as_bytes(), &f.what, f.hint));
            f.code
        }
    }
}

/// The longest error line the interpreter writes, newline included.
pub const MAX_LINE: usize = 4096;

/// `nixqimg: PATH: WHAT (HINT)\n`, at most [`MAX_LINE`] bytes: a longer path or message (a hostile
/// PT_INTERP, a RUNPATH of thousands of directories) is cut with `… (N bytes left out)`, and the hint
/// is always kept whole.
pub fn error_line(path: &[u8], what: &str, hint: &str) -> Vec<u8> {
    let mut tail = Vec::new();
    if !hint.is_empty() {
        let _ = write!(tail, " ({hint})");
    }
    tail.push(b'\n');
    let mut body = b"nixqimg: ".to_vec();
    body.extend_from_slice(path);
    body.extend_from_slice(b": ");
    body.extend_from_slice(what.as_bytes());
    if body.len() + tail.len() > MAX_LINE {
        // Room for the marker with the widest count there can be.
        let keep = MAX_LINE.saturating_sub(tail.len() + "… ( bytes left out)".len() + 20);
        // Cut on a UTF-8 character boundary where the text has one.
        let mut cut = keep.min(body.len());
        while cut > keep.saturating_sub(3) && cut > 0 && body.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
            cut -= 1;
        }
        let left_out = body.len() - cut;
        body.truncate(cut);
        let _ = write!(body, "… ({left_out} bytes left out)");
    }
    body.extend_from_slice(&tail);
    body
}

enum Never {}

fn run(args: &[&OsStr], argv: &[*const libc::c_char]) -> Result<Never, Fail> {
    if args.len() < 3 {
        return Err(Fail {
            what: "started as a binfmt_misc interpreter without the P flag's argv".into(),
            hint: "register with 'nixqimg register', which always sets P",
            code: code::CANNOT_EXEC,
        });
    }
    let secure = exec::auxv(libc::AT_SECURE) != 0;
    let execfd = exec::auxv(libc::AT_EXECFD);
    let self_exe = own_path(args[0]);
    // SAFETY: the interpreter sets no environment variable before its execve.
    let environ = unsafe { environ_view() };
    let entries = config::Entries::new(&environ);
    let env: &dyn config::Env = if secure { &config::NoEnv } else { &entries };
    let cfg = config::load(self_exe.as_deref(), env, secure);
    let log = crate::logging::init(cfg.log.as_deref(), cfg.log_file.as_deref());

    let path = args[1];
    // With O/C the kernel opened the program for us (kernel_opened says what we do with it).
    let (file, program) = if execfd > 0 && execfd < i32::MAX as u64 {
        kernel_opened(execfd as i32, path, secure)
    } else {
        let f = sys::open_read(Path::new(path)).map_err(open_fail)?;
        (ManuallyDrop::new(f), path.to_os_string())
    };
    // qemu answers the guest's /proc/self/exe from the path it was given, resolved when asked: a
    // relative one breaks as soon as the program changes directory (qemu 7.2). Hand it an absolute one.
    let program = absolute(program);
    let facts = elf::read(&file).map_err(elf_fail)?;
    if log {
        log_facts(&facts);
    }
    let req = Request {
        program: &program,
        path,
        argv0: args[2],
        args: &args[3..],
        env: &environ,
        facts: &facts,
        // Which qemu is found out below, by exec'ing it.
        qemu: PathBuf::new(),
        strategy: cfg.strategy,
        sysroots: &cfg.sysroots,
        page_size: exec::page_size(),
        secure,
        explain: cfg.log.is_some(),
    };
    let mut plan = plan::plan(&req, &RealProbe).map_err(plan_fail)?;
    if log {
        return Err(logged_exec(&req, plan, &cfg));
    }
    let names = qemu_names(facts.arch);
    // The arrays execve takes are built once; each candidate changes only the path, which execve
    // also gets as argv[0] (plan.argv[0] is not read again).
    let own_args = exec::Own { view: args, ptrs: argv };
    // SAFETY: read while nothing changes the environment (environ_view's own condition).
    let own_env = exec::Own { view: &environ, ptrs: unsafe { environ_ptrs() } };
    // SAFETY: `environ` was made from these very pointers (environ_view), `args` from `argv` (the
    // caller's promise); nothing here sets a variable or writes an argument before the exec.
    let mut call = unsafe { exec::Execve::with_own(&plan, own_args, own_env) };
    for dir in &cfg.qemu_dirs {
        for name in &names {
            plan.exe = paths::join(dir, name);
            let e = match &mut call {
                Some(c) => c.exec(&plan.exe),
                None => exec::nul_error(),
            };
            // Each candidate is exec'd outright, and only a failed exec asks whether it is a file at
            // all: a qemu that is a file but cannot start (a dynamic qemu whose loader the sandbox
            // hides fails with ENOENT too) is reported, as when it was looked for first. A stat per
            // exec saved; a stat costs 1.5 to 3.5 us on these machines.
            if RealProbe.is_file(&plan.exe) {
                return Err(exec_fail(e, &plan));
            }
        }
    }
    // No qemu visible (a chroot or container holding neither nixqimg nor qemu): the exec goes to the
    // qemu that nixqimg's marker entry pinned (crate::route).
    Err(routed_exec(&req, &plan, &cfg))
}

/// `qemu-<arch>-static` and `qemu-<arch>`, static first: it also works inside a Nix sandbox, where a
/// dynamic qemu's libraries are not visible.
fn qemu_names(arch: &Arch) -> [OsString; 2] {
    // Built by hand, not with format!: nothing on the interpreter's success path touches core::fmt,
    // whose code would be paged in for two short names.
    let name = |suffix: &str| {
        let mut n = OsString::with_capacity(5 + arch.qemu.len() + suffix.len());
        n.push("qemu-");
        n.push(arch.qemu);
        n.push(suffix);
        n
    };
    [name("-static"), name("")]
}

/// Points the plan at `dir/name` as the qemu to exec, its path and its argv[0], so that the log shows
/// the command line as made.
fn aim(plan: &mut plan::Plan, dir: &Path, name: &OsStr) {
    plan.exe = paths::join(dir, name);
    if let Some(a0) = plan.argv.first_mut() {
        *a0 = std::borrow::Cow::Owned(paths::join(dir, name).into_os_string());
    }
}

/// With a log asked for, the qemu is looked for first, as `find_qemu` does for the CLI, so that the
/// log names the exec that is made, not each one tried.
#[cold]
#[inline(never)]
fn logged_exec(req: &Request, mut plan: plan::Plan, cfg: &Config) -> Fail {
    let Some(q) = find_qemu(cfg, req.facts.arch, &RealProbe) else {
        return routed_exec(req, &plan, cfg);
    };
    if let (Some(dir), Some(name)) = (paths::dir_of(&q), paths::file_name(&q)) {
        aim(&mut plan, dir, name);
    }
    log_exec(&plan);
    let e = exec::exec(&plan);
    exec_fail(e, &plan)
}

// What only a failure, a log or an O/C registration needs is kept out of `run`, each `#[cold]` (so
// in .text.unlikely, apart from the interpreter's hot text, src/interp/text-order.ld): inlined, the
// error wording, tracing's event code and the AT_EXECFD checks made `run` spread its code over two
// 64 KiB fault-around windows.

/// With O/C the kernel opened the program for us: use that file, race-free. qemu must open it again
/// by a path, and whatever fd is open at our exec is open in the guest too (qemu closes only its
/// own). So when the path still names the same file and we can read it, hand qemu the path and let
/// the kernel's fd close at exec; else (an execute-only file, or a setuid program, where a swapped
/// path would run another file with raised credentials) /proc/self/fd/N, and the guest inherits fd N.
#[cold]
#[inline(never)]
fn kernel_opened(execfd: i32, path: &OsStr, secure: bool) -> (ManuallyDrop<File>, OsString) {
    // SAFETY: the kernel put an open fd of the program into AT_EXECFD for this process; it stays
    // open (ManuallyDrop) in case qemu has to open it again through /proc/self/fd.
    let f = ManuallyDrop::new(unsafe { File::from_raw_fd(execfd) });
    if !secure && same_readable_file(&f, path) {
        // SAFETY: F_SETFD on the fd the kernel gave us; no memory is involved.
        unsafe { libc::fcntl(execfd, libc::F_SETFD, libc::FD_CLOEXEC) };
        (f, path.to_os_string())
    } else {
        (f, OsString::from(format!("/proc/self/fd/{execfd}")))
    }
}

#[cold]
#[inline(never)]
fn open_fail(e: std::io::Error) -> Fail {
    Fail {
        code: if e.kind() == std::io::ErrorKind::NotFound { code::NOT_FOUND } else { code::CANNOT_EXEC },
        what: format!("cannot open: {e}"),
        hint: "",
    }
}

#[cold]
#[inline(never)]
fn elf_fail(e: elf::ElfError) -> Fail {
    Fail {
        what: e.to_string(),
        hint: match e {
            elf::ElfError::UnknownMachine { .. } => "see 'nixqimg status' for the architectures nixqimg serves",
            elf::ElfError::Io(_) => "",
            _ => "the file is damaged or not a program; binfmt_misc matched only its first 20 bytes",
        },
        code: code::CANNOT_EXEC,
    }
}

#[cold]
#[inline(never)]
fn plan_fail(e: PlanError) -> Fail {
    Fail {
        what: e.to_string(),
        hint: match e {
            PlanError::LoaderMissing { .. } => "inside a Nix build: is the loader's store path an input? else set sysroot in nixqimg.conf or NIXQIMG_SYSROOT",
        },
        code: code::NOT_FOUND,
    }
}

#[cold]
#[inline(never)]
fn exec_fail(e: std::io::Error, plan: &plan::Plan) -> Fail {
    Fail {
        code: if e.kind() == std::io::ErrorKind::NotFound { code::NOT_FOUND } else { code::CANNOT_EXEC },
        what: format!("cannot exec {}: {e}", plan.exe.display()),
        hint: "inside a Nix sandbox qemu must be visible: add it to extra-sandbox-paths (see 'nixqimg nix-config')",
    }
}

#[cold]
#[inline(never)]
fn log_facts(facts: &elf::ElfFacts) {
    tracing::debug!(arch = facts.arch.name, interp = ?facts.interp.as_deref().map(String::from_utf8_lossy), "elf");
}

#[cold]
#[inline(never)]
fn log_exec(plan: &plan::Plan) {
    tracing::debug!(argv = ?plan.argv, why = ?plan.why, "exec");
}

/// The exec through the marker entry, when no qemu is visible; returns only its failure. Never inlined
/// into `run`: its memfd copy keeps an 8 KiB buffer on the stack, and a frame that size is probed page
/// by page on every exec, routed or not.
#[cold]
#[inline(never)]
fn routed_exec(req: &Request, plan: &plan::Plan, cfg: &Config) -> Fail {
    let r = route::routed(req, plan, &RealProbe);
    tracing::debug!(file = ?r.file, argv = ?r.argv, why = ?plan.why, "routed exec");
    let e = route::exec(&r);
    let (what, mut hint) = e.describe(req.facts.arch, &join_dirs(&cfg.qemu_dirs));
    if matches!(e, route::RouteError::NoEntry) && std::env::var_os("NIX_BUILD_TOP").is_some() {
        hint = no_qemu_hint(true, None).to_string();
    }
    Fail {
        what: if hint.is_empty() { what } else { format!("{what} ({hint})") },
        hint: "",
        code: if matches!(e, route::RouteError::NoEntry | route::RouteError::NoProc) {
            code::NOT_FOUND
        } else {
            code::CANNOT_EXEC
        },
    }
}

/// nixqimg's own path, whose directory holds nixqimg.conf and may hold qemu. Under P the kernel's
/// argv[0] is the interpreter path as registered; when that is an absolute path naming a regular file
/// (not a symlink) it is this file, and one lstat on it is cheap. Reading /proc/self/exe instead
/// cost between 4 and 40 us per exec in A/B runs of benches/interp's setup (procfs sets up the new
/// process's entries); it stays the answer for a symlink, the `nixqimg-binfmt` link included, or a
/// relative or vanished path.
fn own_path(argv0: &OsStr) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if argv0.as_bytes().first() == Some(&b'/') && sys::is_plain_file(p) {
        return Some(p.to_path_buf());
    }
    std::fs::read_link("/proc/self/exe").ok()
}

/// `p` made absolute against the working directory (unchanged if absolute, or if there is none).
fn absolute(p: OsString) -> OsString {
    if p.as_bytes().first() == Some(&b'/') {
        return p;
    }
    match sys::current_dir().or_else(cold_current_dir) {
        Some(d) => paths::join(&d, &p).into_os_string(),
        None => p,
    }
}

/// std's answer, for a working directory sys::current_dir could not give (deeper than PATH_MAX).
#[cold]
#[inline(never)]
fn cold_current_dir() -> Option<PathBuf> {
    std::env::current_dir().ok()
}

/// Does `path` open, for reading by us, the very file `f` is (same device and inode)?
fn same_readable_file(f: &File, path: &OsStr) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (f.metadata(), File::open(path).and_then(|p| p.metadata())) else { return false };
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Why qemu may be missing where it is looked for: not installed, or installed where this process
/// cannot see it (the Nix sandbox, a chroot or a container holding only what F pinned: nixqimg).
pub fn no_qemu_hint(in_nix_build: bool, chrooted: Option<bool>) -> &'static str {
    match (in_nix_build, chrooted) {
        (true, _) => "inside a Nix build only the sandbox's paths are visible: add the paths `nixqimg nix-config` prints to extra-sandbox-paths",
        (false, Some(true)) => "this program runs in a chroot whose files hold no qemu; qemu installed outside is not visible: put qemu-user-static inside, or register it directly with `nixqimg register --direct`",
        (false, Some(false)) => "install qemu-user-static, or set qemu_dir in nixqimg.conf beside nixqimg, or NIXQIMG_QEMU_DIR",
        (false, None) => "install qemu-user-static; if it is installed, this process cannot see it (a chroot or container): put it inside, or `nixqimg register --direct`",
    }
}

fn join_dirs(d: &[PathBuf]) -> String {
    d.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// First `qemu-<arch>-static` or `qemu-<arch>` in the configured directories (static first: it also
/// works inside a Nix sandbox, where a dynamic qemu's libraries are not visible).
pub fn find_qemu(cfg: &Config, arch: &Arch, probe: &dyn Probe) -> Option<PathBuf> {
    let names = qemu_names(arch);
    cfg.qemu_dirs.iter().find_map(|d| names.iter().map(|n| paths::join(d, n)).find(|p| probe.is_file(p)))
}

/// The environment exactly as we got it, entries without `=` included.
pub fn environ() -> Vec<OsString> {
    // SAFETY: every entry is copied before this returns; nothing changes the environment meanwhile.
    let view = unsafe { environ_view() };
    let mut out = Vec::with_capacity(view.len());
    for e in view {
        out.push(e.to_os_string());
    }
    out
}

/// The environment's entries, borrowed from the process's own strings: copying each one was a
/// tenth of the interpreter's instructions before its execve.
///
/// # Safety
/// The entries stay valid only while nobody changes the environment: setenv may free a string an
/// earlier setenv made. The caller must set no variable while the result is alive.
unsafe fn environ_view() -> Vec<&'static OsStr> {
    // SAFETY: as environ_ptrs says; the caller keeps the strings alive by changing no variable.
    let ptrs = unsafe { environ_ptrs() };
    let mut out = Vec::with_capacity(ptrs.len());
    for &p in ptrs {
        // SAFETY: each pointer is a NUL-terminated string libc set up (environ_ptrs).
        out.push(OsStr::from_bytes(unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes()));
    }
    out
}

/// The process's `environ` array, without its terminating null pointer.
///
/// # Safety
/// As for [`environ_view`]: valid only while nobody changes the environment.
unsafe fn environ_ptrs() -> &'static [*const libc::c_char] {
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: `environ` is the null-terminated array of NUL-terminated strings the kernel and libc
    // set up; this single-threaded code reads it while nothing modifies it.
    unsafe {
        let p = environ;
        if p.is_null() {
            return &[];
        }
        let mut n = 0;
        while !(*p.add(n)).is_null() {
            n += 1;
        }
        std::slice::from_raw_parts(p, n)
    }
}
