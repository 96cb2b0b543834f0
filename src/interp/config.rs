//! Where the interpreter gets its settings, in this order (first hit wins, per setting):
//!
//! 1. the qemu directory fixed at build time (`NIXQIMG_QEMU_DIR` in the build's environment; the Nix
//!    package sets it to a static qemu-user's `bin`),
//! 2. `nixqimg.conf` beside the nixqimg binary (inside a Nix build the environment is empty, so this
//!    file is how builds get logging or a strategy),
//! 3. the environment: `NIXQIMG_QEMU_DIR`, `NIXQIMG_STRATEGY`, `NIXQIMG_SYSROOT`, `NIXQIMG_LOG`,
//!    `NIXQIMG_LOG_FILE`,
//! 4. defaults: qemu beside nixqimg, then `/usr/bin`, `/usr/local/bin`; sysroot `/usr/<gnu-triplet>`
//!    (Debian's cross libc packages).
//!
//! The environment overrides the file for `strategy`, `sysroot` and logging (they are debugging knobs);
//! for qemu the order above is a search order. When the kernel marks the exec secure (AT_SECURE: a
//! setuid program under a `C` registration) the environment is ignored entirely, and the config file is
//! read only if it and its directory are root-owned and writable by nobody else.

use crate::interp::plan::Strategy;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "nixqimg.conf";
const MAX_CONFIG: u64 = 16 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directories to search for `qemu-<arch>` / `qemu-<arch>-static`, in order.
    pub qemu_dirs: Vec<PathBuf>,
    pub strategy: Strategy,
    pub sysroots: Vec<PathBuf>,
    /// `tracing` filter directive, e.g. `debug`; `None` means no logging set up at all.
    pub log: Option<String>,
    pub log_file: Option<PathBuf>,
    /// Problems found while reading settings; reported through `--explain` and doctor, never fatal.
    pub warnings: Vec<String>,
}

/// Lookups from the environment, injected so that tests and the secure path can give an empty one.
pub trait Env {
    fn var(&self, key: &str) -> Option<OsString>;
}

pub struct ProcessEnv;
impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<OsString> {
        std::env::var_os(key)
    }
}

/// The `NIXQIMG_*` entries of an environment, found in one pass over it. The interpreter asks for five
/// variables on every exec; getenv would compare each against every entry (about 8,000 instructions
/// for a 40-entry environment, a sixth of the interpreter's work before its execve).
pub struct Entries<'a>(Vec<(&'a [u8], &'a OsStr)>);

impl<'a> Entries<'a> {
    pub fn new<S: AsRef<OsStr>>(environ: &'a [S]) -> Self {
        Entries(
            environ
                .iter()
                .map(|kv| kv.as_ref())
                .filter(|kv| kv.as_bytes().starts_with(b"NIXQIMG_"))
                .filter_map(|kv| {
                    let b = kv.as_bytes();
                    let eq = b.iter().position(|&c| c == b'=')?;
                    Some((&b[..eq], OsStr::from_bytes(&b[eq + 1..])))
                })
                .collect(),
        )
    }
}

impl Env for Entries<'_> {
    fn var(&self, key: &str) -> Option<OsString> {
        // getenv's answer: the first entry of that name.
        self.0.iter().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| v.to_os_string())
    }
}

pub struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<OsString> {
        None
    }
}

/// The build-time qemu directory, if the build fixed one.
pub fn build_time_qemu_dir() -> Option<&'static str> {
    option_env!("NIXQIMG_QEMU_DIR").filter(|s| !s.is_empty())
}

/// Loads settings as described in the module docs. `self_exe` is nixqimg's own path.
pub fn load(self_exe: Option<&Path>, env: &dyn Env, secure: bool) -> Config {
    // Room for every directory below up front: a first push would call Vec's grow code, a page of
    // text of its own on the interpreter's path.
    let mut c = Config { qemu_dirs: Vec::with_capacity(6), ..Config::default() };
    if let Some(d) = build_time_qemu_dir() {
        c.qemu_dirs.push(PathBuf::from(d));
    }
    let own_dir = self_exe.and_then(crate::interp::paths::dir_of);
    if let Some(dir) = own_dir {
        let file = crate::interp::paths::join(dir, FILE_NAME);
        if let Some(text) = read_trusted(&file, secure, &mut c.warnings) {
            apply_file(&mut c, &file, &text);
        }
    }
    if !secure {
        if let Some(d) = env.var("NIXQIMG_QEMU_DIR").filter(|d| !d.is_empty()) {
            c.qemu_dirs.push(PathBuf::from(d));
        }
        if let Some(s) = env.var("NIXQIMG_STRATEGY") {
            match s.to_str().and_then(|s| s.parse().ok()) {
                Some(st) => c.strategy = st,
                None => warn(
                    &mut c.warnings,
                    format_args!(
                        "NIXQIMG_STRATEGY={} is not auto, direct or loader-first; using {}",
                        s.to_string_lossy(),
                        c.strategy
                    ),
                ),
            }
        }
        if let Some(s) = env.var("NIXQIMG_SYSROOT") {
            let dirs: Vec<PathBuf> = s
                .as_bytes()
                .split(|&b| b == b':')
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(OsStr::from_bytes(p)))
                .collect();
            c.sysroots.splice(0..0, dirs);
        }
        if let Some(l) = env.var("NIXQIMG_LOG").filter(|l| !l.is_empty()) {
            c.log = Some(l.to_string_lossy().into_owned());
        }
        if let Some(f) = env.var("NIXQIMG_LOG_FILE").filter(|f| !f.is_empty()) {
            c.log_file = Some(PathBuf::from(f));
        }
    }
    // Each directory once: nixqimg installed in /usr/local/bin listed it twice.
    // Compared as bytes without trailing slashes: Path's == walks components, a few thousand
    // instructions on every exec for the same answer.
    fn trim(p: &Path) -> &[u8] {
        let b = p.as_os_str().as_bytes();
        let n = b.iter().rposition(|&c| c != b'/').map_or(b.len().min(1), |i| i + 1);
        &b[..n]
    }
    for d in own_dir.into_iter().chain([Path::new("/usr/bin"), Path::new("/usr/local/bin")]) {
        if !c.qemu_dirs.iter().any(|q| trim(q) == trim(d)) {
            c.qemu_dirs.push(d.to_path_buf());
        }
    }
    c
}

/// Under AT_SECURE: are the config file and its directory root-owned and writable by nobody else?
#[cold]
#[inline(never)]
fn root_owned(file: &Path, f: &std::fs::File) -> bool {
    let trusted = |m: &std::fs::Metadata| m.uid() == 0 && m.mode() & 0o022 == 0;
    let dir_ok = file.parent().and_then(|d| std::fs::metadata(d).ok()).is_some_and(|m| trusted(&m));
    let file_ok = f.metadata().ok().is_some_and(|m| trusted(&m) && m.is_file());
    dir_ok && file_ok
}

/// A problem with the settings, worded only when there is one: `#[cold]`, so the wording stays out
/// of `load`'s hot code (src/interp/text-order.ld).
#[cold]
#[inline(never)]
fn warn(warnings: &mut Vec<String>, what: std::fmt::Arguments) {
    warnings.push(what.to_string());
}

/// Reads the config file, or nothing. Under AT_SECURE only a file nobody but root can change counts.
fn read_trusted(file: &Path, secure: bool, warnings: &mut Vec<String>) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = crate::interp::sys::open_read(file).ok()?;
    if secure && !root_owned(file, &f) {
        warn(
            warnings,
            format_args!("{}: ignored for a setuid program: not root-owned or writable by others", file.display()),
        );
        return None;
    }
    let mut buf = Vec::new();
    if let Err(e) = f.take(MAX_CONFIG).read_to_end(&mut buf) {
        warn(warnings, format_args!("{}: {e}", file.display()));
        return None;
    }
    Some(buf)
}

/// `key = value` lines; `#` starts a comment. Unknown keys are warnings, not errors: a newer config
/// must not stop an older interpreter from running programs.
fn apply_file(c: &mut Config, file: &Path, text: &[u8]) {
    for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = trim(raw.split(|&b| b == b'#').next().unwrap_or(&[]));
        if line.is_empty() {
            continue;
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            warn(&mut c.warnings, format_args!("{}:{}: expected key = value", file.display(), n + 1));
            continue;
        };
        let (key, value) = (trim(&line[..eq]), trim(&line[eq + 1..]));
        let path = || PathBuf::from(OsString::from_vec(value.to_vec()));
        match key {
            b"qemu_dir" => c.qemu_dirs.push(path()),
            b"sysroot" => c.sysroots.push(path()),
            b"strategy" => match std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                Some(s) => c.strategy = s,
                None => warn(&mut c.warnings, format_args!("{}:{}: unknown strategy", file.display(), n + 1)),
            },
            b"log" => c.log = Some(String::from_utf8_lossy(value).into_owned()),
            b"log_file" => c.log_file = Some(path()),
            _ => warn(
                &mut c.warnings,
                format_args!("{}:{}: unknown key {}", file.display(), n + 1, String::from_utf8_lossy(key)),
            ),
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn entries_answer_like_getenv() {
        let environ: Vec<OsString> = [
            "PATH=/bin",
            "NIXQIMG_LOG=debug",
            "NIXQIMG_SYSROOT=/a:/b",
            "NIXQIMG_LOG=trace",
            "NIXQIMG_NOEQ",
            "XNIXQIMG_LOG=x",
        ]
        .map(OsString::from)
        .into();
        let e = Entries::new(&environ);
        assert_eq!(e.var("NIXQIMG_LOG"), Some("debug".into()));
        assert_eq!(e.var("NIXQIMG_SYSROOT"), Some("/a:/b".into()));
        assert_eq!(e.var("NIXQIMG_NOEQ"), None);
        assert_eq!(e.var("PATH"), None, "only NIXQIMG_ variables are kept");
        assert_eq!(e.var("NIXQIMG_STRATEGY"), None);
    }

    #[test]
    fn a_directory_given_with_a_trailing_slash_is_listed_once() {
        let env = MapEnv(HashMap::from([("NIXQIMG_QEMU_DIR", "/usr/bin/")]));
        let c = load(None, &env, false);
        let usr_bin = c.qemu_dirs.iter().filter(|d| d.starts_with("/usr/bin")).count();
        assert_eq!(usr_bin, 1, "{:?}", c.qemu_dirs);
        assert!(
            c.qemu_dirs.ends_with(&[PathBuf::from("/usr/bin/"), PathBuf::from("/usr/local/bin")]),
            "{:?}",
            c.qemu_dirs
        );
    }

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, key: &str) -> Option<OsString> {
            self.0.get(key).map(OsString::from)
        }
    }

    fn dir_with_config(text: &str) -> (PathBuf, PathBuf) {
        let d = std::env::temp_dir().join(format!("nixqimg-cfg-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(FILE_NAME), text).unwrap();
        (d.clone(), d.join("nixqimg"))
    }

    #[test]
    fn file_then_env_then_defaults() {
        let (d, exe) =
            dir_with_config("# comment\nqemu_dir = /q\nstrategy = direct\nsysroot=/s\nlog = debug\nbogus = 1\n");
        let env = MapEnv(HashMap::from([("NIXQIMG_QEMU_DIR", "/envq"), ("NIXQIMG_STRATEGY", "loader-first")]));
        let c = load(Some(&exe), &env, false);
        let expect_prefix: Vec<PathBuf> = build_time_qemu_dir()
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("/q"), PathBuf::from("/envq"), d.clone()])
            .collect();
        assert_eq!(&c.qemu_dirs[..expect_prefix.len()], &expect_prefix[..]);
        assert_eq!(c.strategy, Strategy::LoaderFirst);
        assert_eq!(c.sysroots, vec![PathBuf::from("/s")]);
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn secure_ignores_environment() {
        let env = MapEnv(HashMap::from([
            ("NIXQIMG_QEMU_DIR", "/evil"),
            ("NIXQIMG_LOG", "trace"),
            ("NIXQIMG_STRATEGY", "direct"),
        ]));
        let c = load(None, &env, true);
        assert!(!c.qemu_dirs.contains(&PathBuf::from("/evil")));
        assert_eq!(c.log, None);
        assert_eq!(c.strategy, Strategy::Auto);
    }

    #[test]
    fn nixqimg_in_usr_local_bin_lists_that_directory_once() {
        let c = load(Some(Path::new("/usr/local/bin/nixqimg")), &MapEnv(HashMap::new()), false);
        let n = c.qemu_dirs.iter().filter(|d| *d == Path::new("/usr/local/bin")).count();
        assert_eq!(n, 1, "{:?}", c.qemu_dirs);
    }
}
