//! Which nixqimg and which systems to register: shared by `register`, `ns`, `nix-config` and `build`.

use crate::arch::{self, Arch, ARCHES};
use crate::error::{code, Error, Result};
use crate::interp::config::{self, NoEnv};
use crate::interp::exec::RealProbe;
use std::path::{Path, PathBuf};

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
    let facts = crate::interp::elf::read(&file).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
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
