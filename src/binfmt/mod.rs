//! binfmt_misc registration: the lines nixqimg writes (from the one arch table), `register`,
//! `unregister` and `status`. Pure decisions live in the submodules and are unit-tested; the writes to
//! `/proc/sys/fs/binfmt_misc` happen only in [`apply`] (and the `--binfmt-d` file writes).

pub mod choose;
pub mod entries;
pub mod lines;
pub mod native;
pub mod ns;
pub mod status;

use crate::arch::{self, Arch, ARCHES};
use crate::error::{code, Error, Result};
use entries::Entry;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Prefix of every entry nixqimg owns (`nixqimg-aarch64`); `unregister` touches nothing else.
pub const NAME_PREFIX: &str = "nixqimg-";

/// The entry name nixqimg uses for `arch`, e.g. `nixqimg-aarch64`.
pub fn entry_name(arch: &Arch) -> String {
    format!("{NAME_PREFIX}{}", arch.name)
}

/// Flags as the kernel wants them: `P` always (the interpreter needs the original argv[0]), then
/// `O`, `C`, `F` in a fixed order; `C` implies `O` in the kernel, so we spell it out.
pub fn normalize_flags(flags: &str) -> Result<String> {
    let mut want = [true, false, false, false];
    for c in flags.chars() {
        match c.to_ascii_uppercase() {
            'P' => want[0] = true,
            'O' => want[1] = true,
            'C' => {
                want[1] = true;
                want[2] = true
            }
            'F' => want[3] = true,
            _ => {
                return Err(Error::new(format!("binfmt flag '{c}' is not one of P, O, C, F"))
                    .hint("e.g. --flags PF (the default) or --flags POCF")
                    .code(code::USAGE))
            }
        }
    }
    Ok("POCF".chars().zip(want).filter(|(_, w)| *w).map(|(c, _)| c).collect())
}

/// One binfmt_misc registration line for `arch`, ready to write to
/// `/proc/sys/fs/binfmt_misc/register` (or to put in a systemd `binfmt.d` file):
/// `:NAME:M::MAGIC:MASK:INTERPRETER:FLAGS`, magic and mask from [`crate::arch`], `P` always added to
/// `flags`. Fails when the kernel would reject or misparse the line: a name or interpreter holding `:`,
/// `/`-less or non-UTF-8 interpreter path, a name that is not a plain file name, or an unknown flag.
pub fn registration_line(arch: &Arch, name: &str, interpreter: &Path, flags: &str) -> Result<String> {
    line_for(name, arch.magic, arch.mask, interpreter, flags)
}

/// The marker entry that carries execs from chroots and containers to a static qemu
/// ([`crate::route`]): `:nixqimg-<arch>-qemu:M::MAGIC':MASK':QEMU:POF`.
pub fn marker_line(arch: &Arch, qemu: &Path) -> Result<String> {
    let (magic, mask) = crate::interp::route::magic_mask(arch);
    line_for(&crate::interp::route::entry_name(arch), &magic, &mask, qemu, crate::interp::route::FLAGS)
}

fn line_for(name: &str, magic: &[u8], mask: &[u8], interpreter: &Path, flags: &str) -> Result<String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', ':', '\n']) || name.len() > 64 {
        return Err(Error::new(format!("'{name}' cannot name a binfmt_misc entry"))
            .hint("use a short name without '/', ':' or newlines, e.g. nixqimg-aarch64")
            .code(code::USAGE));
    }
    let interp = interpreter.to_str().filter(|s| s.starts_with('/') && !s.contains([':', '\n']));
    let Some(interp) = interp else {
        return Err(Error::new(format!(
            "{}: binfmt_misc needs an absolute, UTF-8 interpreter path without ':'",
            interpreter.display()
        ))
        .hint("install nixqimg (or qemu) under a plain path such as /usr/local/bin")
        .code(code::USAGE));
    };
    let flags = normalize_flags(flags)?;
    Ok(format!(":{name}:M::{}:{}:{interp}:{flags}", Arch::escaped(magic), Arch::escaped(mask)))
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// Systems to serve: aarch64-linux, aarch64, arm64, armv7l-linux, riscv64-linux, ...
    pub systems: Vec<String>,
    /// Every system in nixqimg's table this host does not run natively.
    #[arg(long, conflicts_with = "systems")]
    pub all: bool,
    /// binfmt_misc flags (P is always added): PF pins the interpreter at registration, POCF also
    /// runs setuid foreign programs with their owner's credentials.
    #[arg(long, default_value = "PF")]
    pub flags: String,
    /// Mount binfmt_misc at /proc/sys/fs/binfmt_misc first when it is not mounted.
    #[arg(long)]
    pub mount: bool,
    /// Print what would be written, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Take over systems another entry serves: disable that entry ('nixqimg unregister' re-enables it).
    #[arg(long)]
    pub replace: bool,
    /// Write systemd-binfmt files (nixqimg-<arch>.conf) into DIR instead of registering now.
    #[arg(long, value_name = "DIR")]
    pub binfmt_d: Option<PathBuf>,
    /// Register a static qemu itself, with F: for container builds, where nothing nixqimg would
    /// exec is visible.
    #[arg(long)]
    pub direct: bool,
    /// The interpreter to register (default: this nixqimg binary).
    #[arg(long, value_name = "PATH", conflicts_with = "direct")]
    pub interpreter: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UnregisterArgs {
    /// Systems whose nixqimg entries to remove (default: all of nixqimg's entries).
    pub systems: Vec<String>,
    /// Every nixqimg entry.
    #[arg(long, conflicts_with = "systems")]
    pub all: bool,
    /// Print what would be written, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Machine-readable output (documented in README.md).
    #[arg(long)]
    pub json: bool,
}

/// One change to binfmt_misc, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Keep { name: String, system: &'static str },
    Remove { name: String },
    Register { name: String, system: &'static str, line: String },
    Disable { name: String, system: &'static str },
    Enable { name: String, system: &'static str },
}

fn usage(what: String, hint: &str) -> Error {
    Error::new(what).hint(hint.to_string()).code(code::USAGE)
}

fn known_systems() -> String {
    ARCHES.iter().map(|a| a.nix_system).collect::<Vec<_>>().join(", ")
}

/// Resolves the command line's systems; natives are refused when named and skipped by `--all`.
pub fn resolve_systems(names: &[String], all: bool, natives: &[native::Native]) -> Result<Vec<&'static Arch>> {
    if all {
        return Ok(ARCHES.iter().filter(|a| !native::is_native(natives, a)).collect());
    }
    let mut out: Vec<&'static Arch> = Vec::new();
    for n in names {
        let a = arch::by_name(n).ok_or_else(|| {
            usage(format!("'{n}' is not a system nixqimg knows"), &format!("one of {}", known_systems()))
        })?;
        if let Some(nat) = natives.iter().find(|x| x.arch.name == a.name) {
            return Err(usage(
                format!(
                    "{} runs natively on this host ({}); registering it would send native programs through qemu",
                    a.nix_system, nat.how
                ),
                "leave it out; --all skips native systems",
            ));
        }
        if !out.iter().any(|o| o.name == a.name) {
            out.push(a);
        }
    }
    Ok(out)
}

/// What `register` must do so that each of `wanted` (arch, interpreter) is served by nixqimg's entry.
/// Refuses, before any change, to shadow another enabled entry unless `replace`.
pub fn plan_register(
    entries: &[Entry],
    wanted: &[(&'static Arch, PathBuf)],
    flags: &str,
    replace: bool,
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (a, interp) in wanted {
        let name = entry_name(a);
        let line = registration_line(a, &name, interp, flags)?;
        let want = lines::parse(&line).ok_or_else(|| Error::new(format!("internal: cannot parse {line}")))?;
        let ours = entries.iter().find(|e| e.name == name);
        let same = ours.is_some_and(|o| {
            o.enabled && o.interpreter == want.interpreter && o.flags == want.flags && o.matcher == want.matcher
        });
        let others: Vec<&Entry> = entries.iter().filter(|e| e.enabled && e.name != name && e.serves(a)).collect();
        let we_win = same && others.iter().all(|o| ours.is_some_and(|us| us.order > o.order));
        if !others.is_empty() && !replace && !we_win {
            let o = others[0];
            return Err(Error::new(format!(
                "{} already serves {} (interpreter {}); nixqimg will not shadow it",
                o.name, a.nix_system, o.interpreter
            ))
            .hint(format!(
                "rerun with --replace ('nixqimg unregister' puts it back), or remove it: echo -1 > {}/{}",
                entries::DIR,
                o.name
            )));
        }
        if same {
            steps.push(Step::Keep { name: name.clone(), system: a.nix_system });
        } else {
            if ours.is_some() {
                steps.push(Step::Remove { name: name.clone() });
            }
            steps.push(Step::Register { name: name.clone(), system: a.nix_system, line });
        }
        if replace {
            for o in others {
                steps.push(Step::Disable { name: o.name.clone(), system: a.nix_system });
            }
        }
    }
    Ok(steps)
}

/// What `register` must do so that each of `markers` (arch, static qemu) has its marker entry
/// ([`crate::route`]). Marker entries take no real program, so they shadow nothing.
pub fn plan_markers(entries: &[Entry], markers: &[(&'static Arch, PathBuf)]) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (a, qemu) in markers {
        let name = crate::interp::route::entry_name(a);
        let line = marker_line(a, qemu)?;
        let want = lines::parse(&line).ok_or_else(|| Error::new(format!("internal: cannot parse {line}")))?;
        let ours = entries.iter().find(|e| e.name == name);
        if ours.is_some_and(|o| {
            o.enabled && o.interpreter == want.interpreter && o.flags == want.flags && o.matcher == want.matcher
        }) {
            steps.push(Step::Keep { name, system: a.nix_system });
            continue;
        }
        if ours.is_some() {
            steps.push(Step::Remove { name: name.clone() });
        }
        steps.push(Step::Register { name, system: a.nix_system, line });
    }
    Ok(steps)
}

/// What `unregister` must do: remove nixqimg's entries for `systems` (all of them when `None`) and
/// re-enable, for each system left unserved, the newest disabled entry that serves it (the one
/// `register --replace` displaced).
pub fn plan_unregister(entries: &[Entry], systems: Option<&[&'static Arch]>) -> Vec<Step> {
    let doomed: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.is_ours())
        .filter(|e| {
            systems.map_or(true, |s| {
                s.iter()
                    .any(|a| e.name == entry_name(a) || e.name == crate::interp::route::entry_name(a) || e.serves(a))
            })
        })
        .collect();
    let mut steps: Vec<Step> = doomed.iter().map(|e| Step::Remove { name: e.name.clone() }).collect();
    let gone = |e: &Entry| doomed.iter().any(|d| d.name == e.name);
    for a in ARCHES.iter().filter(|a| doomed.iter().any(|d| d.serves(a))) {
        if entries.iter().any(|e| e.enabled && !gone(e) && e.serves(a)) {
            continue;
        }
        let mut disabled: Vec<&Entry> = entries.iter().filter(|e| !e.enabled && !gone(e) && e.serves(a)).collect();
        disabled.sort_by_key(|e| std::cmp::Reverse(e.order));
        if let Some(d) = disabled.first() {
            if !steps.iter().any(|s| matches!(s, Step::Enable { name, .. } if *name == d.name)) {
                steps.push(Step::Enable { name: d.name.clone(), system: a.nix_system });
            }
        }
    }
    steps
}

fn write_proc(path: &Path, data: &[u8]) -> std::io::Result<()> {
    // binfmt_misc parses each write(2) on its own: one write per command.
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let n = f.write(data)?;
    if n != data.len() {
        return Err(std::io::Error::other("short write"));
    }
    Ok(())
}

fn proc_error(target: &Path, e: std::io::Error, line: &str) -> Error {
    let base = Error::new(format!("{}: {e}", target.display()));
    match e.raw_os_error() {
        Some(libc::EEXIST) => base.hint("an entry of that name exists: 'nixqimg unregister' first"),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            base.hint("binfmt_misc needs root (or a private instance: 'nixqimg ns')")
        }
        Some(libc::ENOENT) if line.contains(":F") || line.ends_with('F') => {
            base.hint("with F the interpreter must exist now: check its path")
        }
        Some(libc::EINVAL) => base.hint(format!("the kernel rejected the line {line}")),
        _ => base,
    }
}

/// Carries the steps out (or only says them, with `dry_run`), one line of output each.
pub fn apply(dir: &Path, steps: &[Step], dry_run: bool, out: &mut dyn Write) -> Result<()> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    for s in steps {
        let (target, data, done) = match s {
            Step::Keep { name, system } => {
                say(out, format!("{name}: already registered for {system}"));
                continue;
            }
            Step::Remove { name } => (dir.join(name), "-1".to_string(), format!("{name}: removed")),
            Step::Register { name, system, line } => {
                (dir.join("register"), line.clone(), format!("{name}: registered for {system}"))
            }
            Step::Disable { name, system } => (
                dir.join(name),
                "0".to_string(),
                format!("{name}: disabled ({system} now goes to nixqimg; 'nixqimg unregister' re-enables it)"),
            ),
            Step::Enable { name, system } => {
                (dir.join(name), "1".to_string(), format!("{name}: re-enabled for {system}"))
            }
        };
        if dry_run {
            say(out, format!("would write '{data}' to {}", target.display()));
            continue;
        }
        write_proc(&target, data.as_bytes()).map_err(|e| proc_error(&target, e, &data))?;
        say(out, done);
    }
    Ok(())
}

/// Makes sure binfmt_misc is mounted at `dir`, mounting it when asked.
pub fn ensure_mounted(dir: &Path, mount: bool, dry_run: bool) -> Result<()> {
    if dir.join("register").exists() {
        return Ok(());
    }
    let cmd = format!("mount -t binfmt_misc binfmt_misc {}", dir.display());
    if !mount {
        return Err(Error::new(format!("binfmt_misc is not mounted at {}", dir.display()))
            .hint(format!("rerun with --mount, or: {cmd}")));
    }
    if dry_run {
        println!("would run: {cmd}");
        return Ok(());
    }
    nix::mount::mount(Some("binfmt_misc"), dir, Some("binfmt_misc"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| {
            Error::new(format!("cannot mount binfmt_misc at {}: {e}", dir.display()))
                .hint("run as root, or use 'nixqimg ns' for a private instance")
        })
}

/// The qemu that `register --direct` names: static, since inside a container its libraries are not
/// visible.
fn direct_qemu(a: &Arch) -> Result<PathBuf> {
    let self_exe = std::fs::read_link("/proc/self/exe").ok();
    let cfg = crate::interp::config::load(self_exe.as_deref(), &crate::interp::config::ProcessEnv, false);
    let q = crate::interp::find_qemu(&cfg, a, &crate::interp::exec::RealProbe).ok_or_else(|| {
        Error::new(format!("no qemu-{}-static or qemu-{} found", a.qemu, a.qemu))
            .hint("install qemu-user-static, or set NIXQIMG_QEMU_DIR")
            .code(code::NOT_FOUND)
    })?;
    let q = std::fs::canonicalize(&q).map_err(|e| Error::io(&q, e))?;
    let f = std::fs::File::open(&q).map_err(|e| Error::io(&q, e))?;
    let facts = crate::interp::elf::read(&f).map_err(|e| Error::new(format!("{}: {e}", q.display())))?;
    if !facts.is_static() {
        return Err(Error::new(format!(
            "{} is dynamically linked: a container cannot load its libraries",
            q.display()
        ))
        .hint("install a static qemu (Debian: qemu-user-static) or point NIXQIMG_QEMU_DIR at one"));
    }
    Ok(q)
}

fn self_interpreter(given: Option<PathBuf>) -> Result<PathBuf> {
    let p = match given {
        Some(p) => p,
        None => std::env::current_exe().map_err(|e| Error::new(format!("cannot find nixqimg's own path: {e}")))?,
    };
    let c = std::fs::canonicalize(&p).map_err(|e| Error::io(&p, e).code(code::NOT_FOUND))?;
    if !c.is_file() {
        return Err(Error::new(format!("{}: not a file", c.display())).code(code::USAGE));
    }
    Ok(c)
}

pub fn run_register(a: RegisterArgs) -> Result<()> {
    let natives = native::detect();
    if a.systems.is_empty() && !a.all {
        return Err(usage("name the systems to register, or --all".into(), "e.g. nixqimg register aarch64-linux"));
    }
    let systems = resolve_systems(&a.systems, a.all, &natives)?;
    let mut flags = normalize_flags(&a.flags)?;
    if a.direct && !flags.contains('F') {
        flags.push('F');
    }
    let mut wanted = Vec::new();
    for s in &systems {
        let interp = if a.direct { direct_qemu(s)? } else { self_interpreter(a.interpreter.clone())? };
        wanted.push((*s, interp));
    }
    let mut out = std::io::stdout().lock();
    let markers = if flags.contains('F') && !a.direct { marker_qemus(&systems, &mut out) } else { Vec::new() };
    if let Some(d) = &a.binfmt_d {
        return write_binfmt_d(d, &wanted, &markers, &flags, a.dry_run, &mut out);
    }
    let dir = PathBuf::from(entries::DIR);
    ensure_mounted(&dir, a.mount, a.dry_run)?;
    let inst = entries::read(&dir);
    let mut steps = plan_register(&inst.entries, &wanted, &flags, a.replace)?;
    steps.extend(plan_markers(&inst.entries, &markers)?);
    apply(&dir, &steps, a.dry_run, &mut out)?;
    if inst.mounted && !inst.enabled {
        let _ = writeln!(out, "note: binfmt_misc is disabled as a whole: echo 1 > {}/status", dir.display());
    }
    Ok(())
}

/// The static qemu for each system's marker entry; a system without one is said, not fatal: nixqimg
/// works everywhere but in chroots and containers that lack qemu.
pub fn marker_qemus(systems: &[&'static Arch], out: &mut dyn Write) -> Vec<(&'static Arch, PathBuf)> {
    let mut v = Vec::new();
    for a in systems {
        match direct_qemu(a) {
            Ok(q) => v.push((*a, q)),
            Err(e) => {
                let _ = writeln!(
                    out,
                    "note: {}: {} ({}); programs in chroots and containers without qemu will not run",
                    crate::interp::route::entry_name(a),
                    e.what,
                    e.hint.as_deref().unwrap_or("")
                );
            }
        }
    }
    v
}

/// The marker lines for `systems`, for a private instance (`nixqimg ns`): systems without a static
/// qemu are left out silently (there is nobody to tell; an exec from a chroot then says what to do).
pub fn marker_lines(systems: &[&'static Arch]) -> Vec<String> {
    systems.iter().filter_map(|a| marker_line(a, &direct_qemu(a).ok()?).ok()).collect()
}

fn write_binfmt_d(
    dir: &Path,
    wanted: &[(&'static Arch, PathBuf)],
    markers: &[(&'static Arch, PathBuf)],
    flags: &str,
    dry: bool,
    out: &mut dyn Write,
) -> Result<()> {
    if !dry {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut dirs: Vec<PathBuf> = lines::BINFMT_D.iter().map(PathBuf::from).collect();
    dirs.push(dir.to_path_buf());
    let existing = lines::read_binfmt_d(&dirs);
    for (a, interp) in wanted {
        let name = entry_name(a);
        let line = registration_line(a, &name, interp, flags)?;
        let file = dir.join(format!("{name}.conf"));
        let text = format!("# {}: written by 'nixqimg register --binfmt-d'\n{line}\n", a.nix_system);
        if dry {
            let _ = writeln!(out, "would write {}: {line}", file.display());
        } else {
            std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
            let _ = writeln!(out, "{}: written for {}", file.display(), a.nix_system);
        }
        for (f, e) in existing.iter().filter(|(f, e)| *f != file && e.name != name && e.serves(a)) {
            let base = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = writeln!(
                out,
                "note: {} registers {} for {} too, and systemd-binfmt lets the file read last win: mask it with 'ln -s /dev/null /etc/binfmt.d/{base}'",
                f.display(),
                e.name,
                a.nix_system
            );
        }
    }
    for (a, qemu) in markers {
        let name = crate::interp::route::entry_name(a);
        let line = marker_line(a, qemu)?;
        let file = dir.join(format!("{name}.conf"));
        let text = format!(
            "# {}: qemu for nixqimg in chroots and containers; written by 'nixqimg register --binfmt-d'\n{line}\n",
            a.nix_system
        );
        if dry {
            let _ = writeln!(out, "would write {}: {line}", file.display());
        } else {
            std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
            let _ = writeln!(out, "{}: written for {}", file.display(), a.nix_system);
        }
    }
    let _ = writeln!(out, "apply with: systemctl restart systemd-binfmt");
    Ok(())
}

pub fn run_unregister(a: UnregisterArgs) -> Result<()> {
    let systems: Option<Vec<&'static Arch>> = if a.all || a.systems.is_empty() {
        None
    } else {
        Some(
            a.systems
                .iter()
                .map(|n| {
                    arch::by_name(n).ok_or_else(|| {
                        usage(format!("'{n}' is not a system nixqimg knows"), &format!("one of {}", known_systems()))
                    })
                })
                .collect::<Result<_>>()?,
        )
    };
    let dir = PathBuf::from(entries::DIR);
    let inst = entries::read(&dir);
    let mut out = std::io::stdout().lock();
    if !inst.mounted {
        let _ = writeln!(out, "binfmt_misc is not mounted at {}: nothing to remove", dir.display());
        return Ok(());
    }
    let steps = plan_unregister(&inst.entries, systems.as_deref());
    if steps.is_empty() {
        let _ = writeln!(out, "no nixqimg entries to remove");
    }
    apply(&dir, &steps, a.dry_run, &mut out)
}

pub fn run_status(a: StatusArgs) -> Result<()> {
    let st = status::collect(Path::new(entries::DIR));
    let mut out = std::io::stdout().lock();
    let text = if a.json { status::to_json(&st) } else { status::render(&st) };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::by_name;

    #[test]
    fn aarch64_line_is_debians_with_our_name_interpreter_and_flags() {
        let a = by_name("aarch64").unwrap();
        let line = registration_line(a, "nixqimg-aarch64", Path::new("/usr/bin/nixqimg"), "F").unwrap();
        assert_eq!(
            line,
            ":nixqimg-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:/usr/bin/nixqimg:PF"
        );
    }

    #[test]
    fn flags_always_hold_p_and_c_implies_o() {
        assert_eq!(normalize_flags("").unwrap(), "P");
        assert_eq!(normalize_flags("fcp").unwrap(), "POCF");
        assert_eq!(normalize_flags("C").unwrap(), "POC");
        assert!(normalize_flags("X").is_err());
    }

    fn entry(name: &str, interp: &str, flags: &str, enabled: bool, order: u64) -> Entry {
        let a = by_name("aarch64").unwrap();
        let mut e = lines::parse(&registration_line(a, name, Path::new(interp), flags).unwrap()).unwrap();
        e.enabled = enabled;
        e.order = order;
        e
    }

    #[test]
    fn register_refuses_to_shadow_unless_replace_and_keeps_what_is_already_right() {
        let a = by_name("aarch64").unwrap();
        let want = [(a, PathBuf::from("/n/nixqimg"))];
        let qemu = entry("qemu-aarch64", "/usr/bin/qemu-aarch64-static", "F", true, 5);
        let e = plan_register(std::slice::from_ref(&qemu), &want, "PF", false).unwrap_err();
        assert!(e.what.starts_with("qemu-aarch64 already serves aarch64-linux"), "{}", e.what);
        let steps = plan_register(std::slice::from_ref(&qemu), &want, "PF", true).unwrap();
        assert!(matches!(&steps[0], Step::Register { name, .. } if name == "nixqimg-aarch64"));
        assert_eq!(steps[1], Step::Disable { name: "qemu-aarch64".into(), system: "aarch64-linux" });
        // Ours, newer than the other and identical: nothing to do, no refusal.
        let ours = entry("nixqimg-aarch64", "/n/nixqimg", "PF", true, 9);
        let steps = plan_register(&[qemu.clone(), ours.clone()], &want, "PF", false).unwrap();
        assert_eq!(steps, [Step::Keep { name: "nixqimg-aarch64".into(), system: "aarch64-linux" }]);
        // Ours with other flags: replaced.
        let steps = plan_register(std::slice::from_ref(&ours), &want, "POCF", false).unwrap();
        assert_eq!(steps[0], Step::Remove { name: "nixqimg-aarch64".into() });
        assert!(matches!(&steps[1], Step::Register { line, .. } if line.ends_with(":POCF")));
    }

    #[test]
    fn unregister_removes_only_ours_and_re_enables_what_was_displaced() {
        let qemu = entry("qemu-aarch64", "/q", "F", false, 5);
        let ours = entry("nixqimg-aarch64", "/n", "PF", true, 9);
        let steps = plan_unregister(&[qemu.clone(), ours.clone()], None);
        assert_eq!(
            steps,
            [
                Step::Remove { name: "nixqimg-aarch64".into() },
                Step::Enable { name: "qemu-aarch64".into(), system: "aarch64-linux" }
            ]
        );
        // Another enabled entry still serves the system: nothing to re-enable.
        let other = entry("other", "/o", "", true, 7);
        let steps = plan_unregister(&[qemu, ours, other], Some(&[by_name("aarch64").unwrap()]));
        assert_eq!(steps, [Step::Remove { name: "nixqimg-aarch64".into() }]);
        assert!(plan_unregister(&[entry("qemu-aarch64", "/q", "F", true, 1)], None).is_empty());
    }

    #[test]
    fn lines_the_kernel_would_misparse_are_refused() {
        let a = by_name("aarch64").unwrap();
        assert!(registration_line(a, "a:b", Path::new("/x"), "").is_err());
        assert!(registration_line(a, "a/b", Path::new("/x"), "").is_err());
        assert!(registration_line(a, "n", Path::new("/x:y"), "").is_err());
        assert!(registration_line(a, "n", Path::new("relative"), "").is_err());
    }
}
