//! nixqimg registered with F runs foreign programs in a chroot that holds neither nixqimg nor qemu,
//! as a qemu F entry does, with the chroot's files untouched.
//!
//! The root is a real Debian trixie arm64 root from `debootstrap --foreign --variant=minbase` (with the
//! cloud userland's packages: systemd, cloud-init, openssh-server, ...), whose second stage ran under
//! `chroot` in a private namespace (user + mount + pid) with nixqimg registered (F) and nothing of qemu
//! inside: `tests/support/debian-root`. One fixture with one owner: tests/fixtures/cloud/build makes it
//! (`--root aarch64`), caches it under /var/cache/nixqimg-tests/cloud, and turns the same root into
//! the aarch64 cloud closure that tests/cloud.rs boots. Each test here runs programs in that root and
//! writes nothing into it.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({})", out.status);
    text(&out.stdout)
}

/// nixqimg as a static binary: inside the chroot no library of the host is visible.
fn static_nixqimg() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| PathBuf::from(run(Command::new(repo().join("tests/support/build-static")).arg("x86_64")).trim()))
}

/// The root, built once (the second stage takes minutes under emulation) and then reused.
fn root() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let start = std::time::Instant::now();
        let out = run(Command::new("timeout")
            .args(["3700", repo().join("tests/fixtures/cloud/build").to_str().unwrap(), "--root", "aarch64"])
            .env("NIXQIMG", static_nixqimg())
            .env_remove("NIXQIMG_QEMU_DIR")
            .env_remove("NIXQIMG_SECOND_STAGE_ENTRY"));
        eprintln!("the arm64 root (tests/fixtures/cloud/build --root aarch64) took {:?}", start.elapsed());
        PathBuf::from(out.trim())
    })
}

/// Runs `script` with the root's own bash, chrooted into the root, in nixqimg's namespace (nixqimg
/// F and its qemu marker entry in a private binfmt_misc instance), inside a mount + pid namespace
/// that mounts proc at ROOT/proc when `proc` is set. `entries`: replace what `nixqimg ns`
/// registered by these lines. Everything is under a timeout and dies with the namespace.
fn in_root(script: &str, proc: bool, entries: Option<&[String]>) -> Output {
    let r = root();
    let mut setup = String::new();
    if let Some(lines) = entries {
        setup.push_str("for e in /proc/sys/fs/binfmt_misc/nixqimg-*; do echo -1 >\"$e\"; done\n");
        for l in lines {
            setup.push_str(&format!("printf '%s' '{l}' >/proc/sys/fs/binfmt_misc/register\n"));
        }
    }
    setup.push_str("exec chroot \"$R\" /bin/bash -c \"$S\"");
    let outer = format!("set -e; {} exec \"$@\"", if proc { "mount -t proc proc \"$R/proc\";" } else { "" });
    let out = Command::new("timeout")
        .args(["-k", "5", "300", "unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"])
        .args(["sh", "-c", &outer, "sh"])
        .arg(static_nixqimg())
        .args(["ns", "--systems", "aarch64-linux", "--", "sh", "-c", &setup])
        .env("R", r)
        // Only stdin, stdout, stderr reach the chroot: the fd check below is then exact.
        .env("S", format!("for fd in /proc/$$/fd/*; do n=${{fd##*/}}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\" 2>/dev/null; done\n{script}"))
        .env_remove("NIXQIMG_QEMU_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("cannot start unshare");
    assert_ne!(out.status.code(), Some(124), "timed out:\n{}", text(&out.stderr));
    out
}

/// `script` succeeds in the root and prints exactly `want`.
fn expect(script: &str, want: &str) {
    let out = in_root(script, true, None);
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), want),
        "{script}\nstderr:\n{}",
        text(&out.stderr)
    );
}

#[test]
fn the_root_holds_neither_qemu_nor_nixqimg() {
    let r = root();
    let mut found = Vec::new();
    let mut stack = vec![r.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("qemu-") || name.starts_with("nixqimg") || name.ends_with("-binfmt-P") {
                found.push(e.path());
            }
            if t.is_dir() && !t.is_symlink() && !t.is_char_device() {
                stack.push(e.path());
            }
        }
    }
    assert!(found.is_empty(), "{found:?}");
    let stamp = std::fs::read_to_string(r.join(".debian-root")).unwrap();
    let stamp = stamp.trim();
    assert!(stamp.starts_with("arch=arm64 suite=trixie variant=minbase include="), "{stamp}");
    assert!(stamp.ends_with(" second-stage=nixqimg"), "not built through nixqimg with nothing shown: {stamp}");
}

#[test]
fn the_second_stage_installed_every_package_through_nixqimg() {
    // dpkg-query itself is a foreign program run the same way.
    let out = in_root("dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n'", true, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert!(lines.len() > 50, "{lines:?}");
    let bad: Vec<&String> = lines.iter().filter(|l| !l.starts_with("ii ")).collect();
    assert!(bad.is_empty(), "not installed: {bad:?}");
    for p in ["ii  dash", "ii  perl-base", "ii  coreutils", "ii  libc-bin"] {
        assert!(lines.iter().any(|l| l == p), "{p} missing from {lines:?}");
    }
    assert!(!root().join("debootstrap").exists(), "the second stage did not finish");
}

#[test]
fn exec_a_keeps_argv0() {
    expect("exec -a my-argv0 bash -c 'echo \"$0\"'", "my-argv0\n");
    expect("(exec -a 'a b' bash -c 'echo \"$0\"')", "a b\n");
}

#[test]
fn perl_runs() {
    expect(
        "perl -e 'use strict; my %h = map { $_ => $_ ** 2 } 1..10; print join(\",\", map { $h{$_} } sort { $a <=> $b } keys %h), \"\\n\"'",
        "1,4,9,16,25,36,49,64,81,100\n",
    );
}

#[test]
fn a_pipeline_of_foreign_programs() {
    expect("seq 1 1000 | grep 7 | sort -rn | head -n 3 | tr '\\n' ' '; echo", "997 987 979 \n");
}

#[test]
fn a_static_program_runs_too() {
    // ldconfig is Debian's static program: there is no loader to start it with, so it is handed over
    // whole. Only reads: the cached root stays as built.
    expect("ldconfig -p | head -n 1 | sed 's/^[0-9]* //'", "libs found in cache `/etc/ld.so.cache'\n");
}

#[test]
fn the_program_sees_no_descriptor_it_did_not_have_and_its_exact_environment() {
    // ls opens the directory it lists as fd 3; nothing else may be open.
    expect("ls /proc/self/fd | tr '\\n' ' '; echo", "0 1 2 3 \n");
    expect("env -i A=1 'B=x y' LD_LIBRARY_PATH=/custom C=3 /usr/bin/env", "A=1\nB=x y\nLD_LIBRARY_PATH=/custom\nC=3\n");
}

#[test]
fn proc_self_exe_before_and_after_cd() {
    // Known limit of the routed exec: qemu answers /proc/self/exe from the path it was started with,
    // /proc/self/fd/N of the memfd that closed at exec, so it does not resolve (see src route docs).
    // The programs themselves run on, before and after cd alike.
    expect(
        "readlink /proc/self/exe; echo rc=$?; cd /tmp && readlink /proc/self/exe; echo rc=$?; cd /usr/bin && ./readlink /proc/self/exe; echo rc=$?",
        "rc=1\nrc=1\nrc=1\n",
    );
}

#[test]
fn without_proc_in_the_chroot_the_error_names_the_fix() {
    let out = in_root("true", false, None);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "nixqimg: /bin/bash: no qemu is visible here and /proc is not mounted, which reaching the registered qemu needs (mount proc in the chroot (mount -t proc proc ROOT/proc))\n"
    );
}

#[test]
fn without_the_marker_entry_the_error_names_the_fix() {
    // nixqimg F alone, as an older nixqimg registered it.
    let n = static_nixqimg().display().to_string();
    let line = format!(
        ":nixqimg-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:{n}:PF"
    );
    let out = in_root("true", true, Some(&[line]));
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    let e = text(&out.stderr);
    assert!(e.starts_with("nixqimg: /bin/bash: no qemu-aarch64 or qemu-aarch64-static in "), "{e}");
    assert!(
        e.ends_with("/usr/bin, /usr/local/bin (a chroot or container?), and no binfmt_misc entry nixqimg-aarch64-qemu to reach the registered one (register with F and a static qemu installed: 'nixqimg register --replace aarch64-linux' adds nixqimg-aarch64-qemu; or install qemu-user-static inside)\n"),
        "{e}"
    );
}
