//! Fixtures for the boot, seed and write tests: Debian parts fetched once into a cache, the NixOS-shaped
//! test systems of tests/fixtures/boot built by real Nix (nix-bin, single-user, its own store under the
//! cache, never /nix), and a runner for the nixqimg binary that reads like a terminal session.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");

/// Command-line words of mixed types (str, Path, PathBuf) as an array of `&OsStr`.
macro_rules! args {
    ($($x:expr),* $(,)?) => { [$(std::convert::AsRef::<std::ffi::OsStr>::as_ref(&$x)),*] };
}

pub fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package} (tests/run does)");
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Downloads and Nix builds are kept here between runs (CI: inside the one test run).
pub fn cache() -> PathBuf {
    let dir = std::env::var_os("NIXQIMG_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nixqimg-tests/boot"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A temporary directory removed on drop, even when the test fails.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(name: &str) -> Tmp {
        // Cargo's scratch directory for integration tests, inside the target dir.
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let p = base
            .join(format!("{name}-{}-{:?}", std::process::id(), std::thread::current().id()))
            .to_string_lossy()
            .replace(['(', ')'], "");
        let p = PathBuf::from(p);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static FETCH: Mutex<()> = Mutex::new(());

fn fetch(pkgs: &[String]) {
    need("apt-get", "apt");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs");
    run(Command::new(script).arg("bookworm").arg(cache()).args(pkgs));
}

fn deb(name: &str, arch: &str) -> PathBuf {
    let dir = cache().join("debs");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let f = p.file_name().unwrap().to_string_lossy().into_owned();
            f.starts_with(&format!("{name}_")) && f.ends_with(&format!("_{arch}.deb"))
        })
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("{name}:{arch} was not downloaded into {}", dir.display()))
}

/// The Debian parts of one architecture's test system.
pub struct Debs {
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    pub systemd_boot: PathBuf,
    pub host_busybox: PathBuf,
}

/// Fetches bookworm's cloud kernel (the real package behind the `linux-image-cloud-*` metapackage),
/// static busybox and systemd-boot-efi for `deb_arch` (amd64/arm64), plus the build machine's busybox.
pub fn debs(deb_arch: &str) -> Debs {
    let _l = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    need("dpkg-deb", "dpkg");
    // Both architectures in one call: fetch-debs reads the package lists once a day for the
    // architectures of the call that refreshed them, so a later arm64-only call would find nothing.
    let mut first = vec!["busybox-static:amd64".to_string()];
    for a in ["amd64", "arm64"] {
        first.extend([
            format!("linux-image-cloud-{a}:{a}"),
            format!("busybox-static:{a}"),
            format!("systemd-boot-efi:{a}"),
        ]);
    }
    fetch(&first);
    let kernel = |a: &str| {
        let meta = format!("linux-image-cloud-{a}");
        let depends = run(Command::new("dpkg-deb").arg("-f").arg(deb(&meta, a)).arg("Depends")).stdout;
        String::from_utf8_lossy(&depends)
            .split([',', ' '])
            .find(|w| w.starts_with("linux-image-") && w.ends_with(&format!("-cloud-{a}")))
            .unwrap_or_else(|| panic!("{meta} depends on no cloud kernel"))
            .to_string()
    };
    let real = kernel(deb_arch);
    fetch(&["amd64", "arm64"].map(|a| format!("{}:{a}", kernel(a))));
    Debs {
        kernel: deb(&real, deb_arch),
        busybox: deb("busybox-static", deb_arch),
        systemd_boot: deb("systemd-boot-efi", deb_arch),
        host_busybox: cache().join("root/busybox-static_amd64"),
    }
}

/// Single-user Nix with its own store in the cache: no daemon, no /nix, no substituters (offline).
pub fn nix_env(cmd: &mut Command) -> &mut Command {
    let n = cache().join("nix");
    std::fs::create_dir_all(n.join("etc")).unwrap();
    let conf = n.join("etc/nix.conf");
    let want = "build-users-group =\nsubstituters =\nsandbox = true\n";
    // Tests run in parallel: rewrite only when different, so no nix reads a half-written file.
    if std::fs::read_to_string(&conf).ok().as_deref() != Some(want) {
        let tmp = n.join(format!("etc/nix.conf.{}", std::process::id()));
        std::fs::write(&tmp, want).unwrap();
        std::fs::rename(&tmp, &conf).unwrap();
    }
    cmd.env("NIX_STORE_DIR", n.join("store"))
        .env("NIX_STATE_DIR", n.join("var"))
        .env("NIX_LOG_DIR", n.join("log"))
        .env("NIX_CONF_DIR", n.join("etc"))
        .env("XDG_CACHE_HOME", n.join("cache"))
        .env_remove("NIX_REMOTE")
}

static SYSTEMS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// The toplevel of the test system for `arch` (x86_64 or aarch64), built by Nix once per test run.
pub fn system(arch: &str) -> PathBuf {
    let mut built = SYSTEMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(a, _)| a == arch) {
        return p.clone();
    }
    need("nix-build", "nix-bin");
    let d = debs(if arch == "aarch64" { "arm64" } else { "amd64" });
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boot");
    let out = run(nix_env(Command::new("nix-build").arg(fixture).arg("--no-out-link"))
        .args(["--argstr", "arch", arch, "--argstr", "hostBusybox"])
        .arg(&d.host_busybox)
        .args(["--argstr", "kernelDeb"])
        .arg(&d.kernel)
        .args(["--argstr", "busyboxDeb"])
        .arg(&d.busybox)
        .args(["--argstr", "systemdBootDeb"])
        .arg(&d.systemd_boot)
        .stderr(Stdio::piped()));
    let top = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(top.join("boot.json").is_file(), "nix-build gave no system: {}", top.display());
    built.push((arch.to_string(), top.clone()));
    top
}

/// `nixqimg ARGS` with the test store's environment; returns (status, stdout, stderr).
pub fn nixqimg(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = nix_env(&mut Command::new(NIXQIMG)).args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The one line of a boot log that starts with the fixture's marker.
pub fn marker(log: &str) -> String {
    log.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with("NIXQIMG-BOOT-"))
        .unwrap_or_else(|| panic!("no marker line in the boot log:\n{log}"))
        .to_string()
}
