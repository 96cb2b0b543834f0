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
        Some(crate::binfmt::ns::Spec { arches: foreign.clone(), interpreter: interp.clone(), flags: "F".into() })
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
