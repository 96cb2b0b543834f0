//! Helpers for tests/image.rs: a real Nix store in the test's target dir holding small NixOS-shaped
//! systems (built once per run, reused by later runs), the nixqimg command, and readers of image files
//! that need no mounts (sfdisk, mtools, debugfs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");

/// Fails (never skips) when a tool the test needs is missing, naming its Debian package.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package}");
}

pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    /// nix-bin single-user with everything under `dir` (see NOTES.md: Nix offline).
    pub fn env(&self, c: &mut Command) {
        c.env("NIX_STORE_DIR", self.dir.join("store"))
            .env("NIX_STATE_DIR", self.dir.join("state"))
            .env("NIX_LOG_DIR", self.dir.join("log"))
            .env("NIX_CONF_DIR", self.dir.join("conf"))
            .env("XDG_CACHE_HOME", self.dir.join("cache"))
            .env("HOME", &self.dir);
    }

    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        self.env(&mut c);
        c
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }
}

static STORE: Mutex<Option<PathBuf>> = Mutex::new(None);

pub fn store() -> Store {
    need("nix-build", "nix-bin");
    need("busybox", "busybox-static");
    let mut g = STORE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = g
        .get_or_insert_with(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-nix");
            std::fs::create_dir_all(dir.join("conf")).unwrap();
            std::fs::write(dir.join("conf/nix.conf"), "build-users-group =\nsubstituters =\nsandbox = true\n").unwrap();
            let bb = dir.join("busybox/bin");
            if !bb.join("busybox").exists() {
                std::fs::create_dir_all(&bb).unwrap();
                std::fs::copy("/bin/busybox", bb.join("busybox")).expect("/bin/busybox (busybox-static)");
            }
            // Nix creates its state directories on first use and races with itself when two tests
            // start at once ("creating symlink ... gcroots/profiles: File exists"): do it once here.
            let init = Store { dir: dir.clone() }.cmd("nix-store").arg("--init").output().expect("run nix-store");
            assert!(init.status.success(), "nix-store --init: {}", String::from_utf8_lossy(&init.stderr));
            dir
        })
        .clone();
    Store { dir }
}

/// Builds the test system (tag and kernel size make different systems) and returns its toplevel.
pub fn system(s: &Store, tag: &str, kernel_size: u64) -> PathBuf {
    let nix = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/image_support/system.nix");
    let out = s
        .cmd("nix-build")
        .arg(&nix)
        .arg("--no-out-link")
        .args(["--arg", "busybox"])
        .arg(s.dir.join("busybox"))
        .args(["--argstr", "tag", tag, "--arg", "kernelSize", &kernel_size.to_string()])
        .output()
        .expect("run nix-build");
    assert!(out.status.success(), "nix-build failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// closureInfo's shape from nix-store (`registration` + `store-paths`), records in the given order.
pub fn closure_info(s: &Store, toplevel: &Path, dir: &Path, reverse: bool) {
    let q = s.cmd("nix-store").arg("-qR").arg(toplevel).output().unwrap();
    assert!(q.status.success());
    let mut paths: Vec<String> = String::from_utf8(q.stdout).unwrap().lines().map(String::from).collect();
    if reverse {
        paths.reverse();
    }
    let mut reg = String::new();
    for p in &paths {
        let d = s.cmd("nix-store").arg("--dump-db").arg(p).output().unwrap();
        assert!(d.status.success());
        reg.push_str(&String::from_utf8(d.stdout).unwrap());
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("registration"), reg).unwrap();
    std::fs::write(dir.join("store-paths"), paths.join("\n") + "\n").unwrap();
}

pub fn nixqimg(s: &Store) -> Command {
    s.cmd(NIXQIMG)
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({:?}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn sh(cmd: &str) -> String {
    ok(&Command::new("sh").arg("-c").arg(cmd).output().unwrap())
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Partition start offsets (bytes) and the sfdisk dump of an image file.
pub fn partitions(img: &Path) -> (Vec<u64>, String) {
    need("sfdisk", "fdisk");
    let dump = ok(&Command::new("sfdisk").arg("--dump").arg(img).output().unwrap());
    let starts = dump
        .lines()
        .filter_map(|l| l.split("start=").nth(1))
        .map(|r| r.split(',').next().unwrap().trim().parse::<u64>().unwrap() * 512)
        .collect();
    (starts, dump)
}

/// One file of the ESP, read with mtools.
pub fn esp_file(img: &Path, off: u64, path: &str) -> Vec<u8> {
    need("mcopy", "mtools");
    let o = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-n")
        .arg("-i")
        .arg(format!("{}@@{off}", img.display()))
        .arg(format!("::{path}"))
        .arg("-")
        .output()
        .unwrap();
    assert!(o.status.success(), "ESP has no {path}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// The root filesystem extracted with debugfs rdump (as root, rdump keeps owners and modes).
pub fn extract_root(img: &Path, off: u64, dest: &Path) {
    need("debugfs", "e2fsprogs");
    std::fs::create_dir_all(dest).unwrap();
    let dev = format!("{}?offset={off}", img.display());
    let o = Command::new("debugfs").arg("-R").arg(format!("rdump / {}", dest.display())).arg(&dev).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().all(|l| l.starts_with("debugfs ")), "rdump: {err}");
}

/// Every path under `dir` whose owner is not 0:0 (lstat, so symlinks count themselves).
pub fn not_root_owned(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.uid() != 0 || m.gid() != 0 {
            bad.push(format!("{} {}:{}", p.display(), m.uid(), m.gid()));
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    bad
}
