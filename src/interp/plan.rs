//! The planner: ELF facts + host facts + settings → the exact argv and environment to hand to qemu.
//! Pure apart from the [`Probe`] it is given, so every decision is unit-tested without qemu.
//!
//! Policy (`auto`):
//! - static programs (no PT_INTERP) always run directly: glibc's ld.so handed a static binary spins
//!   forever under qemu 7.2;
//! - dynamic programs run directly (`qemu -0 ARGV0 -- PATH ARGS`) when the loader is where PT_INTERP
//!   says, their libraries are found by it, and the image can be placed;
//! - otherwise loader-first (`qemu -0 ARGV0 -- LOADER --inhibit-cache [--library-path D] --argv0 ARGV0
//!   PATH ARGS`): when the loader had to be found elsewhere (bootstrap-tools tree, RUNPATH, sysroot), a
//!   needed library is only in a sysroot, or an ET_EXEC image's lowest address is not a multiple of the
//!   host page size (qemu's "Unable to find a guest_base" failure on 16K/64K-page hosts: a loader is
//!   ET_DYN and maps the program through qemu's own mmap).

use crate::arch::Arch;
use crate::interp::elf::ElfFacts;
use crate::interp::paths;
use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    Auto,
    Direct,
    LoaderFirst,
}

impl std::str::FromStr for Strategy {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "auto" => Ok(Strategy::Auto),
            "direct" => Ok(Strategy::Direct),
            "loader-first" => Ok(Strategy::LoaderFirst),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::Direct => "direct",
            Strategy::LoaderFirst => "loader-first",
        })
    }
}

/// What the planner may ask of the file system. The real one stats files; tests use a set of paths.
pub trait Probe {
    fn is_file(&self, path: &Path) -> bool;
    /// Entries of `dir` whose names start with `prefix` (to find `lib/ld-*` in a bootstrap tree).
    fn list(&self, dir: &Path, prefix: &[u8]) -> Vec<PathBuf>;
    /// Does this glibc loader accept `--argv0` (glibc >= 2.33)?
    fn loader_has_argv0(&self, loader: &Path) -> bool;
    fn canonicalize(&self, path: &Path) -> Option<PathBuf>;
}

/// At most this many file-system probes per exec, whatever RUNPATH and DT_NEEDED say. A real Nix
/// program (a dozen RUNPATH directories, a dozen libraries) needs well under a hundred; a hostile one
/// (4096 directories × 64 libraries) would otherwise cost a quarter of a million `statx` calls. Past
/// the budget nothing more is looked up: the program runs loader-first and ld.so, which reads the
/// same RUNPATH itself, finds its libraries or says which one is missing.
pub const MAX_PROBES: u32 = 400;

/// A [`Probe`] that answers "no" once `left` is spent, and remembers that it did.
struct Budget<'a> {
    inner: &'a dyn Probe,
    left: std::cell::Cell<u32>,
    spent: std::cell::Cell<bool>,
}

impl Budget<'_> {
    fn take(&self) -> bool {
        match self.left.get() {
            0 => {
                self.spent.set(true);
                false
            }
            n => {
                self.left.set(n - 1);
                true
            }
        }
    }
}

impl Probe for Budget<'_> {
    fn is_file(&self, path: &Path) -> bool {
        self.take() && self.inner.is_file(path)
    }
    fn list(&self, dir: &Path, prefix: &[u8]) -> Vec<PathBuf> {
        if self.take() {
            self.inner.list(dir, prefix)
        } else {
            Vec::new()
        }
    }
    fn loader_has_argv0(&self, loader: &Path) -> bool {
        // Asked once per plan, of the loader already chosen: not part of the search.
        self.inner.loader_has_argv0(loader)
    }
    fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
        self.take().then(|| self.inner.canonicalize(path)).flatten()
    }
}

/// Everything about this one exec.
pub struct Request<'a> {
    /// The program as qemu should open it (`/proc/self/fd/N` when the kernel gave us AT_EXECFD).
    pub program: &'a OsStr,
    /// The program's path as the kernel was asked to exec it: for $ORIGIN, store detection, messages.
    pub path: &'a OsStr,
    pub argv0: &'a OsStr,
    pub args: &'a [&'a OsStr],
    /// Our environment, `KEY=VALUE` entries in order. Borrowed, as the arguments are, and so is
    /// every one of them the plan hands on: the interpreter would otherwise copy each string twice
    /// (into the request, then into the plan) before exec copies it once more.
    pub env: &'a [&'a OsStr],
    pub facts: &'a ElfFacts,
    pub qemu: PathBuf,
    pub strategy: Strategy,
    /// Configured sysroots; Debian's `/usr/<gnu-triplet>` is always searched after them.
    pub sysroots: &'a [PathBuf],
    pub page_size: u64,
    /// AT_SECURE: strip everything that could steer qemu.
    pub secure: bool,
    /// Fill [`Plan::why`]: `--explain`, doctor and logging read it; the interpreter's hot path would
    /// spend a tenth of its instructions formatting lines nobody reads.
    pub explain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Direct,
    LoaderFirst { loader: PathBuf, library_path: Vec<PathBuf>, argv0: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    pub exe: PathBuf,
    /// Built strings owned, the request's borrowed.
    pub argv: Vec<Cow<'a, OsStr>>,
    pub env: Vec<Cow<'a, OsStr>>,
    pub mode: Mode,
    /// Facts and reasons behind the choice, for `--explain` and `doctor`.
    pub why: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The program names a loader that exists nowhere we may look.
    LoaderMissing { interp: PathBuf, looked: Vec<PathBuf> },
}

/// A missing loader's message names at most this many of the places looked at.
const MAX_LOOKED_SHOWN: usize = 16;

impl fmt::Display for PlanError {
    #[cold]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::LoaderMissing { interp, looked } => {
                write!(f, "its loader {} does not exist", interp.display())?;
                if !looked.is_empty() {
                    write!(f, ", nor at ")?;
                    for (i, p) in looked.iter().take(MAX_LOOKED_SHOWN).enumerate() {
                        write!(f, "{}{}", if i > 0 { ", " } else { "" }, p.display())?;
                    }
                    if looked.len() > MAX_LOOKED_SHOWN {
                        write!(f, " and {} more places", looked.len() - MAX_LOOKED_SHOWN)?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl Plan<'_> {
    /// The same plan owning every string, to outlive its request (doctor keeps plans).
    pub fn into_owned(self) -> Plan<'static> {
        let own = |v: Vec<Cow<'_, OsStr>>| v.into_iter().map(|s| Cow::Owned(s.into_owned())).collect();
        Plan { exe: self.exe, argv: own(self.argv), env: own(self.env), mode: self.mode, why: self.why }
    }
}

/// Does an ET_EXEC image risk qemu's guest_base failure on a host with `page_size` pages?
pub fn guest_base_risk(facts: &ElfFacts, page_size: u64) -> bool {
    facts.is_fixed_address() && page_size > 0 && facts.lowest_load.is_some_and(|lo| lo % page_size != 0)
}

/// `<store>/<32 nix-base32 chars>-bootstrap-tools` prefix of `path`, if it lies in such a tree.
pub fn bootstrap_tools_root(path: &Path) -> Option<PathBuf> {
    let b = path.as_os_str().as_bytes();
    let mut start = 0;
    while start < b.len() {
        let end = b[start..].iter().position(|&c| c == b'/').map_or(b.len(), |i| start + i);
        if let Some(hash) = b[start..end].strip_suffix(b"-bootstrap-tools") {
            if hash.len() == 32 && hash.iter().all(|&c| matches!(c, b'0'..=b'9' | b'a'..=b'z') && !b"eotu".contains(&c))
            {
                return Some(PathBuf::from(OsStr::from_bytes(&b[..end])));
            }
        }
        start = end + 1;
    }
    None
}

fn dirname(p: &OsStr) -> PathBuf {
    match paths::parent(Path::new(p)) {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// RUNPATH entries with `$ORIGIN` expanded, as ld.so would search them.
pub fn search_dirs(runpath: &[u8], origin: &Path) -> Vec<PathBuf> {
    search_dirs_and_room(runpath, origin, 0)
}

/// [`search_dirs`], with capacity for `room` more directories: a push past the capacity runs Vec's
/// grow code, pages of text outside the interpreter's.
fn search_dirs_and_room(runpath: &[u8], origin: &Path, room: usize) -> Vec<PathBuf> {
    let o = origin.as_os_str().as_bytes();
    // Pushed into exact capacity by index: split/map/collect is generic code paged in on its own.
    let mut dirs = Vec::with_capacity(runpath.iter().filter(|&&b| b == b':').count() + 1 + room);
    let mut start = 0;
    while start <= runpath.len() {
        let end = runpath[start..].iter().position(|&b| b == b':').map_or(runpath.len(), |i| start + i);
        let d = &runpath[start..end];
        start = end + 1;
        if d.is_empty() {
            continue;
        }
        let mut out = Vec::with_capacity(d.len() + o.len());
        let mut rest = d;
        while let Some(i) = rest.iter().position(|&b| b == b'$') {
            out.extend_from_slice(&rest[..i]);
            rest = &rest[i..];
            let n = if rest.starts_with(b"$ORIGIN") {
                7
            } else if rest.starts_with(b"${ORIGIN}") {
                9
            } else {
                0
            };
            if n > 0 {
                out.extend_from_slice(o);
                rest = &rest[n..];
            } else {
                out.push(b'$');
                rest = &rest[1..];
            }
        }
        out.extend_from_slice(rest);
        dirs.push(PathBuf::from(OsString::from_vec(out)));
    }
    dirs
}

/// The configured sysroots, then Debian's cross sysroot for the architecture (`/usr/<gnu-triplet>`).
fn sysroots(req: &Request) -> Vec<PathBuf> {
    let mut v = Vec::with_capacity(req.sysroots.len() + 1);
    for s in req.sysroots {
        v.push(s.clone());
    }
    v.push(paths::join(Path::new("/usr"), req.facts.arch.gnu_triplet));
    v
}

/// Where the program's loader really is: PT_INTERP itself, else the same file name in the program's
/// bootstrap-tools tree, its RUNPATH directories, or a sysroot.
fn find_loader(req: &Request, probe: &Budget, interp: &Path, why: &mut Why) -> Result<(PathBuf, bool), PlanError> {
    if probe.is_file(interp) {
        return Ok((interp.to_path_buf(), false));
    }
    let arch: &Arch = req.facts.arch;
    let name = paths::file_name(interp).unwrap_or(OsStr::new(arch.loader));
    let mut looked = Vec::new();
    let try_at = |cand: PathBuf, looked: &mut Vec<PathBuf>| -> Option<PathBuf> {
        if probe.is_file(&cand) {
            Some(cand)
        } else {
            looked.push(cand);
            None
        }
    };
    let path = Path::new(req.path);
    // The path as exec'd first; resolving symlinks costs a readlink per component, so only if needed.
    let root =
        bootstrap_tools_root(path).or_else(|| probe.canonicalize(path).as_deref().and_then(bootstrap_tools_root));
    {
        if let Some(root) = root {
            let lib = paths::join(&root, "lib");
            for n in [name, OsStr::new(arch.loader)] {
                if let Some(l) = try_at(paths::join(&lib, n), &mut looked) {
                    why.push(|| format!("program lies in bootstrap-tools tree {}", root.display()));
                    return Ok((l, true));
                }
            }
            if let Some(l) = probe.list(&lib, b"ld-").into_iter().find(|c| c.as_os_str().as_bytes().contains(&b'.')) {
                why.push(|| format!("program lies in bootstrap-tools tree {}", root.display()));
                return Ok((l, true));
            }
        }
    }
    if let Some(rp) = &req.facts.runpath {
        for d in search_dirs(rp, &dirname(req.path)) {
            if probe.spent.get() {
                break;
            }
            if let Some(l) = try_at(paths::join(&d, name), &mut looked) {
                why.push(|| format!("loader found in the program's RUNPATH/RPATH directory {}", d.display()));
                return Ok((l, true));
            }
        }
    }
    // The sysroots are the host's configuration, not the file's: a few places, looked at even when
    // a long RUNPATH spent the budget.
    for root in &sysroots(req) {
        let rel = paths::without_root(interp);
        for cand in [
            paths::join(root, rel),
            paths::join(&paths::join(root, "lib"), name),
            paths::join(&paths::join(root, "lib64"), name),
        ] {
            if probe.inner.is_file(&cand) {
                why.push(|| format!("loader found in sysroot {}", root.display()));
                return Ok((cand, true));
            }
            looked.push(cand);
        }
    }
    Err(PlanError::LoaderMissing { interp: interp.to_path_buf(), looked })
}

/// Directories to hand ld.so with `--library-path`: only for libraries it would not find itself.
fn missing_library_dirs(req: &Request, probe: &Budget, loader: &Path, relocated: bool, why: &mut Why) -> Vec<PathBuf> {
    let arch = req.facts.arch;
    let origin = dirname(req.path);
    let room = if relocated { 0 } else { 4 };
    let mut own: Vec<PathBuf> = match req.facts.runpath.as_deref() {
        Some(r) => search_dirs_and_room(r, &origin, room),
        None => Vec::with_capacity(room),
    };
    // ld.so's built-in directories are compiled in and cannot be read off the file. The loader's own
    // directory is NOT assumed among them: a loader copied into another tree (bootstrap-tools, or
    // Debian's ld.so placed in a store path) still searches where it was built for. Debian's
    // multiarch and plain lib dirs are, for a loader where PT_INTERP says.
    if !relocated {
        for d in ["/lib", "/usr/lib"] {
            own.push(paths::join(Path::new(d), arch.gnu_triplet));
            own.push(PathBuf::from(d));
        }
    }
    let mut extra: Vec<PathBuf> = Vec::new();
    let roots = sysroots(req);
    let mut candidates: Vec<PathBuf> = Vec::with_capacity(1 + 3 * roots.len());
    if let Some(d) = paths::parent(loader) {
        candidates.push(d.to_path_buf());
    }
    for s in &roots {
        for sub in ["lib", "lib64", "usr/lib"] {
            candidates.push(paths::join(s, sub));
        }
    }
    // Where the previous library was found among `own`. DT_NEEDED and RUNPATH both follow the link
    // line (nixpkgs' ld-wrapper adds -rpath in the order of -L), forwards or backwards, and a
    // library's directory often holds the next one too (glibc's libm and libc): looking there and
    // beside it first takes a Nix-like program (12 libraries, 13 directories) from 91 stats to 58
    // in reverse order and about one per library in order. Whether a library is found does not
    // depend on the order the directories are tried in; only the count of probes does.
    let mut last: Option<usize> = None;
    for lib in &req.facts.needed {
        if probe.spent.get() {
            break;
        }
        let lib = Path::new(OsStr::from_bytes(lib));
        if lib.as_os_str().as_bytes().contains(&b'/') {
            continue;
        }
        let hit = |i: usize| !probe.spent.get() && probe.is_file(&paths::join(&own[i], lib));
        let near = last.map_or([usize::MAX; 3], |l| [l + 1, l, l.wrapping_sub(1)]);
        // Plain loops: iterator adapters would be generic code outside the interpreter's text.
        let mut found = None;
        for i in near {
            if i < own.len() && hit(i) {
                found = Some(i);
                break;
            }
        }
        if found.is_none() {
            for i in 0..own.len() {
                if i != near[0] && i != near[1] && i != near[2] && hit(i) {
                    found = Some(i);
                    break;
                }
            }
        }
        if let Some(i) = found {
            last = Some(i);
            continue;
        }
        if extra.iter().any(|d| !probe.spent.get() && probe.is_file(&paths::join(d, lib))) {
            continue;
        }
        if let Some(d) = candidates.iter().find(|d| probe.is_file(&paths::join(d, lib))) {
            why.push(|| format!("{} is found only in {}", lib.display(), d.display()));
            extra.push(d.clone());
        } else if !probe.spent.get() {
            why.push(|| format!("{} is found nowhere nixqimg looks; ld.so will report it", lib.display()));
        }
    }
    // A relocated loader must at least find its own libc next to it.
    if relocated && extra.is_empty() && req.facts.needed.is_empty() {
        if let Some(d) = paths::parent(loader) {
            extra.push(d.to_path_buf());
        }
    }
    extra
}

/// The reasons being collected, or nothing when nobody will read them.
struct Why {
    keep: bool,
    lines: Vec<String>,
}

impl Why {
    fn push(&mut self, line: impl FnOnce() -> String) {
        if self.keep {
            self.add(line);
        }
    }

    /// Only `--explain`, doctor and a log keep the reasons: their formatting is `#[cold]`, in
    /// .text.unlikely, and not inlined into `plan`, whose hot code it spread over another 64 KiB
    /// fault-around window.
    #[cold]
    #[inline(never)]
    fn add(&mut self, line: impl FnOnce() -> String) {
        self.lines.push(line());
    }
}

/// The first line of `why`: `aarch64 ET_EXEC (static)`.
fn summary(f: &ElfFacts) -> String {
    format!(
        "{} {} ({})",
        f.arch.name,
        if f.is_fixed_address() { "ET_EXEC" } else { "ET_DYN" },
        match &f.interp {
            Some(i) => format!("dynamic, PT_INTERP {}", String::from_utf8_lossy(i)),
            None => "static".into(),
        }
    )
}

pub fn plan<'a>(req: &Request<'a>, probe: &dyn Probe) -> Result<Plan<'a>, PlanError> {
    let probe = Budget { inner: probe, left: MAX_PROBES.into(), spent: false.into() };
    let probe = &probe;
    let f = req.facts;
    let mut why = Why { keep: req.explain, lines: Vec::new() };
    why.push(|| summary(f));
    let risk = guest_base_risk(f, req.page_size);
    if let Some(lo) = f.lowest_load.filter(|_| f.is_fixed_address()) {
        why.push(|| {
            format!(
                "lowest load address {lo:#x}; host page size {}: {}",
                req.page_size,
                if risk { "qemu cannot reserve it (guest_base failure)" } else { "qemu can place it" }
            )
        });
    }

    let mode = match &f.interp {
        None => {
            if req.strategy == Strategy::LoaderFirst {
                why.push(|| "static program: run directly whatever the strategy (ld.so must never load it)".into());
            }
            if risk {
                why.push(|| {
                    "static ET_EXEC with an unplaceable address: no loader can help; it may fail on this host".into()
                });
            }
            Mode::Direct
        }
        Some(interp) => {
            let interp = PathBuf::from(OsStr::from_bytes(interp));
            match req.strategy {
                Strategy::Direct => {
                    why.push(|| "strategy direct".into());
                    Mode::Direct
                }
                s => {
                    let (loader, relocated) = find_loader(req, probe, &interp, &mut why)?;
                    let library_path = missing_library_dirs(req, probe, &loader, relocated, &mut why);
                    let spent = probe.spent.get();
                    if spent {
                        why.push(|| format!(
                            "{MAX_PROBES} file probes spent: the rest of the library search is left to ld.so (loader-first)"
                        ));
                    }
                    let first = s == Strategy::LoaderFirst || relocated || !library_path.is_empty() || risk || spent;
                    if s == Strategy::LoaderFirst {
                        why.push(|| "strategy loader-first".into());
                    } else if relocated {
                        why.push(|| format!("loader is not at PT_INTERP; using {}", loader.display()));
                    } else if risk {
                        why.push(|| "loader-first: ld.so is ET_DYN and maps the program through qemu's mmap".into());
                    }
                    if first {
                        let argv0 = probe.loader_has_argv0(&loader);
                        if !argv0 {
                            why.push(|| {
                                "this loader has no --argv0 (glibc < 2.33): the program sees its path as argv[0]".into()
                            });
                        }
                        Mode::LoaderFirst { loader, library_path, argv0 }
                    } else {
                        why.push(|| "loader at PT_INTERP and libraries found: direct".into());
                        Mode::Direct
                    }
                }
            }
        }
    };

    let lit = |s: &'static str| Cow::Borrowed(OsStr::new(s));
    let mut argv: Vec<Cow<'a, OsStr>> = Vec::with_capacity(req.args.len() + 12);
    argv.push(Cow::Owned(req.qemu.clone().into_os_string()));
    argv.push(lit("-0"));
    argv.push(Cow::Borrowed(req.argv0));
    // qemu-user builds the guest's environment by pushing each of its own variables, then each `-E`,
    // onto the head of a list: the guest sees them in reverse. Handing both over reversed gives the
    // guest its environment in the original order, with the LD_* variables (in their own order) first.
    let mut env = Vec::with_capacity(req.env.len());
    let mut ld = Vec::new();
    for &kv in req.env.iter().rev() {
        let b = kv.as_bytes();
        if req.secure && b.starts_with(b"QEMU_") {
            continue;
        }
        // LD_* is for the guest's loader; a dynamic host qemu must not load guest libraries. `-E`
        // splits on commas, so a value with one stays in the environment (harmless to a static qemu).
        if b.starts_with(b"LD_") && !b.contains(&b',') {
            ld.push(kv);
            continue;
        }
        env.push(Cow::Borrowed(kv));
    }
    for kv in ld {
        argv.push(lit("-E"));
        argv.push(Cow::Borrowed(kv));
    }
    argv.push(lit("--"));
    match &mode {
        Mode::Direct => argv.push(Cow::Borrowed(req.program)),
        Mode::LoaderFirst { loader, library_path, argv0 } => {
            argv.push(Cow::Owned(loader.clone().into_os_string()));
            argv.push(lit("--inhibit-cache"));
            if !library_path.is_empty() {
                argv.push(lit("--library-path"));
                let mut joined = Vec::new();
                for (i, d) in library_path.iter().enumerate() {
                    if i > 0 {
                        joined.push(b':');
                    }
                    joined.extend_from_slice(d.as_os_str().as_bytes());
                }
                argv.push(Cow::Owned(OsString::from_vec(joined)));
            }
            if *argv0 {
                argv.push(lit("--argv0"));
                argv.push(Cow::Borrowed(req.argv0));
            }
            argv.push(Cow::Borrowed(req.program));
        }
    }
    for &a in req.args {
        argv.push(Cow::Borrowed(a));
    }
    Ok(Plan { exe: req.qemu.clone(), argv, env, mode, why: why.lines })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch;
    use std::collections::HashSet;

    struct FakeFs {
        files: HashSet<PathBuf>,
        argv0: bool,
    }
    impl Probe for FakeFs {
        fn is_file(&self, p: &Path) -> bool {
            self.files.contains(p)
        }
        fn list(&self, dir: &Path, prefix: &[u8]) -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = self
                .files
                .iter()
                .filter(|f| f.parent() == Some(dir) && f.file_name().is_some_and(|n| n.as_bytes().starts_with(prefix)))
                .cloned()
                .collect();
            v.sort();
            v
        }
        fn loader_has_argv0(&self, _: &Path) -> bool {
            self.argv0
        }
        fn canonicalize(&self, _: &Path) -> Option<PathBuf> {
            None
        }
    }
    fn fs(files: &[&str]) -> FakeFs {
        FakeFs { files: files.iter().map(PathBuf::from).collect(), argv0: true }
    }

    fn facts(interp: Option<&str>, e_type: u16, lowest: u64, runpath: Option<&str>, needed: &[&str]) -> ElfFacts {
        ElfFacts {
            arch: arch::by_name("aarch64").unwrap(),
            e_type,
            interp: interp.map(|s| s.as_bytes().to_vec()),
            runpath: runpath.map(|s| s.as_bytes().to_vec()),
            runpath_is_rpath: false,
            needed: needed.iter().map(|s| s.as_bytes().to_vec()).collect(),
            lowest_load: Some(lowest),
            highest_load: Some(lowest + 0x10000),
        }
    }

    fn req<'a>(
        f: &'a ElfFacts,
        path: &'a str,
        args: &'a [&'a OsStr],
        env: &'a [&'a OsStr],
        strategy: Strategy,
        page: u64,
    ) -> Request<'a> {
        Request {
            program: OsStr::new(path),
            path: OsStr::new(path),
            argv0: OsStr::new("prog0"),
            args,
            env,
            facts: f,
            qemu: PathBuf::from("/q/qemu-aarch64"),
            strategy,
            sysroots: &[],
            page_size: page,
            secure: false,
            explain: true,
        }
    }

    fn argv(p: &Plan) -> Vec<String> {
        p.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    const BT: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-bootstrap-tools";

    #[test]
    fn static_runs_direct_even_when_loader_first_is_asked() {
        let f = facts(None, 2, 0x400000, None, &[]);
        let args = [OsStr::new("a b")];
        let p = plan(&req(&f, "/bin/x", &args, &[], Strategy::LoaderFirst, 4096), &fs(&[])).unwrap();
        assert_eq!(argv(&p), ["/q/qemu-aarch64", "-0", "prog0", "--", "/bin/x", "a b"]);
        assert_eq!(p.mode, Mode::Direct);
    }

    #[test]
    fn dynamic_with_loader_in_place_runs_direct() {
        let f = facts(Some("/lib/ld-linux-aarch64.so.1"), 3, 0, None, &["libc.so.6"]);
        let files = fs(&["/lib/ld-linux-aarch64.so.1", "/lib/aarch64-linux-gnu/libc.so.6"]);
        let p = plan(&req(&f, "/bin/x", &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert_eq!(argv(&p), ["/q/qemu-aarch64", "-0", "prog0", "--", "/bin/x"]);
    }

    #[test]
    fn bootstrap_tools_with_missing_interp_goes_loader_first_with_the_trees_lib() {
        let interp = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-bootstrap-tools/lib/ld-linux-aarch64.so.1";
        let f = facts(Some(interp), 2, 0x3ff000, None, &["libc.so.6"]);
        let loader = format!("{BT}/lib/ld-linux-aarch64.so.1");
        let files = fs(&[&loader, &format!("{BT}/lib/libc.so.6")]);
        let path = format!("{BT}/bin/bash");
        let p = plan(&req(&f, &path, &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert_eq!(
            argv(&p),
            [
                "/q/qemu-aarch64",
                "-0",
                "prog0",
                "--",
                &loader,
                "--inhibit-cache",
                "--library-path",
                &format!("{BT}/lib"),
                "--argv0",
                "prog0",
                &path
            ]
        );
    }

    #[test]
    fn forced_rpath_finds_libc_so_no_library_path_is_added() {
        let interp = "/elsewhere/lib/ld-linux-aarch64.so.1";
        let f = facts(Some(interp), 2, 0x400000, Some(&format!("{BT}/lib")), &["libc.so.6"]);
        let loader = format!("{BT}/lib/ld-linux-aarch64.so.1");
        let files = fs(&[&loader, &format!("{BT}/lib/libc.so.6")]);
        let path = format!("{BT}/bin/sed");
        let p = plan(&req(&f, &path, &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert_eq!(
            argv(&p),
            ["/q/qemu-aarch64", "-0", "prog0", "--", &loader, "--inhibit-cache", "--argv0", "prog0", &path]
        );
    }

    #[test]
    fn guest_base_risk_on_16k_pages_goes_loader_first_but_not_on_4k() {
        let interp = format!("{BT}/lib/ld-linux-aarch64.so.1");
        let f = facts(Some(&interp), 2, 0x3ff000, Some(&format!("{BT}/lib")), &["libc.so.6"]);
        let files = fs(&[&interp, &format!("{BT}/lib/libc.so.6")]);
        let path = format!("{BT}/bin/bash");
        let p4 = plan(&req(&f, &path, &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert_eq!(p4.mode, Mode::Direct);
        let p16 = plan(&req(&f, &path, &[], &[], Strategy::Auto, 16384), &files).unwrap();
        assert!(matches!(p16.mode, Mode::LoaderFirst { ref library_path, .. } if library_path.is_empty()));
        // 0x3fc000 is 16K-aligned but not 64K-aligned.
        let g = facts(Some(&interp), 2, 0x3fc000, None, &[]);
        assert!(!guest_base_risk(&g, 16384));
        assert!(guest_base_risk(&g, 65536));
        // ET_DYN never has the risk.
        assert!(!guest_base_risk(&facts(Some(&interp), 3, 0x3ff000, None, &[]), 65536));
    }

    /// Regression: Debian's ld.so placed in a store path (no RPATH on the program) does not search
    /// its own directory; the libraries there must be handed over with --library-path.
    #[test]
    fn libraries_only_beside_a_loader_in_place_go_loader_first_with_that_dir() {
        let interp = format!("{BT}/lib/ld-linux-aarch64.so.1");
        let f = facts(Some(&interp), 3, 0, None, &["libtinfo.so.6", "libc.so.6"]);
        let files = fs(&[&interp, &format!("{BT}/lib/libc.so.6"), &format!("{BT}/lib/libtinfo.so.6")]);
        let path = format!("{BT}/bin/bash");
        let p = plan(&req(&f, &path, &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert_eq!(
            p.mode,
            Mode::LoaderFirst {
                loader: interp.clone().into(),
                library_path: vec![format!("{BT}/lib").into()],
                argv0: true
            }
        );
    }

    #[test]
    fn loader_without_argv0_still_runs_and_says_so() {
        let interp = "/gone/ld-linux-aarch64.so.1";
        let f = facts(Some(interp), 3, 0, None, &[]);
        let loader = format!("{BT}/lib/ld-linux-aarch64.so.1");
        let mut files = fs(&[&loader]);
        files.argv0 = false;
        let path = format!("{BT}/bin/x");
        let p = plan(&req(&f, &path, &[], &[], Strategy::Auto, 4096), &files).unwrap();
        assert!(!argv(&p).contains(&"--argv0".to_string()));
        assert!(p.why.iter().any(|w| w.contains("--argv0")));
    }

    #[test]
    fn missing_loader_is_an_error_naming_where_it_looked() {
        let f = facts(Some("/nope/ld-linux-aarch64.so.1"), 3, 0, Some("$ORIGIN/../lib"), &[]);
        let e = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &fs(&[])).unwrap_err();
        let PlanError::LoaderMissing { looked, .. } = e;
        let want: Vec<PathBuf> = [
            "/p/bin/../lib/ld-linux-aarch64.so.1",
            "/usr/aarch64-linux-gnu/nope/ld-linux-aarch64.so.1",
            "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1",
            "/usr/aarch64-linux-gnu/lib64/ld-linux-aarch64.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(looked, want);
    }

    #[test]
    fn sysroot_supplies_loader_and_libraries() {
        let f = facts(Some("/lib/ld-linux-aarch64.so.1"), 3, 0, None, &["libc.so.6"]);
        let files = fs(&["/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1", "/usr/aarch64-linux-gnu/lib/libc.so.6"]);
        let sys = [PathBuf::from("/usr/aarch64-linux-gnu")];
        let mut r = req(&f, "/bin/x", &[], &[], Strategy::Auto, 4096);
        r.sysroots = &sys;
        let p = plan(&r, &files).unwrap();
        assert_eq!(
            p.mode,
            Mode::LoaderFirst {
                loader: "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1".into(),
                library_path: vec!["/usr/aarch64-linux-gnu/lib".into()],
                argv0: true
            }
        );
    }

    /// The interpreter asks for no reasons; everything else about the plan is the same.
    #[test]
    fn without_explain_the_plan_is_the_same_and_has_no_reasons() {
        let interp = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-bootstrap-tools/lib/ld-linux-aarch64.so.1";
        let f = facts(Some(interp), 2, 0x3ff000, None, &["libc.so.6"]);
        let files = fs(&[&format!("{BT}/lib/ld-linux-aarch64.so.1"), &format!("{BT}/lib/libc.so.6")]);
        let path = format!("{BT}/bin/sh");
        let env = [OsStr::new("A=1")];
        let mut r = req(&f, &path, &[], &env, Strategy::Auto, 16384);
        let told = plan(&r, &files).unwrap();
        r.explain = false;
        let quiet = plan(&r, &files).unwrap();
        assert!(told.why.len() >= 3, "{:?}", told.why);
        assert!(quiet.why.is_empty(), "{:?}", quiet.why);
        assert_eq!(Plan { why: told.why.clone(), ..quiet }, told);
    }

    #[test]
    fn ld_variables_move_to_dash_e_and_qemu_variables_go_when_secure() {
        let f = facts(None, 3, 0, None, &[]);
        let env =
            ["A=1", "LD_LIBRARY_PATH=/x", "LD_PRELOAD=a,b", "QEMU_GDB=1234", "LD_BIND_NOW=1", "B=2"].map(OsStr::new);
        let mut r = req(&f, "/bin/x", &[], &env, Strategy::Auto, 4096);
        let p = plan(&r, &fs(&[])).unwrap();
        let expect =
            ["/q/qemu-aarch64", "-0", "prog0", "-E", "LD_BIND_NOW=1", "-E", "LD_LIBRARY_PATH=/x", "--", "/bin/x"];
        assert_eq!(argv(&p), expect);
        // Reversed: qemu reverses it again.
        assert_eq!(p.env, ["B=2", "QEMU_GDB=1234", "LD_PRELOAD=a,b", "A=1"].map(OsStr::new));
        r.secure = true;
        let p = plan(&r, &fs(&[])).unwrap();
        assert_eq!(p.env, ["B=2", "LD_PRELOAD=a,b", "A=1"].map(OsStr::new));
    }

    #[test]
    fn origin_expands_in_runpath() {
        assert_eq!(
            search_dirs(b"$ORIGIN/../lib:${ORIGIN}:/abs", Path::new("/s/bin")),
            vec![PathBuf::from("/s/bin/../lib"), PathBuf::from("/s/bin"), PathBuf::from("/abs")]
        );
    }

    /// The byte-level search_dirs and bootstrap_tools_root against the split/collect and
    /// Path::components versions they replaced, over generated RUNPATHs and paths.
    #[test]
    fn byte_level_runpath_and_tree_detection_agree_with_the_std_versions() {
        fn search_dirs_std(runpath: &[u8], origin: &Path) -> Vec<PathBuf> {
            let o = origin.as_os_str().as_bytes();
            runpath
                .split(|&b| b == b':')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let (mut out, mut i) = (Vec::new(), 0);
                    while i < d.len() {
                        let rest = &d[i..];
                        if let Some(t) = [&b"$ORIGIN"[..], b"${ORIGIN}"].iter().find(|t| rest.starts_with(t)) {
                            out.extend_from_slice(o);
                            i += t.len();
                        } else {
                            out.push(d[i]);
                            i += 1;
                        }
                    }
                    PathBuf::from(OsString::from_vec(out))
                })
                .collect()
        }
        fn root_std(path: &Path) -> Option<PathBuf> {
            let mut root = PathBuf::new();
            for comp in path.components() {
                root.push(comp);
                let name = comp.as_os_str().as_bytes();
                if let Some(h) = name.strip_suffix(b"-bootstrap-tools") {
                    if h.len() == 32
                        && h.iter().all(|&c| matches!(c, b'0'..=b'9' | b'a'..=b'z') && !b"eotu".contains(&c))
                    {
                        return Some(root);
                    }
                }
            }
            None
        }
        let parts: [&[u8]; 9] = [b":", b"$ORIGIN", b"${ORIGIN}", b"$", b"{", b"/lib", b"a", b"$ORIG", b"::"];
        let bt = format!("/{BT}").into_bytes();
        let tree_parts: [&[u8]; 6] = [b"/", b"bin", b"x", &bt[..], b"-bootstrap-tools", b"nix"];
        let mut rng = crate::interp::fuzz::Rng(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rng.below(n);
        let mut found = 0;
        for _ in 0..20_000 {
            let rp: Vec<u8> = (0..next(8)).flat_map(|_| parts[next(parts.len())].to_vec()).collect();
            assert_eq!(search_dirs(&rp, Path::new("/o/bin")), search_dirs_std(&rp, Path::new("/o/bin")), "{rp:?}");
            let p: Vec<u8> = (0..next(7)).flat_map(|_| tree_parts[next(tree_parts.len())].to_vec()).collect();
            let p = Path::new(OsStr::from_bytes(&p));
            // The byte version keeps the path as written (`//`, `/./`); the std one normalises it.
            // Both name the same directory, so compare them normalised.
            let norm = |r: Option<PathBuf>| r.map(|r| r.components().collect::<PathBuf>());
            assert_eq!(norm(bootstrap_tools_root(p)), root_std(p), "{p:?}");
            found += usize::from(root_std(p).is_some());
        }
        assert!(found > 1000, "too few paths in a tree were generated: {found}");
    }

    #[test]
    fn bootstrap_tools_root_needs_a_store_hash() {
        assert_eq!(bootstrap_tools_root(Path::new(&format!("{BT}/libexec/x/y"))), Some(PathBuf::from(BT)));
        assert_eq!(bootstrap_tools_root(Path::new("/tmp/my-bootstrap-tools/bin/x")), None);
        // 'e', 'o', 't', 'u' are not in Nix's base32 alphabet.
        assert_eq!(
            bootstrap_tools_root(Path::new("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-bootstrap-tools/bin/x")),
            None
        );
    }

    /// Counts what the planner asks of the file system.
    struct Counting<'a>(&'a FakeFs, std::cell::Cell<usize>);
    impl Probe for Counting<'_> {
        fn is_file(&self, p: &Path) -> bool {
            self.1.set(self.1.get() + 1);
            self.0.is_file(p)
        }
        fn list(&self, dir: &Path, prefix: &[u8]) -> Vec<PathBuf> {
            self.1.set(self.1.get() + 1);
            self.0.list(dir, prefix)
        }
        fn loader_has_argv0(&self, l: &Path) -> bool {
            self.0.loader_has_argv0(l)
        }
        fn canonicalize(&self, p: &Path) -> Option<PathBuf> {
            self.1.set(self.1.get() + 1);
            self.0.canonicalize(p)
        }
    }

    fn hostile_facts(interp: &[u8], runpath: Option<&[u8]>, needed: usize) -> ElfFacts {
        crate::interp::elf::tests::facts_of(&crate::interp::elf::tests::hostile(interp, runpath, needed)).unwrap()
    }

    /// Regression (issue 12): 64 missing DT_NEEDED and a RUNPATH of 4096 directories cost 266,503
    /// `statx` calls for one exec. Now the search stops at the budget and ld.so takes over.
    #[test]
    fn probes_are_capped_whatever_runpath_and_needed_say_and_the_program_goes_loader_first() {
        let loader = "/lib/ld-linux-aarch64.so.1";
        let f = hostile_facts(loader.as_bytes(), Some(&crate::interp::elf::tests::runpath_4096()), 64);
        let files = fs(&[loader]);
        let probe = Counting(&files, 0.into());
        let p = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &probe).unwrap();
        assert!(probe.1.get() <= MAX_PROBES as usize, "{} probes", probe.1.get());
        assert_eq!(p.mode, Mode::LoaderFirst { loader: loader.into(), library_path: vec![], argv0: true });
        assert!(p.why.iter().any(|w| w.contains("probes spent")), "{:?}", p.why);
    }

    /// A Nix-like program (a dozen RUNPATH store directories, a dozen libraries, each in the last
    /// directory) stays well inside the budget and still runs direct.
    #[test]
    fn a_nix_like_program_is_not_touched_by_the_probe_budget() {
        let loader = "/lib/ld-linux-aarch64.so.1";
        let dirs: Vec<String> = (0..12).map(|i| format!("/nix/store/{i:032}-dep{i}/lib")).collect();
        let rp = dirs.join(":");
        let f = hostile_facts(loader.as_bytes(), Some(rp.as_bytes()), 12);
        let mut names = vec![loader.to_string()];
        names.extend((0..12).map(|i| format!("{}/libmissing{i}.so", dirs[11])));
        let files = fs(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let probe = Counting(&files, 0.into());
        let p = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &probe).unwrap();
        assert_eq!(p.mode, Mode::Direct, "{:?}", p.why);
        assert!(probe.1.get() < MAX_PROBES as usize / 2, "{} probes", probe.1.get());
        // 145
    }

    /// The library search looks beside the previous find first: fewer probes for RUNPATHs in the
    /// libraries' order or its reverse, and the same plan as a search in plain order wherever the
    /// libraries lie (some only in a sysroot, some nowhere).
    #[test]
    fn libraries_are_looked_for_beside_the_previous_one_and_found_wherever_they_lie() {
        let loader = "/lib/ld-linux-aarch64.so.1";
        let dirs: Vec<String> = (0..12).map(|i| format!("/nix/store/{i:032}-dep{i}/lib")).collect();
        let sysroot_lib = "/usr/aarch64-linux-gnu/lib";
        let probes = |order: &[usize]| {
            let rp = order.iter().map(|&i| dirs[i].as_str()).collect::<Vec<_>>().join(":");
            let f = hostile_facts(loader.as_bytes(), Some(rp.as_bytes()), 12);
            let mut names = vec![loader.to_string()];
            names.extend((0..12).map(|i| format!("{}/libmissing{i}.so", dirs[i])));
            let files = fs(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let probe = Counting(&files, 0.into());
            let p = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &probe).unwrap();
            assert_eq!(p.mode, Mode::Direct, "{:?}", p.why);
            probe.1.get()
        };
        let forward: Vec<usize> = (0..12).collect();
        let backward: Vec<usize> = (0..12).rev().collect();
        // One stat for the loader, then the libraries.
        assert!(probes(&forward) <= 1 + 12, "{}", probes(&forward));
        assert!(probes(&backward) <= 1 + 12 + 3 * 11, "{}", probes(&backward));

        let mut rng = crate::interp::fuzz::Rng(0x1234_5678_9abc_def1);
        let mut next = |n: usize| rng.below(n);
        for _ in 0..300 {
            // Library i lies in RUNPATH directory place[i] (0..12), in the sysroot (12) or nowhere (13).
            let place: Vec<usize> = (0..12).map(|_| if next(4) == 0 { 12 + next(2) } else { next(12) }).collect();
            let rp = dirs.join(":");
            let f = hostile_facts(loader.as_bytes(), Some(rp.as_bytes()), 12);
            let mut names = vec![loader.to_string()];
            for (i, &d) in place.iter().enumerate() {
                match d {
                    0..=11 => names.push(format!("{}/libmissing{i}.so", dirs[d])),
                    12 => names.push(format!("{sysroot_lib}/libmissing{i}.so")),
                    _ => {}
                }
            }
            let files = fs(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let p = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &files).unwrap();
            let expect = if place.contains(&12) {
                Mode::LoaderFirst { loader: loader.into(), library_path: vec![sysroot_lib.into()], argv0: true }
            } else {
                Mode::Direct
            };
            assert_eq!(p.mode, expect, "{place:?}");
        }
    }

    /// Regression (issue 12): a 4 KiB PT_INTERP that exists nowhere and a RUNPATH of 4096
    /// directories made one error line of 16.7 MB.
    #[test]
    fn a_missing_4k_loader_with_a_4096_directory_runpath_gives_one_short_line() {
        let interp = vec![b'l'; 4095];
        let f = hostile_facts(&interp, Some(&crate::interp::elf::tests::runpath_4096()), 0);
        let probe = Counting(&fs(&[]), 0.into());
        let e = plan(&req(&f, "/p/bin/x", &[], &[], Strategy::Auto, 4096), &probe).unwrap_err();
        // The budget, then the sysroot's three places (host configuration, outside the budget).
        assert!(probe.1.get() <= MAX_PROBES as usize + 3, "{} probes", probe.1.get());
        let line = crate::interp::error_line(b"/p/bin/x", &e.to_string(), "a hint");
        assert!(line.len() <= crate::interp::MAX_LINE, "{} bytes", line.len());
        let text = String::from_utf8(line).unwrap();
        assert!(text.starts_with("nixqimg: /p/bin/x: its loader llll"), "{text}");
        assert!(text.ends_with(" bytes left out) (a hint)\n"), "{text}");
        assert_eq!(text.matches('\n').count(), 1);
    }

    #[test]
    fn error_lines_are_cut_at_4k_with_a_count_and_keep_short_ones_whole() {
        use crate::interp::{error_line, MAX_LINE};
        assert_eq!(error_line(b"/x", "gone", "do this"), b"nixqimg: /x: gone (do this)\n");
        assert_eq!(error_line(b"/x", "gone", ""), b"nixqimg: /x: gone\n");
        for n in [MAX_LINE - 30, MAX_LINE, 5000, 1 << 20] {
            let what = "é".repeat(n / 2);
            let line = error_line(b"/x", &what, "hint");
            assert!(line.len() <= MAX_LINE, "{n}: {}", line.len());
            let text = String::from_utf8(line.clone()).expect("cut on a character boundary");
            let full = 13 + what.len() + 8;
            if full <= MAX_LINE {
                assert!(!text.contains("left out"), "{n}");
            } else {
                let kept = text.len() - " (hint)\n".len();
                let count: usize = text[..kept].rsplit('(').next().unwrap().split(' ').next().unwrap().parse().unwrap();
                // What was kept plus what was left out is the whole body.
                let marker = format!("… ({count} bytes left out)");
                assert_eq!(kept - marker.len() + count, 13 + what.len(), "{n}: {text}");
            }
        }
    }
}
