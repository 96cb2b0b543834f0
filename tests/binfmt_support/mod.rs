//! Shared helpers for the registration, security, load and doctor tests: real aarch64 programs built
//! with Debian's cross gcc, and a runner that executes a bash script in a private user + mount + pid
//! namespace with its own, empty binfmt_misc instance (Linux >= 6.7). The global instance is never
//! touched; everything started inside dies with the namespace's init.
//!
//! The namespace maps uid/gid 0 and 65534 (nobody) to the same ids outside. The maps are written by
//! this process, from the parent namespace, because a process inside may only map itself: a second
//! mapped id is what lets a test drop to an unprivileged user (setpriv) in front of a setuid program.
//! Other engineers' tests may use these helpers read-only.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");

/// Fails the test, naming the Debian package, when a tool is missing.
pub fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package} (tests/run does)");
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh directory for one test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binfmt-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // Other users (nobody, in the security test) must reach the programs inside.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Probes {
    /// The probe, static (ET_EXEC).
    pub static_: PathBuf,
    /// The probe, dynamic PIE; its PT_INTERP /lib/ld-linux-aarch64.so.1 is not on an x86_64 host,
    /// so nixqimg runs it loader-first with Debian's cross sysroot.
    pub dynamic: PathBuf,
    /// tests/binfmt_support/fds.c: no libc, prints only its open fds (the load test's program).
    pub fds: PathBuf,
}

/// The aarch64 probe programs (tests/binfmt_support/probe.c), built once per test binary.
pub fn probes() -> &'static Probes {
    static P: OnceLock<Probes> = OnceLock::new();
    P.get_or_init(|| {
        need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binfmt-probes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/binfmt_support/probe.c");
        let build = |name: &str, flags: &[&str], src: &Path| {
            let out = dir.join(name);
            run_ok(Command::new("aarch64-linux-gnu-gcc").args(["-O2", "-o"]).arg(&out).args(flags).arg(src));
            out
        };
        Probes {
            static_: build("probe-static", &["-static"], &src),
            dynamic: build("probe-dyn", &["-pie", "-fPIE"], &src),
            fds: build("fds", &["-static", "-nostdlib", "-fno-stack-protector"], &src.with_file_name("fds.c")),
        }
    })
}

#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "script failed:\n--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// The prelude of every namespace script: its own binfmt_misc, no descriptors above 2 inherited from
/// whatever started the tests (so what a guest sees is what nixqimg and qemu leave open), `$NQ` =
/// nixqimg, and a `PATH` without the test runner's directories.
const PRELUDE: &str = r#"set -e
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
for fd in /proc/$$/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-" 2>/dev/null || true; done
set +e
"#;

/// Runs `script` with bash as root in a private user + mount + pid namespace whose binfmt_misc is
/// empty at the start. `env` is added to a minimal environment. Killed after `timeout`.
pub fn ns(script: &str, env: &[(&str, &str)], timeout: Duration) -> Out {
    need("unshare", "util-linux");
    need("bash", "bash");
    let inner = format!("{PRELUDE}{script}");
    let mut cmd = Command::new("unshare");
    // Stage 1 creates only the user namespace and waits (read) until we have written its maps;
    // stage 2, now with ids 0 and 65534 mapped, makes the mount and pid namespaces.
    cmd.args([
        "--user",
        "bash",
        "-c",
        "read -r _ || exit 99; exec unshare --mount --pid --fork --kill-child --mount-proc bash -c \"$1\"",
        "stage1",
    ])
    .arg(&inner)
    .env_clear()
    .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    .env("NQ", NIXQIMG)
    .env("LANG", "C")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start unshare");
    let pid = child.id();
    let me = std::fs::read_link("/proc/self/ns/user").unwrap();
    let start = Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/ns/user")).map(|n| n == me).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(10), "unshare --user did not create a user namespace");
        std::thread::sleep(Duration::from_millis(2));
    }
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), "0 0 1\n65534 65534 1\n")
            .unwrap_or_else(|e| panic!("writing /proc/{pid}/{map}: {e} (the tests run as root)"));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            // SAFETY: kill(2) on our own child's process group; no memory is involved.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("namespace script timed out after {timeout:?}:\n{script}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Out {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t1.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t2.join().unwrap()).into_owned(),
    }
}

/// `bash` single-quoting for building scripts.
pub fn q(p: impl AsRef<Path>) -> String {
    format!("'{}'", p.as_ref().display().to_string().replace('\'', "'\\''"))
}

/// The probe's report as lines, for exact comparison.
pub fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}
