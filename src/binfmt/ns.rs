//! `nixqimg ns`: runs a command in a new user + mount namespace whose own binfmt_misc instance holds
//! nixqimg's registrations (Linux >= 6.7 gives each user namespace one). No root needed, nothing
//! global changes, and it all goes away with the command.
//!
//! The uid/gid maps are written by the parent, not by the child itself: a process may only map its
//! own ids after denying setgroups, and single-user Nix 2.8 calls setgroups when it starts a sandboxed
//! build. So the child unshares and waits on a pipe while the parent (root outside) writes the maps.

use crate::arch::Arch;
use crate::error::{code, Error, Result};
use ::nix::errno::Errno;
use ::nix::mount::{mount, MsFlags};
use ::nix::sched::{unshare, CloneFlags};
use ::nix::sys::signal::{self, SigHandler, Signal};
use ::nix::sys::wait::{waitpid, WaitStatus};
use ::nix::unistd::{fork, ForkResult, Pid};
use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Systems to register (e.g. aarch64-linux,riscv64-linux); default: every foreign system a
    /// qemu-user is installed for.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// binfmt_misc flags; P is always added. F (the default) pins nixqimg so a Nix sandbox sees it.
    #[arg(long, default_value = "F")]
    pub flags: String,
    /// The nixqimg to register; default: this binary (it should be static for Nix sandboxes).
    #[arg(long)]
    pub interpreter: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// What to register in the namespace.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arches: Vec<&'static Arch>,
    pub interpreter: PathBuf,
    pub flags: String,
}

/// Each setup step that can fail, kept apart so the message names the step and the errno.
#[derive(Debug)]
pub enum NsError {
    OldKernel(String),
    Nul(String),
    Pipe(Errno),
    Fork(Errno),
    /// With whether this process is chrooted (None: /proc cannot tell).
    Unshare(Errno, Option<bool>),
    Maps(String, std::io::Error),
    MountPrivate(Errno),
    MountBinfmt(Errno),
    Register(String, std::io::Error),
    Exec(String, Errno),
    Wait(Errno),
    /// The child died before telling us anything.
    Lost,
}

impl From<NsError> for Error {
    fn from(e: NsError) -> Error {
        match e {
            NsError::OldKernel(r) => Error::new(format!("Linux {r} has no binfmt_misc per user namespace (needs 6.7)"))
                .hint("register globally instead: `nixqimg register` as root, or the NixOS module nixqimg.binfmt")
                .code(code::CANNOT_EXEC),
            NsError::Nul(a) => Error::new(format!("argument {a:?} holds a NUL byte")).code(code::USAGE),
            NsError::Pipe(e) => Error::new(format!("ns: pipe: {e}")),
            NsError::Fork(e) => Error::new(format!("ns: fork: {e}")),
            NsError::Unshare(Errno::EPERM, Some(true)) => Error::new(
                "ns: this process runs in a chroot, and the kernel refuses new user namespaces to chrooted processes",
            )
            .hint("start nixqimg ns outside the chroot and chroot inside it: nixqimg ns -- chroot DIR COMMAND...")
            .code(code::CANNOT_EXEC),
            NsError::Unshare(Errno::EPERM, None) => Error::new(format!("ns: cannot create a user+mount namespace: {}", Errno::EPERM))
                .hint("in a chroot the kernel refuses it (run nixqimg ns outside, then chroot inside); else unprivileged user namespaces may be off: sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces")
                .code(code::CANNOT_EXEC),
            NsError::Unshare(e, _) => Error::new(format!("ns: cannot create a user+mount namespace: {e}"))
                .hint("unprivileged user namespaces may be off: sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces")
                .code(code::CANNOT_EXEC),
            NsError::Maps(f, e) => Error::new(format!("ns: writing {f}: {e}")).code(code::CANNOT_EXEC),
            NsError::MountPrivate(e) => Error::new(format!("ns: making mounts private: {e}")).code(code::CANNOT_EXEC),
            NsError::MountBinfmt(e) => {
                Error::new(format!("ns: mounting binfmt_misc in the namespace: {e}"))
                    .hint("needs Linux >= 6.7 with binfmt_misc; else `nixqimg register` as root")
                    .code(code::CANNOT_EXEC)
            }
            NsError::Register(l, e) => Error::new(format!("ns: registering {l}: {e}")).code(code::CANNOT_EXEC),
            NsError::Exec(c, e) => Error::new(format!("{c}: {}", e.desc())).code(if e == Errno::ENOENT {
                code::NOT_FOUND
            } else {
                code::CANNOT_EXEC
            }),
            NsError::Wait(e) => Error::new(format!("ns: wait: {e}")),
            NsError::Lost => Error::new("ns: the namespace's first process died during setup"),
        }
    }
}

/// Does this kernel release (`uname -r`) have binfmt_misc per user namespace (>= 6.7)?
pub fn kernel_supports(release: &str) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// The maps the parent writes: the caller's own ids become root inside. Root outside maps every id
/// to itself, so file owners look the same inside; anyone else can map only their own id, and must
/// then deny setgroups (which Nix's sandbox will miss).
pub fn id_maps(uid: u32, gid: u32) -> (String, Option<&'static str>, String) {
    if uid == 0 {
        ("0 0 4294967295".into(), None, "0 0 4294967295".into())
    } else {
        (format!("0 {uid} 1"), Some("deny"), format!("0 {gid} 1"))
    }
}

/// A running command in its namespace.
pub struct Child {
    pid: Pid,
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
pub fn status_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

impl Child {
    pub fn wait(self) -> Result<i32> {
        loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, c)) => return Ok(c),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(NsError::Wait(e).into()),
            }
        }
    }
}

/// Set to 1 in the command's environment, so `doctor` run inside can tell the private instance from
/// the host's (together with the user namespace it runs in, which the variable alone cannot prove).
pub const MARKER: &str = "NIXQIMG_NS";

/// Starts `argv` in a fresh namespace set up as `spec` says, optionally with `stdout`/`stderr`
/// redirected. Returns once the command runs (or with the setup step that failed).
pub fn spawn(spec: &Spec, argv: &[OsString], stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) -> Result<Child> {
    let release = ::nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    if !kernel_supports(&release) {
        return Err(NsError::OldKernel(release).into());
    }
    let mut lines: Vec<String> = spec
        .arches
        .iter()
        .map(|a| crate::binfmt::registration_line(a, &crate::binfmt::entry_name(a), &spec.interpreter, &spec.flags))
        .collect::<Result<_>>()?;
    // With F, nixqimg runs in chroots and mount namespaces that hide qemu: the marker entries carry
    // those execs to a pinned static qemu (crate::route).
    if spec.flags.to_ascii_uppercase().contains('F') {
        lines.extend(crate::binfmt::marker_lines(&spec.arches));
    }
    let cargv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| NsError::Nul(a.to_string_lossy().into_owned())))
        .collect::<Result<_, _>>()?;
    if cargv.is_empty() {
        return Err(Error::new("ns: no command given").code(code::USAGE));
    }
    let shown = argv[0].to_string_lossy().into_owned();
    let pipe = || ::nix::unistd::pipe2(::nix::fcntl::OFlag::O_CLOEXEC).map_err(NsError::Pipe);
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (report_r, report_w) = pipe()?;
    // SAFETY: nixqimg is single-threaded here (no thread is started before a command runs), so the
    // child may allocate and call anything; it only sets up the namespace and execs or exits.
    match unsafe { fork() }.map_err(NsError::Fork)? {
        ForkResult::Child => {
            drop((ready_r, go_w, report_r));
            let failure = child_setup(ready_w, go_r, &lines, stdout, stderr, &cargv);
            let (step, errno) = failure;
            let mut w = std::fs::File::from(report_w);
            let _ = w.write_all(format!("{step}\0{}", errno as i32).as_bytes());
            // SAFETY: _exit skips the parent's atexit handlers and buffers, which a fork child must not run.
            unsafe { libc::_exit(if errno == Errno::ENOENT { 127 } else { 126 }) }
        }
        ForkResult::Parent { child } => {
            drop((ready_w, go_r, report_w, stdout, stderr));
            let c = Child { pid: child };
            match parent_setup(child, ready_r, go_w, report_r, &shown) {
                Ok(()) => Ok(c),
                Err(e) => {
                    let _ = signal::kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    Err(e)
                }
            }
        }
    }
}

fn parent_setup(child: Pid, ready_r: OwnedFd, go_w: OwnedFd, report_r: OwnedFd, shown: &str) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut ready = std::fs::File::from(ready_r);
    let unshared = matches!(ready.read(&mut byte), Ok(1));
    if unshared {
        let (uid_map, setgroups, gid_map) = id_maps(::nix::unistd::getuid().as_raw(), ::nix::unistd::getgid().as_raw());
        let proc = PathBuf::from(format!("/proc/{child}"));
        let write = |f: &str, s: &str| std::fs::write(proc.join(f), s).map_err(|e| NsError::Maps(f.to_string(), e));
        write("uid_map", &uid_map)?;
        if let Some(s) = setgroups {
            write("setgroups", s)?;
        }
        write("gid_map", &gid_map)?;
        std::fs::File::from(go_w).write_all(b"g").map_err(|e| NsError::Maps("go pipe".into(), e))?;
    } else {
        drop(go_w);
    }
    // The report pipe is close-on-exec: EOF with nothing in it means the command is running.
    let mut report = Vec::new();
    let _ = std::fs::File::from(report_r).read_to_end(&mut report);
    if report.is_empty() {
        return if unshared { Ok(()) } else { Err(NsError::Lost.into()) };
    }
    let text = String::from_utf8_lossy(&report);
    let (step, errno) = text.split_once('\0').unwrap_or((&text, "0"));
    let errno = Errno::from_raw(errno.parse().unwrap_or(0));
    Err(match step {
        "unshare" => NsError::Unshare(errno, crate::interp::exec::chrooted()),
        "private" => NsError::MountPrivate(errno),
        "binfmt" => NsError::MountBinfmt(errno),
        "exec" => NsError::Exec(shown.to_string(), errno),
        "dup" => NsError::Pipe(errno),
        s if s.starts_with("register ") => {
            NsError::Register(s["register ".len()..].to_string(), std::io::Error::from_raw_os_error(errno as i32))
        }
        _ => NsError::Lost,
    }
    .into())
}

/// Everything the child does; returns only on failure, naming the step.
fn child_setup(
    ready_w: OwnedFd,
    go_r: OwnedFd,
    lines: &[String],
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    argv: &[CString],
) -> (String, Errno) {
    // The command must not outlive nixqimg (nothing left running after a kill).
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        return ("unshare".into(), e);
    }
    if std::fs::File::from(ready_w).write_all(b"r").is_err() {
        return ("unshare".into(), Errno::EPIPE);
    }
    let mut b = [0u8; 1];
    if !matches!(std::fs::File::from(go_r).read(&mut b), Ok(1)) {
        return ("unshare".into(), Errno::EPIPE);
    }
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>) {
        return ("private".into(), e);
    }
    let dir = crate::binfmt::entries::DIR;
    if let Err(e) = mount(Some("binfmt_misc"), dir, Some("binfmt_misc"), MsFlags::empty(), None::<&str>) {
        return ("binfmt".into(), e);
    }
    for l in lines {
        let name = l.split(':').nth(1).unwrap_or("").to_string();
        let res = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{dir}/register"))
            .and_then(|mut f| f.write_all(l.as_bytes()));
        if let Err(e) = res {
            return (format!("register {name}"), Errno::from_raw(e.raw_os_error().unwrap_or(0)));
        }
    }
    for (fd, target) in [(stdout, 1), (stderr, 2)] {
        if let Some(fd) = fd {
            // SAFETY: dup2 onto 1/2 replaces our own stdout/stderr; both fds are valid and owned here.
            if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                return ("dup".into(), Errno::last());
            }
        }
    }
    let _ = unsafe_reset_signals();
    // The child is single-threaded (forked from a single-threaded nixqimg), so changing its
    // environment cannot race a reader.
    std::env::set_var(MARKER, "1");
    match ::nix::unistd::execvp(&argv[0], argv) {
        Err(e) => ("exec".into(), e),
        Ok(never) => match never {},
    }
}

/// The command starts with default signal handling whatever nixqimg's parent left ignored.
fn unsafe_reset_signals() -> Result<(), Errno> {
    for s in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGPIPE] {
        // SAFETY: SigDfl installs no handler code; nothing else in this process uses these signals.
        unsafe { signal::signal(s, SigHandler::SigDfl) }?;
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let (interpreter, warning) = crate::binfmt::choose::interpreter(a.interpreter.as_deref())?;
    let arches = crate::binfmt::choose::systems(&a.systems, &interpreter)?;
    crate::binfmt::normalize_flags(&a.flags)?;
    if let Some(w) = warning {
        eprintln!("nixqimg: warning: {w}");
    }
    let spec = Spec { arches, interpreter, flags: a.flags };
    let child = spawn(&spec, &a.command, None, None)?;
    // Ctrl-C reaches the whole foreground group, the command included: let it decide, and report
    // its status rather than dying first.
    for s in [Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: SigIgn installs no handler code.
        let _ = unsafe { signal::signal(s, SigHandler::SigIgn) };
    }
    let status = child.wait()?;
    let _ = std::io::stdout().flush();
    std::process::exit(status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(kernel_supports("6.7.0"));
        assert!(kernel_supports("6.18.44-fc-v657"));
        assert!(kernel_supports("7.0-rc1"));
        assert!(!kernel_supports("6.6.30-generic"));
        assert!(!kernel_supports("5.15.0"));
        assert!(!kernel_supports(""));
    }

    #[test]
    fn root_maps_everything_others_only_themselves_and_lose_setgroups() {
        assert_eq!(id_maps(0, 0), ("0 0 4294967295".into(), None, "0 0 4294967295".into()));
        assert_eq!(id_maps(1000, 100), ("0 1000 1".into(), Some("deny"), "0 100 1".into()));
    }
}
