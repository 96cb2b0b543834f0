//! `nixqimg status`: every binfmt_misc entry, which system each serves, and for each system which
//! entry the kernel really uses. Collected once, rendered for people or as JSON (documented in
//! README.md; fields are only ever added).

use super::entries::{self, Entry, Instance, Matcher};
use super::native::{self, Native};
use crate::arch::ARCHES;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub binfmt_misc: Mount,
    pub entries: Vec<EntryStatus>,
    pub systems: Vec<SystemStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mount {
    pub path: String,
    pub mounted: bool,
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryStatus {
    pub name: String,
    /// "nixqimg" for entries nixqimg owns (`nixqimg-*`), else "other".
    pub owner: &'static str,
    pub enabled: bool,
    /// "magic" or "extension".
    pub kind: &'static str,
    pub offset: Option<usize>,
    /// Lower-case hex, as the kernel prints it.
    pub magic: Option<String>,
    pub mask: Option<String>,
    pub extension: Option<String>,
    pub interpreter: String,
    pub interpreter_exists: bool,
    pub flags: String,
    /// Nix systems whose programs this entry matches.
    pub systems: Vec<&'static str>,
    /// For nixqimg's qemu marker entries (`nixqimg-<arch>-qemu`): the systems whose execs from
    /// chroots and containers without qemu this entry carries to its qemu (see README).
    pub carries: Vec<&'static str>,
    /// Registration order (from the directory's listing order): larger is newer, and the kernel tries newer first.
    pub order: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SystemStatus {
    pub system: &'static str,
    pub arch: &'static str,
    pub native: bool,
    /// How nativeness was established (host architecture, or a probe program that ran).
    pub native_how: Option<&'static str>,
    /// The entry the kernel uses for this system's programs: the newest enabled match.
    pub served_by: Option<String>,
    pub served_by_nixqimg: bool,
    pub flags: Option<String>,
    pub interpreter: Option<String>,
    /// Other enabled entries that match too; the kernel never reaches them.
    pub shadowed: Vec<String>,
    /// Disabled entries that match.
    pub disabled: Vec<String>,
    /// More than one enabled entry matches.
    pub conflict: bool,
    /// The enabled marker entry that carries this system's execs from chroots and containers
    /// without qemu to a pinned qemu, if any.
    pub chroot_qemu: Option<String>,
}

/// Systems whose marked copies (crate::route) `e` takes.
fn carries(e: &Entry) -> Vec<&'static str> {
    ARCHES
        .iter()
        .filter(|a| {
            [2u16, 3].iter().any(|&t| {
                let mut h = entries::header(a, t);
                h[crate::interp::route::MARKER_AT] = crate::interp::route::MARKER;
                e.matches(&h)
            })
        })
        .map(|a| a.nix_system)
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Pure: the status of `inst` on a host running `natives` natively.
pub fn build(path: &Path, inst: &Instance, natives: &[Native], exists: &dyn Fn(&str) -> bool) -> Status {
    let entries = inst
        .entries
        .iter()
        .map(|e| {
            let (kind, offset, magic, mask, extension) = match &e.matcher {
                Matcher::Magic { offset, magic, mask } => {
                    ("magic", Some(*offset), Some(hex(magic)), Some(hex(mask)), None)
                }
                Matcher::Extension(x) => ("extension", None, None, None, Some(x.clone())),
            };
            EntryStatus {
                name: e.name.clone(),
                owner: if e.is_ours() { "nixqimg" } else { "other" },
                enabled: e.enabled,
                kind,
                offset,
                magic,
                mask,
                extension,
                interpreter: e.interpreter.clone(),
                interpreter_exists: exists(&e.interpreter),
                flags: e.flags.clone(),
                systems: e.systems().iter().map(|a| a.nix_system).collect(),
                carries: if e.is_ours() { carries(e) } else { Vec::new() },
                order: e.order,
            }
        })
        .collect();
    let systems = ARCHES
        .iter()
        .map(|a| {
            let on = if inst.enabled { entries::candidates(&inst.entries, a) } else { Vec::new() };
            let first: Option<&&Entry> = on.first();
            let nat = natives.iter().find(|n| n.arch.name == a.name);
            SystemStatus {
                system: a.nix_system,
                arch: a.name,
                native: nat.is_some(),
                native_how: nat.map(|n| n.how),
                served_by: first.map(|e| e.name.clone()),
                served_by_nixqimg: first.is_some_and(|e| e.is_ours()),
                flags: first.map(|e| e.flags.clone()),
                interpreter: first.map(|e| e.interpreter.clone()),
                shadowed: on.iter().skip(1).map(|e| e.name.clone()).collect(),
                disabled: inst.entries.iter().filter(|e| !e.enabled && e.serves(a)).map(|e| e.name.clone()).collect(),
                conflict: on.len() > 1,
                chroot_qemu: inst
                    .entries
                    .iter()
                    .find(|e| e.enabled && e.is_ours() && carries(e).contains(&a.nix_system))
                    .map(|e| e.name.clone()),
            }
        })
        .collect();
    Status {
        binfmt_misc: Mount { path: path.display().to_string(), mounted: inst.mounted, enabled: inst.enabled },
        entries,
        systems,
    }
}

pub fn collect(dir: &Path) -> Status {
    let inst = entries::read(dir);
    build(dir, &inst, &native::detect(), &|p| Path::new(p).exists())
}

pub fn to_json(st: &Status) -> String {
    let mut s = serde_json::to_string_pretty(st).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

pub fn render(st: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let m = &st.binfmt_misc;
    let _ = writeln!(
        o,
        "binfmt_misc at {}: {}",
        m.path,
        match (m.mounted, m.enabled) {
            (false, _) => "not mounted ('nixqimg register --mount' mounts it)",
            (true, false) => "mounted, disabled as a whole (echo 1 > .../status)",
            (true, true) => "mounted, enabled",
        }
    );
    if !st.entries.is_empty() {
        let _ = writeln!(o, "\n{:<24} {:<8} {:<5} {:<18} INTERPRETER", "ENTRY", "ENABLED", "FLAGS", "SYSTEMS");
        for e in &st.entries {
            let sys = if e.systems.is_empty() { "-".to_string() } else { e.systems.join(",") };
            let _ = writeln!(
                o,
                "{:<24} {:<8} {:<5} {:<18} {}{}",
                e.name,
                if e.enabled { "yes" } else { "no" },
                if e.flags.is_empty() { "-" } else { &e.flags },
                sys,
                e.interpreter,
                if e.interpreter_exists { "" } else { " (missing)" }
            );
        }
    }
    let _ = writeln!(o);
    for s in &st.systems {
        let mut line = format!("{}: ", s.system);
        match (&s.served_by, s.native) {
            (None, true) => line.push_str(&format!("native ({})", s.native_how.unwrap_or("native"))),
            (None, false) => line.push_str(&format!("not served ('nixqimg register {}')", s.system)),
            (Some(by), _) => {
                line.push_str(&format!("served by {by} ({})", s.flags.as_deref().unwrap_or("")));
                if s.native {
                    line.push_str("; native, yet sent to an emulator");
                }
            }
        }
        if s.conflict {
            line.push_str(&format!(
                "; also matched by {}, which the kernel never reaches (it uses the newest registration)",
                s.shadowed.join(", ")
            ));
        }
        if !s.disabled.is_empty() {
            line.push_str(&format!("; disabled: {}", s.disabled.join(", ")));
        }
        let _ = writeln!(o, "{line}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::by_name;

    const M: &str =
        "offset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    fn entry(name: &str, enabled: bool, order: u64) -> Entry {
        let text = format!("{}\ninterpreter /i/{name}\nflags: PF\n{M}", if enabled { "enabled" } else { "disabled" });
        entries::parse(name, &text, order).unwrap()
    }

    #[test]
    fn newest_enabled_entry_serves_and_the_rest_are_shadowed() {
        let inst = Instance {
            mounted: true,
            enabled: true,
            entries: vec![entry("qemu-aarch64", true, 10), entry("nixqimg-aarch64", true, 11), entry("old", false, 3)],
        };
        let natives = vec![Native { arch: by_name("x86_64").unwrap(), how: "host architecture" }];
        let st = build(Path::new("/b"), &inst, &natives, &|p| p.ends_with("nixqimg-aarch64"));
        let a = st.systems.iter().find(|s| s.arch == "aarch64").unwrap();
        assert_eq!(a.served_by.as_deref(), Some("nixqimg-aarch64"));
        assert!(a.served_by_nixqimg && a.conflict);
        assert_eq!(a.shadowed, ["qemu-aarch64"]);
        assert_eq!(a.disabled, ["old"]);
        let x = st.systems.iter().find(|s| s.arch == "x86_64").unwrap();
        assert!(x.native && x.served_by.is_none());
        let text = render(&st);
        assert!(text.contains("aarch64-linux: served by nixqimg-aarch64 (PF); also matched by qemu-aarch64"), "{text}");
        assert!(text.contains("riscv64-linux: not served ('nixqimg register riscv64-linux')"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&to_json(&st)).unwrap();
        assert_eq!(json["entries"][1]["interpreter_exists"], true);
    }

    #[test]
    fn a_disabled_binfmt_misc_serves_nothing() {
        let inst = Instance { mounted: true, enabled: false, entries: vec![entry("nixqimg-aarch64", true, 1)] };
        let st = build(Path::new("/b"), &inst, &[], &|_| true);
        assert!(st.systems.iter().all(|s| s.served_by.is_none()));
    }
}
