//! Shared parts of the real-Nix tests: a static nixqimg, Debian's arm64 programs, a single-user Nix
//! store in a temp dir (sandbox on, no fallback), and `nixqimg ns` / `nixqimg nix-config` run the way
//! a user would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub mod remote;

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");
pub const QEMU: &str = "/usr/bin/qemu-aarch64-static";

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn need(tool: &str, package: &str) {
    let found = tool.starts_with('/') && Path::new(tool).exists()
        || std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    assert!(found, "{tool} is missing: install the Debian package {package}");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// nixqimg built fully static (musl): the binfmt interpreter must work inside a Nix sandbox.
pub fn static_nixqimg() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = run(Command::new(repo().join("tests/support/build-static")).arg("x86_64"));
        PathBuf::from(out.trim())
    })
}

/// Debian's arm64 packages, unpacked (cached across runs under the target dir).
pub fn debs() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debcache-nix");
        let pkgs = [
            "busybox-static",
            "bash",
            "coreutils",
            "sed",
            "grep",
            "libc6",
            "libtinfo6",
            "libacl1",
            "libattr1",
            "libselinux1",
            "libpcre2-8-0",
            "patchelf",
            "libstdc++6",
            "libgcc-s1",
            "e2fsprogs",
            "libext2fs2",
            "libcom-err2",
            "libblkid1",
            "libuuid1",
            "libss2",
        ];
        let mut cmd = Command::new(repo().join("tests/support/fetch-debs"));
        cmd.arg("bookworm").arg(&dest).args(pkgs.iter().map(|p| format!("{p}:arm64")));
        run(&mut cmd);
        dest.join("root")
    })
}

/// The inputs the fixtures take: `busybox/bin/busybox` and `tools/{bin,lib}` (unpatched Debian arm64
/// programs, their libraries, and a non-PIE program built with the cross gcc).
pub struct Inputs {
    pub busybox: PathBuf,
    pub tools: PathBuf,
}

pub fn inputs() -> &'static Inputs {
    static I: OnceLock<Inputs> = OnceLock::new();
    I.get_or_init(|| {
        need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
        need("patchelf", "patchelf");
        let root = debs();
        // One fixed place, rebuilt by each test binary (they run one after another): no pile-up.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nix-inputs");
        let _ = std::fs::remove_dir_all(&base);
        let busybox = base.join("busybox");
        let tools = base.join("tools");
        for d in [busybox.join("bin"), tools.join("bin"), tools.join("lib")] {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::copy(root.join("busybox-static_arm64/bin/busybox"), busybox.join("bin/busybox")).unwrap();
        let mut progs: Vec<PathBuf> =
            ["bash_arm64/bin/bash", "sed_arm64/bin/sed", "grep_arm64/bin/grep"].iter().map(|p| root.join(p)).collect();
        progs.push(root.join("patchelf_arm64/usr/bin/patchelf"));
        progs.push(root.join("e2fsprogs_arm64/sbin/mke2fs"));
        for c in [
            "cat",
            "cp",
            "mkdir",
            "ls",
            "sort",
            "seq",
            "sha256sum",
            "tr",
            "wc",
            "head",
            "cut",
            "chmod",
            "ln",
            "uname",
            "printf",
            "echo",
            "env",
        ] {
            let a = root.join("coreutils_arm64/bin").join(c);
            progs.push(if a.exists() { a } else { root.join("coreutils_arm64/usr/bin").join(c) });
        }
        for p in &progs {
            std::fs::copy(p, tools.join("bin").join(p.file_name().unwrap())).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
        run(Command::new("aarch64-linux-gnu-gcc")
            .args(["-no-pie", "-O2", "-o"])
            .arg(tools.join("bin/hello-nopie"))
            .arg(repo().join("tests/fixtures/nix/hello-nopie.c")));
        // Every shared library of the unpacked packages, symlinks resolved inside the package.
        for pkg in std::fs::read_dir(root).unwrap().flatten() {
            for sub in ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"] {
                let Ok(rd) = std::fs::read_dir(pkg.path().join(sub)) else { continue };
                for e in rd.flatten() {
                    let name = e.file_name();
                    if !name.to_string_lossy().contains(".so") {
                        continue;
                    }
                    let mut src = e.path();
                    for _ in 0..8 {
                        match std::fs::read_link(&src) {
                            Ok(t) if t.is_absolute() => src = pkg.path().join(t.strip_prefix("/").unwrap()),
                            Ok(t) => src = src.parent().unwrap().join(t),
                            Err(_) => break,
                        }
                    }
                    if src.is_file() {
                        std::fs::copy(&src, tools.join("lib").join(&name)).unwrap();
                    }
                }
            }
        }
        assert!(tools.join("lib/ld-linux-aarch64.so.1").is_file(), "no arm64 loader in libc6:arm64");
        Inputs { busybox, tools }
    })
}

/// Which Nix runs a test: Debian 12's nix-bin 2.8 (installed), or Debian trixie's 2.26 (unpacked
/// next to its own libraries by tests/support/nix-trixie, cached under /var/cache/nixqimg-tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nix {
    Bookworm,
    Trixie,
}

impl Nix {
    /// The directory holding this Nix's `nix`, `nix-build`, ... (put first on PATH).
    pub fn bin(self) -> PathBuf {
        static TRIXIE: OnceLock<PathBuf> = OnceLock::new();
        match self {
            Nix::Bookworm => {
                need("nix-build", "nix-bin");
                PathBuf::from("/usr/bin")
            }
            Nix::Trixie => TRIXIE
                .get_or_init(|| {
                    need("patchelf", "patchelf");
                    let out =
                        run(Command::new(repo().join("tests/support/nix-trixie"))
                            .arg(Path::new(CACHE).join("nix-2.26")));
                    PathBuf::from(out.trim())
                })
                .clone(),
        }
    }

    /// What `nix --version` must say.
    pub fn version(self) -> &'static str {
        match self {
            Nix::Bookworm => "2.8.",
            Nix::Trixie => "2.26.",
        }
    }

    /// nix.conf lines this Nix needs here. Debian's 2.26 puts `/bin/sh=/usr/bin/bash-static` in its
    /// default sandbox-paths (its package depends on bash-static); this machine has no trixie
    /// bash-static installed, so the same program is named where nix-trixie unpacked it.
    pub fn conf(self) -> String {
        match self {
            Nix::Bookworm => String::new(),
            Nix::Trixie => format!("sandbox-paths = /bin/sh={}\n", self.bin().with_file_name("bash-static").display()),
        }
    }

    /// PATH with this Nix first.
    pub fn path(self) -> std::ffi::OsString {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin()];
        dirs.extend(std::env::split_paths(&rest));
        std::env::join_paths(dirs).unwrap()
    }
}

/// Fixtures fetched or built once and kept across runs (outside the repo).
pub const CACHE: &str = "/var/cache/nixqimg-tests";

/// Runs each named `fn(Nix)` as two tests, `nix_2_8::NAME` and `nix_2_26::NAME`, same assertions.
#[macro_export]
macro_rules! each_nix {
    ($($name:ident),* $(,)?) => {
        mod nix_2_8 {
            $(#[test] fn $name() { super::$name($crate::nix_support::Nix::Bookworm) })*
        }
        mod nix_2_26 {
            $(#[test] fn $name() { super::$name($crate::nix_support::Nix::Trixie) })*
        }
    };
}

/// A single-user Nix store in a temp dir with the sandbox on and no fallback to building unsandboxed.
pub struct Store {
    pub dir: PathBuf,
    pub nix: Nix,
}

impl Store {
    pub fn new(name: &str, nix: Nix) -> Store {
        need(QEMU, "qemu-user-static");
        let bin = nix.bin();
        let v = Command::new(bin.join("nix")).arg("--version").output().unwrap();
        let v = String::from_utf8_lossy(&v.stdout).into_owned();
        assert!(v.contains(&format!("(Nix) {}", nix.version())), "{bin:?}: {v}");
        let tag = match nix {
            Nix::Bookworm => "2.8",
            Nix::Trixie => "2.26",
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nix-{name}-{tag}-{}", std::process::id()));
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&dir).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/nix.conf"),
            format!(
                "build-users-group =\nsubstituters =\nsandbox = true\nsandbox-fallback = false\nexperimental-features = nix-command flakes\n{}",
                nix.conf()
            ),
        )
        .unwrap();
        Store { dir, nix }
    }

    /// `prog` with this store's environment.
    pub fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(prog);
        for (k, v) in [
            ("NIX_STORE_DIR", "store"),
            ("NIX_STATE_DIR", "state"),
            ("NIX_LOG_DIR", "log"),
            ("NIX_CONF_DIR", "etc"),
            ("XDG_CACHE_HOME", "cache"),
            ("HOME", "home"),
        ] {
            c.env(k, self.dir.join(v));
        }
        c.env_remove("NIX_REMOTE").env("PATH", self.nix.path()).stdin(Stdio::null());
        c
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The store is read-only by design.
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(&self.dir).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `nixqimg nix-config --json` for `interpreter`, turned into `--option` pairs for nix.
pub fn nix_config_options(interpreter: &Path) -> Vec<String> {
    let out = Command::new(NIXQIMG)
        .args(["nix-config", "--systems", "aarch64-linux", "--json", "--interpreter"])
        .arg(interpreter)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-config: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let words = |k: &str| v[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect::<Vec<_>>().join(" ");
    vec![
        "--option".into(),
        "extra-extra-platforms".into(),
        words("extra-platforms"),
        "--option".into(),
        "extra-sandbox-paths".into(),
        words("extra-sandbox-paths"),
    ]
}

/// How the foreign programs get run, for the with/without comparisons.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Via {
    /// nixqimg (static) registered in a private binfmt_misc by `nixqimg ns`.
    Nixqimg,
    /// The static qemu itself registered (PF) in a private binfmt_misc, as `register --direct` would.
    PlainQemu,
    /// A private binfmt_misc holding no aarch64 entry at all.
    Nothing,
}

/// `nix-build`/`nix build` args run in `store` through `via`, with the nix-config options.
pub fn nix(store: &Store, via: Via, nix_args: &[&str]) -> Output {
    let interp = match via {
        Via::Nixqimg => static_nixqimg().to_path_buf(),
        _ => PathBuf::from(QEMU),
    };
    let mut c = store.cmd("timeout");
    c.args(["600", NIXQIMG, "ns", "--interpreter"]).arg(&interp);
    // riscv64 only: a real private instance, just none that serves aarch64.
    c.args(["--systems", if via == Via::Nothing { "riscv64-linux" } else { "aarch64-linux" }, "--"]);
    c.args(nix_args);
    c.args(nix_config_options(&interp));
    c.output().unwrap()
}

/// A directory removed when the test ends, passed or failed.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the fixture flake and its inputs into a fresh directory (a flake outside git).
pub fn flake_dir(name: &str) -> TempDir {
    let inputs = inputs();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nix-flake-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx = repo().join("tests/fixtures/nix");
    for f in std::fs::read_dir(&fx).unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let st = Command::new("cp").arg("-a").arg(&inputs.busybox).arg(&inputs.tools).arg(&dir).status().unwrap();
    assert!(st.success());
    TempDir(dir)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
