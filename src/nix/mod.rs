//! Nix and nixqimg: the nix.conf settings nixqimg needs (`nix-config`), the Nix facts `doctor` and
//! `build` check against them, the table the NixOS module reads, and `build` itself.
//!
//! The decisions (which settings, which problems, which attribute, which error) are pure functions
//! with unit tests; running `nix` and copying files happen only in the `run_*` edges.

use crate::arch::{Arch, ARCHES};
use crate::binfmt::choose::{interpreter, systems};
use crate::error::{code, Error, Result};
use crate::interp::config::{self, NoEnv};
use crate::interp::exec::RealProbe;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

mod build;
pub mod builders;
mod settings;
pub use build::*;
pub use settings::*;

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
    /// The builders to use instead of Nix's own `builders` setting (machines lines separated by
    /// `;` or newlines, or `@FILE`). A foreign system goes to a builder of it that answers.
    #[arg(long)]
    pub builders: Option<String>,
    /// Emulate every foreign system here, asking no builder.
    #[arg(long, conflicts_with = "no_emulate")]
    pub emulate: bool,
    /// Never emulate: each foreign system needs a builder that answers, else build fails.
    #[arg(long)]
    pub no_emulate: bool,
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

/// The qemu-user the interpreter at `interpreter` will exec for `a` inside a sandbox (whose
/// environment is empty), and whether it is static.
pub fn sandbox_qemu(interpreter: &Path, a: &Arch) -> Option<(PathBuf, bool)> {
    let cfg = config::load(Some(interpreter), &NoEnv, false);
    let q = crate::interp::find_qemu(&cfg, a, &RealProbe)?;
    let is_static =
        std::fs::File::open(&q).ok().and_then(|f| crate::interp::elf::read(&f).ok()).is_some_and(|f| f.is_static());
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
            let (marker_magic, marker_mask) = crate::interp::route::magic_mask(a);
            serde_json::json!({
                "system": a.nix_system,
                "name": a.name,
                "entryName": crate::binfmt::entry_name(a),
                "qemu": format!("qemu-{}", a.qemu),
                "family": format!("{:?}", a.family),
                "magic": Arch::escaped(a.magic),
                "mask": Arch::escaped(a.mask),
                "markerEntryName": crate::interp::route::entry_name(a),
                "markerMagic": Arch::escaped(&marker_magic),
                "markerMask": Arch::escaped(&marker_mask),
                "markerFlags": crate::interp::route::FLAGS,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({
        "comment": "generated by `nixqimg nix-config --module-table`; a unit test in src/nix/mod.rs keeps it current",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch;

    fn a(n: &str) -> &'static Arch {
        arch::by_name(n).unwrap()
    }

    #[test]
    fn module_table_on_disk_is_current() {
        let on_disk = include_str!("../../nixos-module/binfmt-table.json");
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
    fn a_path_inside_another_listed_one_is_the_data_loss_problem() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            nested_sandbox_paths(&l(&["/usr/local/bin", "/usr/local/bin/qemu-aarch64-static"])),
            [("/usr/local/bin/qemu-aarch64-static".to_string(), "/usr/local/bin".to_string())]
        );
        // The place inside the sandbox counts (left of '='), '?' marks an optional path.
        assert_eq!(nested_sandbox_paths(&l(&["/bin/sh=/usr/bin/bash-static", "/bin?"])).len(), 1);
        assert!(nested_sandbox_paths(&l(&["/usr/bin2/x", "/usr/bin", "/usr/bin"])).is_empty());
        let f = NixFacts { sandbox_paths: l(&["/q", "/q/qemu"]), ..NixFacts::default() };
        let p = &problems(&f, &needs(&[], &[]))[0];
        assert!(p.what.contains("Nix then empties the real /q/qemu (data loss"), "{}", p.what);
        assert!(p.fix.starts_with("list only /q (or only /q/qemu) in extra-sandbox-paths"), "{}", p.fix);
        // The classifier names it before it blames binfmt_misc, and only then.
        let enoexec = "error: executing '/nix/store/x-busybox/bin/busybox': Exec format error";
        let e = classify_with(enoexec, "aarch64-linux", "a", false, &f.sandbox_paths).unwrap().to_string();
        assert!(e.contains("empties the real /q/qemu"), "{e}");
        let e = classify_with(enoexec, "aarch64-linux", "a", false, &[]).unwrap().to_string();
        assert!(e.contains("no binfmt_misc entry"), "{e}");
        let attr = "error: flake 'path:/x' does not provide attribute 'a'";
        assert!(classify_with(attr, "aarch64-linux", "a", false, &f.sandbox_paths)
            .unwrap()
            .to_string()
            .contains("no attribute"));
    }

    #[test]
    fn nix_versions_compare_by_number() {
        assert!(version_at_least("2.26.3", 2, 19));
        assert!(!version_at_least("2.8.0", 2, 19));
        assert!(version_at_least("3.0", 2, 19));
        assert!(!version_at_least("", 2, 19));
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
