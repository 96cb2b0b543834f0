//! Fixtures for the interpreter tests: real aarch64 programs built with Debian's cross gcc, a
//! bootstrap-tools-like store tree, arm64 dash from Debian, and a runner that registers nixqimg in a
//! private binfmt_misc instance (user + mount namespace) and runs a shell script there.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");
const MAGIC: &str = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00";
const MASK: &str = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff";
pub const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";
pub const GONE_HASH: &str = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";

pub struct Fixtures {
    pub dir: PathBuf,
    /// Static, dynamic PIE (PT_INTERP /lib/ld-linux-aarch64.so.1, absent here) and non-PIE probes.
    pub static_probe: PathBuf,
    pub pie_probe: PathBuf,
    pub nopie_probe: PathBuf,
    /// `<store>/<HASH>-bootstrap-tools`
    pub bt: PathBuf,
    /// Non-PIE probes inside the tree: PT_INTERP in place + forced RPATH; PT_INTERP at a store path
    /// that does not exist here + forced RPATH; the same without RPATH.
    pub bt_inplace: PathBuf,
    pub bt_rpath: PathBuf,
    pub bt_norpath: PathBuf,
    /// Debian's arm64 dash moved into the tree like bt_rpath.
    pub bt_dash: PathBuf,
    /// PT_INTERP names a loader that exists nowhere.
    pub no_loader: PathBuf,
    /// Needs libgone.so from a RUNPATH directory that was deleted.
    pub no_libdir: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package} (tests/run does)");
}

fn cc(out: &Path, flags: &[&str]) {
    need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interp_support/probe.c");
    run(Command::new("aarch64-linux-gnu-gcc").args(["-O2", "-o"]).arg(out).args(flags).arg(src));
}

pub fn patchelf(file: &Path, args: &[&OsStr]) {
    need("patchelf", "patchelf");
    run(Command::new("patchelf").args(args).arg(file));
}

pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(build)
}

fn build() -> Fixtures {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interp-fixtures");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let static_probe = dir.join("probe-static");
    cc(&static_probe, &["-static"]);
    let pie_probe = dir.join("probe-pie");
    cc(&pie_probe, &["-pie", "-fPIE"]);
    let nopie_probe = dir.join("probe-nopie");
    cc(&nopie_probe, &["-no-pie"]);

    let store = dir.join("store");
    let bt = store.join(format!("{HASH}-bootstrap-tools"));
    std::fs::create_dir_all(bt.join("bin")).unwrap();
    std::fs::create_dir_all(bt.join("lib")).unwrap();
    let sysroot = Path::new("/usr/aarch64-linux-gnu/lib");
    for lib in ["ld-linux-aarch64.so.1", "libc.so.6"] {
        std::fs::copy(sysroot.join(lib), bt.join("lib").join(lib))
            .unwrap_or_else(|e| panic!("{lib} from libc6-arm64-cross: {e}"));
    }
    let in_place = bt.join("lib/ld-linux-aarch64.so.1");
    let gone = store.join(format!("{GONE_HASH}-bootstrap-tools/lib/ld-linux-aarch64.so.1"));
    let lib = bt.join("lib");
    let variant = |name: &str, interp: &Path, rpath: bool| -> PathBuf {
        let p = bt.join("bin").join(name);
        std::fs::copy(&nopie_probe, &p).unwrap();
        patchelf(&p, &["--set-interpreter".as_ref(), interp.as_os_str()]);
        if rpath {
            patchelf(&p, &["--force-rpath".as_ref(), "--set-rpath".as_ref(), lib.as_os_str()]);
        }
        p
    };
    let bt_inplace = variant("probe-inplace", &in_place, true);
    let bt_rpath = variant("probe-rpath", &gone, true);
    let bt_norpath = variant("probe-norpath", &gone, false);

    // Debian's arm64 dash, relocated into the tree the way bootstrap-tools' programs are.
    let debs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debcache");
    run(Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs"))
        .args(["bookworm"])
        .arg(&debs)
        .arg("dash:arm64"));
    let bt_dash = bt.join("bin/dash");
    std::fs::copy(debs.join("root/dash_arm64/bin/dash"), &bt_dash).unwrap();
    patchelf(&bt_dash, &["--set-interpreter".as_ref(), gone.as_os_str()]);
    patchelf(&bt_dash, &["--force-rpath".as_ref(), "--set-rpath".as_ref(), lib.as_os_str()]);

    let no_loader = dir.join("probe-no-loader");
    std::fs::copy(&nopie_probe, &no_loader).unwrap();
    patchelf(&no_loader, &["--set-interpreter".as_ref(), "/nonexistent/ld-nowhere.so.1".as_ref()]);

    // A program that needs a library from a directory that no longer exists.
    let libdir = dir.join("gonelib");
    std::fs::create_dir_all(&libdir).unwrap();
    let libsrc = dir.join("gone.c");
    std::fs::write(&libsrc, "int gone(void) { return 7; }\n").unwrap();
    run(Command::new("aarch64-linux-gnu-gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(libdir.join("libgone.so"))
        .arg(&libsrc));
    let mainsrc = dir.join("usegone.c");
    std::fs::write(&mainsrc, "int gone(void); int main(void) { return gone(); }\n").unwrap();
    let no_libdir = dir.join("probe-no-libdir");
    run(Command::new("aarch64-linux-gnu-gcc")
        .arg("-o")
        .arg(&no_libdir)
        .arg(&mainsrc)
        .arg(format!("-L{}", libdir.display()))
        .arg("-lgone")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-Wl,--dynamic-linker=/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1"));
    std::fs::remove_dir_all(&libdir).unwrap();

    Fixtures {
        dir,
        static_probe,
        pie_probe,
        nopie_probe,
        bt,
        bt_inplace,
        bt_rpath,
        bt_norpath,
        bt_dash,
        no_loader,
        no_libdir,
    }
}

/// Writes `bytes` as an executable file.
pub fn write_exe(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A binfmt_misc registration line for nixqimg under `name`, matching aarch64 ELF programs.
pub fn aarch64_entry(flags: &str) -> String {
    aarch64_entry_for(Path::new(NIXQIMG), flags)
}

/// The same entry for another interpreter (the static release build, a stand-in).
pub fn aarch64_entry_for(interpreter: &Path, flags: &str) -> String {
    format!(":nixqimg-test-aarch64:M::{MAGIC}:{MASK}:{}:{flags}", interpreter.display())
}

/// Runs `script` with bash in a new user + mount namespace whose own binfmt_misc instance holds
/// `entries` (registration lines); the global instance is never touched. Hard timeout: 300 s.
pub fn in_binfmt_ns(entries: &[String], script: &str, envs: &[(&str, &OsStr)]) -> Output {
    need("unshare", "util-linux");
    // Inherited descriptors above 2 (from whatever started the tests) are closed, so that what the
    // guest sees is what nixqimg and qemu leave open.
    let mut setup = String::from(
        "set -e; mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
         for e in \"${@}\"; do printf '%s' \"$e\" > /proc/sys/fs/binfmt_misc/register; done; set +e\n\
         for fd in /proc/$$/fd/*; do n=${fd##*/}; [ \"$n\" -gt 2 ] && eval \"exec $n>&-\" 2>/dev/null; done\n",
    );
    setup.push_str(script);
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "300", "unshare", "--user", "--map-root-user", "--mount", "bash", "-c"])
        .arg(&setup)
        .arg("ns")
        .args(entries)
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot start unshare");
    assert_ne!(
        out.status.code(),
        Some(124),
        "the namespace script timed out:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The probe's `report` output, decoded.
#[derive(Debug, Default)]
pub struct Report {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    /// qemu's own environment (/proc/self/environ is not emulated by qemu-user).
    pub qenv: Vec<Vec<u8>>,
    pub fds: Vec<String>,
    pub exe: String,
    /// The guest's SIGPIPE disposition.
    pub sigpipe: String,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// Parses every report in `out` (a `spawn` run prints the child's report after the parent's).
pub fn reports(out: &[u8]) -> Vec<Report> {
    let mut all: Vec<Report> = Vec::new();
    for line in String::from_utf8_lossy(out).lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        if k == "argc" {
            all.push(Report::default());
            continue;
        }
        let Some(r) = all.last_mut() else { continue };
        match k {
            "argv" => r.argv.push(unhex(v)),
            "env" => r.env.push(unhex(v)),
            "qenv" => r.qenv.push(unhex(v)),
            "fd" => r.fds.push(v.to_string()),
            "exe" => r.exe = v.to_string(),
            "sigpipe" => r.sigpipe = v.to_string(),
            _ => {}
        }
    }
    all
}

pub fn bytes(v: &[&str]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

pub fn osb(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
