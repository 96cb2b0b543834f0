//! binfmt_misc registration: the lines nixqimg writes (from the one arch table), `register`,
//! `unregister` and `status`. Pure decisions live in the submodules and are unit-tested; the writes to
//! `/proc/sys/fs/binfmt_misc` happen only in [`run_register`] and [`run_unregister`].

use crate::arch::Arch;
use crate::error::{code, Error, Result};
use std::path::Path;

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
    Ok(format!(":{name}:M::{}:{}:{interp}:{flags}", Arch::escaped(arch.magic), Arch::escaped(arch.mask)))
}

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    Err(Error::new("binfmt: not implemented yet"))
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

    #[test]
    fn lines_the_kernel_would_misparse_are_refused() {
        let a = by_name("aarch64").unwrap();
        assert!(registration_line(a, "a:b", Path::new("/x"), "").is_err());
        assert!(registration_line(a, "a/b", Path::new("/x"), "").is_err());
        assert!(registration_line(a, "n", Path::new("/x:y"), "").is_err());
        assert!(registration_line(a, "n", Path::new("relative"), "").is_err());
    }
}
