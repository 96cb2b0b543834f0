//! `build`: checks first (each problem with its fix), then `nix build` per system with Nix's own
//! progress, then the image copied out with its size and sha256.

use super::*;
use crate::arch::{self, Arch};
use crate::binfmt::choose::interpreter;
use crate::error::{code, Error, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `packages.<build>.qcow-<system>` when the flake has it, else `nixosConfigurations.<system>.qcow`.
pub fn default_attr(build_system: &str, system: &str, has_packages_attr: bool) -> String {
    if has_packages_attr {
        format!("packages.{build_system}.qcow-{system}")
    } else {
        format!("nixosConfigurations.{system}.qcow")
    }
}

/// [`classify`], but a nested sandbox path (Nix emptied the inner file: the interpreter or qemu may
/// now be an empty file) is named before binfmt_misc is blamed.
pub fn classify_with(stderr: &str, system: &str, attr: &str, ns: bool, sandbox_paths: &[String]) -> Option<Error> {
    let known = classify(stderr, system, attr, ns)?;
    let blames_binfmt =
        ["Exec format error", "executing '", "no qemu-", "cannot exec"].iter().any(|s| stderr.contains(s));
    let nested = nested_problems(&NixFacts { sandbox_paths: sandbox_paths.to_vec(), ..NixFacts::default() });
    match nested.into_iter().next() {
        Some(p) if blames_binfmt => Some(Error::new(p.what).hint(p.fix)),
        _ => Some(known),
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
fn run_teed(argv: &[OsString], ns: Option<&crate::binfmt::ns::Spec>) -> Result<Ran> {
    let pipe = || ::nix::unistd::pipe2(::nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::new(format!("pipe: {e}")));
    let ((out_r, out_w), (err_r, err_w)) = (pipe()?, pipe()?);
    let (out_r, err_r) = (std::fs::File::from(out_r), std::fs::File::from(err_r));
    let waiter: Box<dyn FnOnce() -> Result<i32>> = match ns {
        Some(spec) => {
            let child = crate::binfmt::ns::spawn(spec, argv, Some(out_w), Some(err_w))?;
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
                Ok(crate::binfmt::ns::status_code(st))
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

/// How one system was built, for the message and the `built` line.
fn shown_route(r: &crate::nix::builders::Route) -> String {
    use crate::nix::builders::Route;
    match r {
        Route::Native => "here (native)".into(),
        Route::Builders(ms) => format!("on {}", ms.iter().map(|m| m.shown()).collect::<Vec<_>>().join(", ")),
        Route::Emulate { .. } => "here (emulated through nixqimg)".into(),
    }
}

/// The machines Nix will use: `--builders` if given, else nix.conf's `builders` (machines files
/// read as Nix reads them), each probed once.
fn builders_with_answers(
    explicit: Option<&str>,
    facts: &NixFacts,
) -> Vec<(crate::nix::builders::Machine, crate::nix::builders::Answer)> {
    let spec = explicit.unwrap_or(&facts.builders);
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    crate::nix::builders::parse(spec, &facts.system, &read)
        .into_iter()
        .map(|m| {
            let a = crate::nix::builders::probe(&m, &facts.version, crate::nix::builders::PROBE_TIMEOUT);
            (m, a)
        })
        .collect()
}

/// Everything `build` decided before running Nix for one system.
struct Job<'a> {
    a: &'a BuildArgs,
    system: &'static Arch,
    attr: String,
    facts: &'a NixFacts,
    interp: &'a Path,
}

impl Job<'_> {
    /// Emulation here is possible: with --ns always (a private registration), else when the host's
    /// binfmt_misc serves the system and Nix's settings let the build reach it.
    fn emulation_check(&self) -> Result<Needs> {
        let needs = compute(&[self.system], self.interp)?;
        // Before anything else: a nested sandbox path would empty a real file (with --ns, ours are
        // added to the user's list).
        let mut listed = self.facts.sandbox_paths.clone();
        if self.a.ns {
            listed.extend(needs.sandbox_paths.iter().map(|p| p.display().to_string()));
        }
        let nested = NixFacts { sandbox_paths: listed, ..NixFacts::default() };
        if let Some(p) = nested_problems(&nested).into_iter().next() {
            return Err(Error::new(p.what).hint(p.fix).code(code::FAILURE));
        }
        if !self.a.ns {
            if let Some(p) = problems(self.facts, &needs).into_iter().next() {
                return Err(Error::new(p.what).hint(p.fix));
            }
            let inst = crate::binfmt::entries::read(Path::new(crate::binfmt::entries::DIR));
            if !inst.entries.iter().any(|e| e.enabled && e.serves(self.system)) {
                return Err(Error::new(format!("no binfmt_misc entry runs {} programs", self.system.nix_system))
                    .hint("run `nixqimg register` as root (NixOS: nixqimg.binfmt.enable), or use --ns"));
            }
        }
        Ok(needs)
    }

    /// One `nix build` of the attribute the way `route` says; the output path.
    fn nix_build(
        &self,
        route: &crate::nix::builders::Route,
        needs: Option<&Needs>,
    ) -> Result<std::result::Result<PathBuf, Ran>> {
        use crate::nix::builders::Route;
        let mut argv = nix_cmd();
        argv.extend(["build".into(), "--json".into(), "--no-link".into(), "-L".into()]);
        match route {
            Route::Builders(ms) => {
                let lines: Vec<&str> = ms.iter().map(|m| m.line.as_str()).collect();
                argv.extend(["--builders".into(), lines.join(" ; ").into()]);
            }
            // Emulated: no builder is asked (none answered, or --emulate said not to).
            Route::Emulate { .. } => argv.extend(["--builders".into(), "".into()]),
            Route::Native => {}
        }
        let spec = match (route, needs) {
            (Route::Emulate { .. }, Some(n)) if self.a.ns => {
                argv.extend(n.options());
                Some(crate::binfmt::ns::Spec {
                    arches: vec![self.system],
                    interpreter: self.interp.to_path_buf(),
                    flags: "F".into(),
                })
            }
            _ => None,
        };
        argv.push(format!("{}#{}", self.a.flake, self.attr).into());
        let ran = run_teed(&argv, spec.as_ref())?;
        if ran.status != 0 {
            return Ok(Err(ran));
        }
        out_path(&ran.stdout)
            .map(Ok)
            .ok_or_else(|| Error::new(format!("nix build printed no output path: {}", ran.stdout.trim())))
    }

    fn failed(&self, ran: &Ran) -> Error {
        let s = self.system.nix_system;
        classify_with(&ran.stderr, s, &self.attr, self.a.ns, &self.facts.sandbox_paths)
            .unwrap_or_else(|| {
                Error::new(format!("nix build of {} failed (exit {})", self.attr, ran.status))
                    .hint("see Nix's messages above")
            })
            .code(code::FAILURE)
    }

    /// Builds the system's attribute along `route`; a builder lost mid-build hands the build to
    /// emulation here when that is allowed and possible, else fails in one line.
    fn build(
        &self,
        route: crate::nix::builders::Route,
        needs: Option<Needs>,
    ) -> Result<(PathBuf, crate::nix::builders::Route)> {
        use crate::nix::builders::{Mode, Route};
        let s = self.system.nix_system;
        let ran = match self.nix_build(&route, needs.as_ref())? {
            Ok(out) => return Ok((out, route)),
            Err(ran) => ran,
        };
        let (Route::Builders(ms), Some(line)) = (&route, crate::nix::builders::lost_builder(&ran.stderr)) else {
            return Err(self.failed(&ran));
        };
        let who = ms.iter().map(|m| m.shown()).collect::<Vec<_>>().join(", ");
        let lost = format!("{s}: lost builder {who} during the build ({line})");
        if self.mode() == Mode::NoEmulate {
            return Err(Error::new(lost)
                .hint("build again once it answers, or let nixqimg emulate it here (drop --no-emulate)")
                .code(code::FAILURE));
        }
        let needs = self
            .emulation_check()
            .map_err(|e| Error::new(format!("{lost}, and it cannot be emulated here: {e}")).code(code::FAILURE))?;
        eprintln!("nixqimg: {lost}; emulating it here through nixqimg instead");
        let route = Route::Emulate { why: lost };
        match self.nix_build(&route, Some(&needs))? {
            Ok(out) => Ok((out, route)),
            Err(ran) => Err(self.failed(&ran)),
        }
    }

    fn mode(&self) -> crate::nix::builders::Mode {
        use crate::nix::builders::Mode;
        match (self.a.emulate, self.a.no_emulate) {
            (true, _) => Mode::Emulate,
            (_, true) => Mode::NoEmulate,
            _ => Mode::Auto,
        }
    }
}

/// The attribute to build for `s`: --attr with `{system}` replaced, else the flake's default.
fn attr_for(a: &BuildArgs, s: &Arch) -> String {
    if let Some(t) = &a.attr {
        return t.replace("{system}", s.nix_system);
    }
    let host = arch::host();
    let probe = format!("{}#packages.{}", a.flake, host.nix_system);
    let mut argv = nix_cmd();
    argv.extend(["eval".into(), "--json".into(), probe.into(), "--apply".into()]);
    argv.push(format!("p: p ? \"qcow-{}\"", s.nix_system).into());
    let out = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).output();
    let has = out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true");
    default_attr(host.nix_system, s.nix_system, has)
}

/// Copies `image` to `dest` through a temporary file beside it, renamed into place once whole:
/// a failed or interrupted copy never leaves a half-written image under --out.
fn copy_whole(image: &Path, dest: &Path) -> Result<()> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let res = std::fs::copy(image, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644)))
        .and_then(|()| std::fs::rename(&tmp, dest));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(dest, e));
    }
    Ok(())
}

pub fn run_build(a: BuildArgs) -> Result<()> {
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
    let facts = facts().ok_or_else(|| {
        Error::new("nix does not run (`nix config show` and `nix show-config` failed)")
            .hint("check your Nix installation")
            .code(code::NOT_FOUND)
    })?;
    if a.ns {
        if facts.daemon {
            return Err(Error::new("this Nix builds through nix-daemon, which does not see a private namespace")
                .hint("use the NixOS module (nixqimg.binfmt.enable) or `nixqimg register` instead of --ns")
                .code(code::USAGE));
        }
        if let Some(w) = &warning {
            eprintln!("nixqimg: warning: {w}");
        }
    }
    let foreign = systems.iter().any(|s| !crate::binfmt::native::is_native(&natives, s));
    let machines =
        if foreign && !a.emulate { builders_with_answers(a.builders.as_deref(), &facts) } else { Vec::new() };
    // Every route first: a system that cannot be built fails before anything is.
    let mut plan = Vec::new();
    for s in &systems {
        let job = Job { a: &a, system: s, attr: String::new(), facts: &facts, interp: &interp };
        let route = if crate::binfmt::native::is_native(&natives, s) {
            crate::nix::builders::Route::Native
        } else {
            crate::nix::builders::route(s.nix_system, &machines, job.mode()).map_err(|e| e.code(code::FAILURE))?
        };
        let needs = match route {
            crate::nix::builders::Route::Emulate { .. } => Some(job.emulation_check()?),
            _ => None,
        };
        plan.push((*s, route, needs));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    for (s, route, needs) in plan {
        match &route {
            crate::nix::builders::Route::Emulate { why } => {
                eprintln!("nixqimg: {}: emulated here through nixqimg ({why})", s.nix_system)
            }
            crate::nix::builders::Route::Builders(_) => {
                eprintln!(
                    "nixqimg: {}: {} (it answers)",
                    s.nix_system,
                    shown_route(&route).replacen("on ", "on builder ", 1)
                )
            }
            crate::nix::builders::Route::Native => eprintln!("nixqimg: {}: native here", s.nix_system),
        }
        let job = Job { a: &a, system: s, attr: attr_for(&a, s), facts: &facts, interp: &interp };
        eprintln!("nixqimg: building {}#{}", a.flake, job.attr);
        let (out, route) = job.build(route, needs)?;
        let image = image_in(&out).ok_or_else(|| {
            Error::new(format!("{}: no image in the build result", out.display()))
                .hint("the attribute must build a *.qcow2, *.raw or *.img file or a directory holding one")
        })?;
        let dest = a.out.join(per_system_name(&image, s.nix_system));
        copy_whole(&image, &dest)?;
        let (size, sum) = sha256_file(&dest)?;
        let shown = dest.display();
        let line = format!(
            "{shown}\n  size   {size} bytes\n  sha256 {sum}\n  built  {}\n  run    nixqimg run {shown} --arch {}\n",
            shown_route(&route),
            s.name
        );
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
