//! Nix and nixqimg: the nix.conf settings nixqimg needs (`nix-config`), the Nix facts `doctor` and
//! `build` check against them, the table the NixOS module reads, and `build` itself.
//!
//! The decisions (which settings, which problems, which attribute, which error) are pure functions
//! with unit tests; running `nix` and copying files happen only in the `run_*` edges.

use crate::arch::{self, Arch, ARCHES};
use crate::config::{self, NoEnv};
use crate::error::{code, Error, Result};
use crate::exec::RealProbe;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, clap::Args)]
pub struct NixConfigArgs {
    /// Systems to emulate (e.g. aarch64-linux,riscv64-linux); default: every foreign system a static
    /// qemu-user is installed for.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// The static nixqimg the binfmt entry names; default: this binary.
    #[arg(long)]
    pub interpreter: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Print the table nixos-module/binfmt.nix reads (nixos-module/binfmt-table.json) and exit.
    #[arg(long, hide = true)]
    pub module_table: bool,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The flake to build from.
    #[arg(default_value = ".")]
    pub flake: String,
    /// Systems to build images for.
    #[arg(long, value_delimiter = ',', default_value = "aarch64-linux")]
    pub system: Vec<String>,
    /// Attribute to build instead of the default (`packages.<build>.qcow-<system>` if the flake has
    /// it, else `nixosConfigurations.<system>.qcow`); `{system}` is replaced per system.
    #[arg(long)]
    pub attr: Option<String>,
    /// Where to copy the images.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Build inside a private binfmt_misc namespace (`nixqimg ns`), single-user Nix only.
    #[arg(long)]
    pub ns: bool,
    /// The static nixqimg to register and expose to the sandbox (with --ns); default: this binary.
    #[arg(long)]
    pub interpreter: Option<PathBuf>,
}

/// What nix.conf must say for builds of `systems` to run through nixqimg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    pub platforms: Vec<String>,
    pub sandbox_paths: Vec<PathBuf>,
}

/// The settings for `systems`: the systems as extra-platforms, and every file the interpreter opens or
/// execs inside the sandbox. Nix 2.8 empties a file listed under a directory that is listed too
/// (NOTES.md), so a path inside another listed path is dropped: the directory already covers it.
pub fn needs(systems: &[&Arch], files: &[PathBuf]) -> Needs {
    let mut platforms: Vec<String> = Vec::new();
    for a in systems {
        if !platforms.iter().any(|p| p == a.nix_system) {
            platforms.push(a.nix_system.to_string());
        }
    }
    Needs { platforms, sandbox_paths: minimal_paths(files) }
}

/// Dedups `paths` and drops every path that lies inside another one, keeping the first order.
pub fn minimal_paths(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if paths.iter().any(|q| q != p && p.starts_with(q)) || out.contains(p) {
            continue;
        }
        out.push(p.clone());
    }
    out
}

/// The nix.conf name that adds to `extra-platforms`. The plain name replaces Nix's own default list
/// (i686-linux and x86_64-v1..v4-linux on x86_64) in nix.conf and on the command line alike; the
/// `extra-` prefix appends to any setting, this one included (measured on Nix 2.8 and 2.26).
pub const ADD_PLATFORMS: &str = "extra-extra-platforms";

impl Needs {
    /// Lines to append to nix.conf; a setting with nothing to add is left out, not set empty.
    pub fn conf_lines(&self) -> String {
        self.pairs().into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }
    /// `--option` pairs that give a single-user `nix` the same settings on its command line.
    pub fn options(&self) -> Vec<OsString> {
        self.pairs().into_iter().flat_map(|(k, v)| ["--option".into(), OsString::from(k), OsString::from(v)]).collect()
    }
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let paths: Vec<String> = self.sandbox_paths.iter().map(|p| p.display().to_string()).collect();
        let mut out = Vec::new();
        if !self.platforms.is_empty() {
            out.push((ADD_PLATFORMS, self.platforms.join(" ")));
        }
        if !paths.is_empty() {
            out.push(("extra-sandbox-paths", paths.join(" ")));
        }
        out
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "extra-platforms": self.platforms,
            "extra-sandbox-paths": self.sandbox_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        })
    }
}

/// The systems named (any spelling the arch table knows), or every foreign one with a qemu found.
/// The host's own system and the ones it runs natively are refused: emulating them is never wanted.
pub fn systems(names: &[String], interpreter: &Path) -> Result<Vec<&'static Arch>> {
    let natives = crate::binfmt::native::detect();
    if names.is_empty() {
        let cfg = config::load(Some(interpreter), &NoEnv, false);
        return Ok(ARCHES
            .iter()
            .filter(|a| !crate::binfmt::native::is_native(&natives, a))
            .filter(|a| crate::interp::find_qemu(&cfg, a, &RealProbe).is_some())
            .collect());
    }
    let mut out = Vec::new();
    for n in names.iter().filter(|n| !n.is_empty()) {
        let a = arch::by_name(n).ok_or_else(|| {
            let known: Vec<&str> = ARCHES.iter().map(|a| a.nix_system).collect();
            Error::new(format!("'{n}' is not a system nixqimg knows"))
                .hint(format!("one of {}", known.join(", ")))
                .code(code::USAGE)
        })?;
        if crate::binfmt::native::is_native(&natives, a) {
            return Err(Error::new(format!("{} runs natively on this machine: nothing to emulate", a.nix_system))
                .hint("leave it out of --systems")
                .code(code::USAGE));
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// The nixqimg to register: `explicit`, else the running binary. The second value is a warning when
/// it is dynamically linked (its libraries are not visible inside a Nix sandbox).
pub fn interpreter(explicit: Option<&Path>) -> Result<(PathBuf, Option<String>)> {
    let path = match explicit {
        Some(p) => std::path::absolute(p).map_err(|e| Error::io(p, e))?,
        None => std::fs::read_link("/proc/self/exe").map_err(|e| Error::io("/proc/self/exe", e))?,
    };
    let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e).code(code::NOT_FOUND))?;
    let facts = crate::elf::read(&file).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
    if facts.arch.name != arch::host().name {
        return Err(Error::new(format!(
            "{}: built for {}, this machine is {}",
            path.display(),
            facts.arch.name,
            arch::host().name
        ))
        .hint("pass --interpreter with a nixqimg built for this machine")
        .code(code::USAGE));
    }
    let warning = (!facts.is_static()).then(|| {
        format!(
            "{} is dynamically linked: inside a Nix sandbox its libraries are not visible (use a static nixqimg: --interpreter, tests/support/build-static, or the Nix package)",
            path.display()
        )
    });
    Ok((path, warning))
}

/// The qemu-user the interpreter at `interpreter` will exec for `a` inside a sandbox (whose
/// environment is empty), and whether it is static.
pub fn sandbox_qemu(interpreter: &Path, a: &Arch) -> Option<(PathBuf, bool)> {
    let cfg = config::load(Some(interpreter), &NoEnv, false);
    let q = crate::interp::find_qemu(&cfg, a, &RealProbe)?;
    let is_static = std::fs::File::open(&q).ok().and_then(|f| crate::elf::read(&f).ok()).is_some_and(|f| f.is_static());
    Some((q, is_static))
}

/// Everything the sandbox must see for `systems`: the interpreter, its config file if there is one,
/// and each system's static qemu. Fails with the fix when a qemu is missing or dynamic.
pub fn compute(systems: &[&'static Arch], interpreter: &Path) -> Result<Needs> {
    let mut files = vec![interpreter.to_path_buf()];
    let conf = interpreter.with_file_name(config::FILE_NAME);
    if conf.is_file() {
        files.push(conf);
    }
    for a in systems {
        match sandbox_qemu(interpreter, a) {
            Some((q, true)) => files.push(q),
            Some((q, false)) => {
                return Err(Error::new(format!(
                    "{} is dynamically linked: its libraries are not visible inside a Nix sandbox",
                    q.display()
                ))
                .hint(format!("install a static qemu-{} (Debian: qemu-user-static)", a.qemu))
                .code(code::NOT_FOUND))
            }
            None => {
                return Err(Error::new(format!("no qemu-{} found for {}", a.qemu, a.nix_system))
                    .hint("install qemu-user-static, or set qemu_dir in nixqimg.conf beside nixqimg")
                    .code(code::NOT_FOUND))
            }
        }
    }
    Ok(needs(systems, &files))
}

/// The table nixos-module/binfmt.nix reads: one entry per architecture, straight from [`ARCHES`].
pub fn module_table() -> String {
    let entries: Vec<serde_json::Value> = ARCHES
        .iter()
        .map(|a| {
            serde_json::json!({
                "system": a.nix_system,
                "name": a.name,
                "entryName": crate::binfmt::entry_name(a),
                "qemu": format!("qemu-{}", a.qemu),
                "family": format!("{:?}", a.family),
                "magic": Arch::escaped(a.magic),
                "mask": Arch::escaped(a.mask),
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({
        "comment": "generated by `nixqimg nix-config --module-table`; a unit test in src/nix.rs keeps it current",
        "flags": "P",
        "systems": entries,
    }))
    .unwrap_or_default();
    s.push('\n');
    s
}

pub fn run_nix_config(a: NixConfigArgs) -> Result<()> {
    if a.module_table {
        return write_stdout(module_table().as_bytes());
    }
    let (interp, warning) = interpreter(a.interpreter.as_deref())?;
    if let Some(w) = warning {
        eprintln!("nixqimg: warning: {w}");
    }
    let systems = systems(&a.systems, &interp)?;
    if systems.is_empty() {
        return Err(Error::new("no foreign system to emulate: no qemu-user found")
            .hint("install qemu-user-static, or name systems with --systems")
            .code(code::NOT_FOUND));
    }
    let needs = compute(&systems, &interp)?;
    if a.json {
        let mut s = serde_json::to_string_pretty(&needs.json()).unwrap_or_default();
        s.push('\n');
        write_stdout(s.as_bytes())
    } else {
        write_stdout(needs.conf_lines().as_bytes())
    }
}

fn write_stdout(b: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(b).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::new(format!("stdout: {e}"))),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// What Nix says about itself (shared with `doctor`).

/// The Nix settings that decide whether a foreign build can run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixFacts {
    pub version: String,
    pub system: String,
    pub sandbox: String,
    pub extra_platforms: Vec<String>,
    pub sandbox_paths: Vec<String>,
    pub store: String,
    /// Builds go through nix-daemon (which does not see a private namespace).
    pub daemon: bool,
}

/// One problem with the fix in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// Parses `nix config show --json` or `nix show-config --json` (both `{"name": {"value": ...}}`).
pub fn parse_show_config(
    json: &str,
    nix_remote: Option<&str>,
    daemon_socket: bool,
    state_writable: bool,
) -> Option<NixFacts> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let get = |k: &str| v.get(k).and_then(|e| e.get("value")).cloned().unwrap_or(serde_json::Value::Null);
    let text = |k: &str| match get(k) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let list = |k: &str| match get(k) {
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        serde_json::Value::String(s) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    };
    let store = text("store");
    let daemon = uses_daemon(&store, nix_remote, daemon_socket, state_writable);
    Some(NixFacts {
        version: String::new(),
        system: text("system"),
        sandbox: text("sandbox"),
        extra_platforms: list("extra-platforms"),
        sandbox_paths: list("sandbox-paths"),
        store,
        daemon,
    })
}

/// Nix's own rule for `store = auto`: the local store when its state directory is writable, else the
/// daemon when its socket exists.
pub fn uses_daemon(store: &str, nix_remote: Option<&str>, daemon_socket: bool, state_writable: bool) -> bool {
    let s = nix_remote.filter(|r| !r.is_empty()).unwrap_or(store);
    match s {
        "daemon" => true,
        s if s.starts_with("unix://") => true,
        "auto" | "" => !state_writable && daemon_socket,
        _ => false,
    }
}

/// `nix --version`'s "nix (Nix) 2.26.3" as (2, 26); `None` when it says something else.
pub fn parse_version(out: &str) -> Option<(u32, u32)> {
    let v = out.trim().rsplit(' ').next()?;
    let mut it = v.split(['.', 'p', 'r', '-', '+']).map(|n| n.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// How to ask this Nix for its settings: `nix config show` from 2.20 on (where `show-config` became a
/// deprecated alias that will go), `nix show-config` before (2.8 has no `config`). Unknown versions get
/// the new spelling first; `facts` falls back to the other one.
pub fn config_command(version: Option<(u32, u32)>) -> [&'static [&'static str]; 2] {
    const NEW: &[&str] = &["config", "show", "--json"];
    const OLD: &[&str] = &["show-config", "--json"];
    match version {
        Some(v) if v < (2, 20) => [OLD, NEW],
        _ => [NEW, OLD],
    }
}

/// Runs `nix --version` and `nix config show` (or `show-config`). `None` when there is no usable nix.
pub fn facts() -> Option<NixFacts> {
    let quiet = |args: &[&str]| Command::new("nix").args(args).stdin(Stdio::null()).stderr(Stdio::null()).output().ok();
    let version_text = quiet(&["--version"]).map(|v| String::from_utf8_lossy(&v.stdout).trim().to_string());
    let version = version_text.as_deref().and_then(parse_version);
    let out = config_command(version).into_iter().find_map(|cmd| {
        let mut args = vec!["--extra-experimental-features", "nix-command"];
        args.extend_from_slice(cmd);
        quiet(&args).filter(|o| o.status.success())
    })?;
    let state = std::env::var_os("NIX_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| "/nix/var/nix".into());
    let socket = std::env::var_os("NIX_DAEMON_SOCKET_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("daemon-socket/socket"));
    let writable = ::nix::unistd::access(&state, ::nix::unistd::AccessFlags::W_OK).is_ok()
        || (!state.exists() && ::nix::unistd::geteuid().is_root());
    let remote = std::env::var("NIX_REMOTE").ok();
    let mut f = parse_show_config(&String::from_utf8_lossy(&out.stdout), remote.as_deref(), socket.exists(), writable)?;
    f.version = version_text.as_deref().and_then(|t| t.rsplit(' ').next()).unwrap_or("").to_string();
    Some(f)
}

/// What stops `needs` from reaching a build, given Nix's settings. Empty means nothing does.
pub fn problems(f: &NixFacts, needs: &Needs) -> Vec<Problem> {
    let mut out = Vec::new();
    let missing: Vec<&str> = needs
        .platforms
        .iter()
        .filter(|p| **p != f.system && !f.extra_platforms.contains(p))
        .map(|s| s.as_str())
        .collect();
    if !missing.is_empty() {
        out.push(Problem {
            what: format!("Nix will refuse {} builds: not in extra-platforms", missing.join(", ")),
            fix: format!(
                "append `{ADD_PLATFORMS} = {}` to nix.conf (NixOS: nixqimg.binfmt.emulatedSystems)",
                missing.join(" ")
            ),
        });
    }
    if f.sandbox == "true" || f.sandbox == "relaxed" {
        let visible = |p: &Path| {
            f.sandbox_paths.iter().any(|s| {
                let host = s.split_once('=').map_or(s.as_str(), |(_, h)| h).trim_end_matches('?');
                p.starts_with(host)
            })
        };
        let hidden: Vec<String> =
            needs.sandbox_paths.iter().filter(|p| !visible(p)).map(|p| p.display().to_string()).collect();
        if !hidden.is_empty() {
            out.push(Problem {
                what: format!("the Nix sandbox will not see {}", hidden.join(", ")),
                fix: format!(
                    "add `extra-sandbox-paths = {}` to nix.conf (see `nixqimg nix-config`; NixOS: nixqimg.binfmt.enable)",
                    hidden.join(" ")
                ),
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// `build`

/// `packages.<build>.qcow-<system>` when the flake has it, else `nixosConfigurations.<system>.qcow`.
pub fn default_attr(build_system: &str, system: &str, has_packages_attr: bool) -> String {
    if has_packages_attr {
        format!("packages.{build_system}.qcow-{system}")
    } else {
        format!("nixosConfigurations.{system}.qcow")
    }
}

/// Turns what `nix build` printed into one line with its fix, for the failures we know.
pub fn classify(stderr: &str, system: &str, attr: &str, ns: bool) -> Option<Error> {
    let e = |what: String, hint: &str| Some(Error::new(what).hint(hint.to_string()));
    if stderr.contains("does not provide attribute") {
        return e(
            format!("the flake has no attribute {attr}"),
            "pass --attr ATTR (see `nix flake show`), or give the flake packages.<build>.qcow-<system>",
        );
    }
    if stderr.contains("with features {") && stderr.contains("is required") {
        return e(
            format!("Nix refuses to build for {system} here: it is not in extra-platforms"),
            &format!(
                "append `{ADD_PLATFORMS} = {system}` to nix.conf (NixOS: nixqimg.binfmt.emulatedSystems), or use --ns"
            ),
        );
    }
    if stderr.contains("Exec format error") {
        return e(
            format!("no binfmt_misc entry runs {system} programs"),
            if ns {
                "the namespace registered none for this system: pass it with --system"
            } else {
                "run `nixqimg register` as root (NixOS: nixqimg.binfmt.enable), or use --ns"
            },
        );
    }
    if stderr.contains("no qemu-") || (stderr.contains("cannot exec") && stderr.contains("qemu")) {
        return e(
            format!("qemu for {system} is not visible inside the Nix sandbox"),
            "add the paths `nixqimg nix-config` prints to extra-sandbox-paths",
        );
    }
    // Nix 2.8 frames this one oddly ("Error ... executing '...': No such file or directory").
    if stderr.lines().any(|l| l.contains("executing '") && l.contains("': No such file or directory")) {
        return e(
            format!("the binfmt interpreter for {system} is missing inside the Nix sandbox"),
            "register nixqimg with F (`nixqimg register --flags PF`) and add `nixqimg nix-config`'s extra-sandbox-paths",
        );
    }
    None
}

/// The image file in a build result: the file itself, or `nixos.qcow2`, else the first `*.qcow2`,
/// `*.raw` or `*.img` in it (sorted, so the choice is stable).
pub fn image_in(out: &Path) -> Option<PathBuf> {
    if out.is_file() {
        return Some(out.to_path_buf());
    }
    let named = out.join("nixos.qcow2");
    if named.is_file() {
        return Some(named);
    }
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(out).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files.into_iter().find(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw" || x == "img"))
}

/// `nixos.qcow2` from an aarch64-linux build becomes `nixos-aarch64-linux.qcow2`.
pub fn per_system_name(image: &Path, system: &str) -> PathBuf {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "nixos".into());
    match image.extension() {
        Some(x) => PathBuf::from(format!("{stem}-{system}.{}", x.to_string_lossy())),
        None => PathBuf::from(format!("{stem}-{system}")),
    }
}

fn nix_cmd() -> Vec<OsString> {
    ["nix", "--extra-experimental-features", "nix-command flakes"].into_iter().map(OsString::from).collect()
}

/// Output of one command with stderr shown live (Nix's progress) and kept for [`classify`].
struct Ran {
    status: i32,
    stdout: String,
    stderr: String,
}

/// Runs `argv` (in a private namespace when `ns` is given), passing its stderr through.
fn run_teed(argv: &[OsString], ns: Option<&crate::ns::Spec>) -> Result<Ran> {
    let pipe = || ::nix::unistd::pipe2(::nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::new(format!("pipe: {e}")));
    let ((out_r, out_w), (err_r, err_w)) = (pipe()?, pipe()?);
    let (out_r, err_r) = (std::fs::File::from(out_r), std::fs::File::from(err_r));
    let waiter: Box<dyn FnOnce() -> Result<i32>> = match ns {
        Some(spec) => {
            let child = crate::ns::spawn(spec, argv, Some(out_w), Some(err_w))?;
            Box::new(move || child.wait())
        }
        None => {
            let mut child = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(out_w)
                .stderr(err_w)
                .spawn()
                .map_err(|e| {
                    Error::new(format!("cannot run {}: {e}", argv[0].to_string_lossy()))
                        .hint("install Nix (Debian: apt install nix-bin)")
                        .code(code::NOT_FOUND)
                })?;
            Box::new(move || {
                let st = child.wait().map_err(|e| Error::new(format!("wait: {e}")))?;
                Ok(crate::ns::status_code(st))
            })
        }
    };
    let tee = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut r = err_r;
        let mut buf = [0u8; 8192];
        let mut err = std::io::stderr();
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = err.write_all(&buf[..n]);
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 1 << 20 {
                kept.drain(..kept.len() - (1 << 19));
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let mut stdout = String::new();
    let mut r = out_r;
    let _ = r.read_to_string(&mut stdout);
    let status = waiter()?;
    let stderr = tee.join().unwrap_or_default();
    Ok(Ran { status, stdout, stderr })
}

/// The first output path of `nix build --json`.
pub fn out_path(json: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let outs = v.as_array()?.first()?.get("outputs")?.as_object()?;
    let p = outs.get("out").or_else(|| outs.values().next())?.as_str()?;
    Some(PathBuf::from(p))
}

pub fn run_build(a: BuildArgs) -> Result<()> {
    let host = arch::host();
    let nix_found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nix").is_file()));
    if !nix_found {
        return Err(Error::new("nix not found in PATH")
            .hint("install Nix (Debian: apt install nix-bin; elsewhere https://nixos.org/download)")
            .code(code::NOT_FOUND));
    }
    let (interp, warning) = interpreter(a.interpreter.as_deref())?;
    let systems = a
        .system
        .iter()
        .map(|s| {
            arch::by_name(s).ok_or_else(|| Error::new(format!("'{s}' is not a system nixqimg knows")).code(code::USAGE))
        })
        .collect::<Result<Vec<_>>>()?;
    let natives = crate::binfmt::native::detect();
    let foreign: Vec<&'static Arch> =
        systems.iter().copied().filter(|s| !crate::binfmt::native::is_native(&natives, s)).collect();

    // Checks first: each problem that would make the build fail, with its fix.
    let facts = facts().ok_or_else(|| {
        Error::new("nix does not run (`nix config show` and `nix show-config` failed)")
            .hint("check your Nix installation")
            .code(code::NOT_FOUND)
    })?;
    let spec = if a.ns {
        if facts.daemon {
            return Err(Error::new("this Nix builds through nix-daemon, which does not see a private namespace")
                .hint("use the NixOS module (nixqimg.binfmt.enable) or `nixqimg register` instead of --ns")
                .code(code::USAGE));
        }
        if let Some(w) = &warning {
            eprintln!("nixqimg: warning: {w}");
        }
        Some(crate::ns::Spec { arches: foreign.clone(), interpreter: interp.clone(), flags: "F".into() })
    } else {
        None
    };
    let needs = if foreign.is_empty() { needs(&[], &[]) } else { compute(&foreign, &interp)? };
    if !a.ns {
        if let Some(p) = problems(&facts, &needs).into_iter().next() {
            return Err(Error::new(p.what).hint(p.fix));
        }
        for s in &foreign {
            let inst = crate::binfmt::entries::read(Path::new(crate::binfmt::entries::DIR));
            if !inst.entries.iter().any(|e| e.enabled && e.serves(s)) {
                return Err(Error::new(format!("no binfmt_misc entry runs {} programs", s.nix_system))
                    .hint("run `nixqimg register` as root (NixOS: nixqimg.binfmt.enable), or use --ns"));
            }
        }
    }

    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    for s in &systems {
        let attr = match &a.attr {
            Some(t) => t.replace("{system}", s.nix_system),
            None => {
                let probe = format!("{}#packages.{}", a.flake, host.nix_system);
                let mut argv = nix_cmd();
                argv.extend(["eval".into(), "--json".into(), probe.into(), "--apply".into()]);
                argv.push(format!("p: p ? \"qcow-{}\"", s.nix_system).into());
                let out = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).output();
                let has = out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true");
                default_attr(host.nix_system, s.nix_system, has)
            }
        };
        eprintln!("nixqimg: building {}#{attr}", a.flake);
        let mut argv = nix_cmd();
        argv.extend(["build".into(), "--json".into(), "--no-link".into(), "-L".into()]);
        if a.ns {
            argv.extend(needs.options());
        }
        argv.push(format!("{}#{attr}", a.flake).into());
        let ran = run_teed(&argv, spec.as_ref())?;
        if ran.status != 0 {
            return Err(classify(&ran.stderr, s.nix_system, &attr, a.ns)
                .unwrap_or_else(|| {
                    Error::new(format!("nix build of {attr} failed (exit {})", ran.status))
                        .hint("see Nix's messages above")
                })
                .code(code::FAILURE));
        }
        let out = out_path(&ran.stdout)
            .ok_or_else(|| Error::new(format!("nix build printed no output path: {}", ran.stdout.trim())))?;
        let image = image_in(&out).ok_or_else(|| {
            Error::new(format!("{}: no image in the build result", out.display()))
                .hint("the attribute must build a *.qcow2, *.raw or *.img file or a directory holding one")
        })?;
        let dest = a.out.join(per_system_name(&image, s.nix_system));
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(&image, &dest).map_err(|e| Error::io(&dest, e))?;
        // Store files are read-only; the copy is the user's to change.
        let _ = std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let (size, sum) = sha256_file(&dest)?;
        let shown = dest.display();
        let line =
            format!("{shown}\n  size   {size} bytes\n  sha256 {sum}\n  run    nixqimg run {shown} --arch {}\n", s.name);
        write_stdout(line.as_bytes())?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<(u64, String)> {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let sum = h.finalize().iter().fold(String::new(), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    });
    Ok((size, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: &str) -> &'static Arch {
        arch::by_name(n).unwrap()
    }

    #[test]
    fn module_table_on_disk_is_current() {
        let on_disk = include_str!("../nixos-module/binfmt-table.json");
        assert!(
            on_disk == module_table(),
            "nixos-module/binfmt-table.json is stale: run `nixqimg nix-config --module-table > nixos-module/binfmt-table.json`"
        );
    }

    #[test]
    fn never_a_directory_and_a_path_inside_it() {
        let p = |s: &str| PathBuf::from(s);
        let got = minimal_paths(&[
            p("/usr/bin/qemu-aarch64-static"),
            p("/opt/n/nixqimg"),
            p("/usr/bin"),
            p("/opt/n/nixqimg"),
        ]);
        assert_eq!(got, vec![p("/opt/n/nixqimg"), p("/usr/bin")]);
        // A shared prefix is not containment.
        assert_eq!(minimal_paths(&[p("/usr/bin2/x"), p("/usr/bin")]), vec![p("/usr/bin2/x"), p("/usr/bin")]);
    }

    #[test]
    fn conf_lines_and_options_say_the_same() {
        let n = needs(
            &[a("aarch64"), a("riscv64"), a("aarch64-linux")],
            &[PathBuf::from("/n/nixqimg"), PathBuf::from("/q/qemu-aarch64-static")],
        );
        assert_eq!(
            n.conf_lines(),
            "extra-extra-platforms = aarch64-linux riscv64-linux\nextra-sandbox-paths = /n/nixqimg /q/qemu-aarch64-static\n"
        );
        let o: Vec<String> = n.options().iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            o,
            [
                "--option",
                "extra-extra-platforms",
                "aarch64-linux riscv64-linux",
                "--option",
                "extra-sandbox-paths",
                "/n/nixqimg /q/qemu-aarch64-static"
            ]
        );
    }

    #[test]
    fn nothing_to_add_sets_nothing() {
        // `--option extra-platforms ""` used to wipe the user's own list when no foreign system was asked.
        let n = needs(&[], &[]);
        assert_eq!((n.conf_lines().as_str(), n.options().len()), ("", 0));
        let only_paths = needs(&[], &[PathBuf::from("/q")]);
        assert_eq!(only_paths.conf_lines(), "extra-sandbox-paths = /q\n");
    }

    #[test]
    fn the_settings_command_follows_the_nix_version() {
        assert_eq!(parse_version("nix (Nix) 2.8.0"), Some((2, 8)));
        assert_eq!(parse_version("nix (Nix) 2.26.3\n"), Some((2, 26)));
        assert_eq!(parse_version("nix (Nix) 2.31pre20250712_abcdef"), Some((2, 31)));
        assert_eq!(parse_version("nix (Lix, like Nix) 2.91.1"), Some((2, 91)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(config_command(Some((2, 8)))[0], ["show-config", "--json"]);
        assert_eq!(config_command(Some((2, 19)))[0], ["show-config", "--json"]);
        assert_eq!(config_command(Some((2, 20)))[0], ["config", "show", "--json"]);
        assert_eq!(config_command(Some((2, 26)))[0], ["config", "show", "--json"]);
        assert_eq!(config_command(None), [&["config", "show", "--json"][..], &["show-config", "--json"][..]]);
    }

    #[test]
    fn show_config_of_nix_2_8_parses() {
        let j = r#"{"sandbox":{"value":true},"sandbox-paths":{"value":["/bin/sh=/nix/store/x-busybox/bin/busybox","/q"]},
            "extra-platforms":{"value":["i686-linux"]},"system":{"value":"x86_64-linux"},"store":{"value":"auto"}}"#;
        let f = parse_show_config(j, None, true, true).unwrap();
        assert_eq!((f.sandbox.as_str(), f.system.as_str(), f.daemon), ("true", "x86_64-linux", false));
        assert_eq!(f.sandbox_paths, ["/bin/sh=/nix/store/x-busybox/bin/busybox", "/q"]);
        let n = needs(&[a("aarch64")], &[PathBuf::from("/q/qemu-aarch64-static"), PathBuf::from("/n/nixqimg")]);
        let p = problems(&f, &n);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].fix.contains("`extra-extra-platforms = aarch64-linux`"), "{}", p[0].fix);
        assert!(p[1].what.ends_with("/n/nixqimg") && p[1].fix.contains("extra-sandbox-paths = /n/nixqimg"));
        let ok = NixFacts {
            extra_platforms: vec!["aarch64-linux".into()],
            sandbox_paths: vec!["/q".into(), "/n/nixqimg".into()],
            ..f.clone()
        };
        assert!(problems(&ok, &n).is_empty());
        let off = NixFacts { sandbox: "false".into(), ..ok };
        assert!(problems(&off, &needs(&[a("aarch64")], &[PathBuf::from("/elsewhere")])).is_empty());
    }

    #[test]
    fn daemon_is_what_nix_would_pick() {
        assert!(uses_daemon("auto", Some("daemon"), false, true));
        assert!(uses_daemon("unix:///run/x", None, false, true));
        assert!(!uses_daemon("auto", None, true, true), "a writable local store wins");
        assert!(uses_daemon("auto", None, true, false));
        assert!(!uses_daemon("auto", None, false, false));
        assert!(!uses_daemon("local?root=/tmp/s", None, true, false));
    }

    #[test]
    fn default_attribute_prefers_the_natively_assembled_image() {
        assert_eq!(default_attr("x86_64-linux", "aarch64-linux", true), "packages.x86_64-linux.qcow-aarch64-linux");
        assert_eq!(default_attr("x86_64-linux", "aarch64-linux", false), "nixosConfigurations.aarch64-linux.qcow");
    }

    #[test]
    fn known_nix_failures_become_one_line_with_a_fix() {
        let c = |s: &str, ns| classify(s, "aarch64-linux", "packages.x.qcow", ns).map(|e| e.to_string());
        let platforms = "error: a 'aarch64-linux' with features {} is required to build '/nix/store/x.drv', but I am a 'x86_64-linux' with features {benchmark}";
        assert!(c(platforms, false).unwrap().contains("extra-platforms = aarch64-linux"));
        let enoexec = "error: executing '/nix/store/x-busybox/bin/busybox': Exec format error";
        assert!(c(enoexec, false).unwrap().contains("nixqimg register"));
        assert!(c(enoexec, true).unwrap().contains("--system"));
        let enoent = "x>        Error      Error   \u{fffd}   executing '/s/x-busybox/bin/busybox': No such file or directory   ";
        assert!(c(enoent, false).unwrap().contains("missing inside the Nix sandbox"));
        let noqemu = "nixqimg: /nix/store/x/bin/sh: no qemu-aarch64 or qemu-aarch64-static in /usr/bin";
        assert!(c(noqemu, false).unwrap().contains("extra-sandbox-paths"));
        let attr = "error: flake 'path:/x' does not provide attribute 'packages.x86_64-linux.packages.x.qcow'";
        assert!(c(attr, false).unwrap().starts_with("the flake has no attribute packages.x.qcow"));
        assert!(c("error: builder for '/nix/store/x.drv' failed with exit code 1", false).is_none());
    }

    #[test]
    fn images_are_named_per_system() {
        assert_eq!(
            per_system_name(Path::new("/s/nixos.qcow2"), "aarch64-linux"),
            PathBuf::from("nixos-aarch64-linux.qcow2")
        );
        assert_eq!(per_system_name(Path::new("/s/disk"), "x86_64-linux"), PathBuf::from("disk-x86_64-linux"));
    }

    #[test]
    fn out_path_reads_nix_build_json() {
        let j = r#"[{"drvPath":"/s/x.drv","outputs":{"out":"/s/x-img"}}]"#;
        assert_eq!(out_path(j), Some(PathBuf::from("/s/x-img")));
        assert_eq!(out_path("[]"), None);
    }
}
