//! Reading binfmt_misc's entries and deciding, without touching anything, which entry the kernel
//! uses for each system.
//!
//! Order: the kernel keeps entries in a list, adds each new one at the head and uses the first
//! enabled match, so the newest registration wins (checked in a private instance: two entries for
//! the same magic, the later one ran; after re-registering the first, it ran). The directory lists
//! its entries newest first (raw getdents order; measured: six entries registered from alternating
//! CPUs list in reverse registration order, a re-registered one moves to the front). Inode numbers do
//! NOT give the order: `get_next_ino()` hands out per-CPU batches, and entries registered on the other
//! CPU got smaller numbers (seen here, and it made a test of `status` fail one run in three).
//! We do not use the procfs crate here: its binfmt parser `dbg!`s every magic to stderr, reads only
//! the fixed path and sorts the names, which loses the order.

use crate::arch::{Arch, Endian, ARCHES};
use std::path::Path;

pub const DIR: &str = "/proc/sys/fs/binfmt_misc";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Magic { offset: usize, magic: Vec<u8>, mask: Vec<u8> },
    Extension(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub enabled: bool,
    pub interpreter: String,
    pub flags: String,
    pub matcher: Matcher,
    /// Inode number: registration order (see module docs).
    pub order: u64,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Parses one entry file as the kernel prints it (`enabled`, `interpreter X`, `flags: PF`,
/// `offset N`, `magic HEX`, `mask HEX` or `extension .EXT`).
pub fn parse(name: &str, text: &str, order: u64) -> Option<Entry> {
    let (mut enabled, mut interpreter, mut flags) = (false, String::new(), String::new());
    let (mut offset, mut magic, mut mask, mut ext) = (0usize, None, None, None);
    for line in text.lines() {
        if line == "enabled" {
            enabled = true;
        } else if let Some(v) = line.strip_prefix("interpreter ") {
            interpreter = v.to_string();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("offset ") {
            offset = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("magic ") {
            magic = Some(unhex(v)?);
        } else if let Some(v) = line.strip_prefix("mask ") {
            mask = Some(unhex(v)?);
        } else if let Some(v) = line.strip_prefix("extension ") {
            ext = Some(v.trim_start_matches('.').to_string());
        }
    }
    let matcher = match (ext, magic) {
        (Some(e), _) => Matcher::Extension(e),
        (None, Some(magic)) => {
            let mask = mask.unwrap_or_else(|| vec![0xff; magic.len()]);
            Matcher::Magic { offset, magic, mask }
        }
        (None, None) => return None,
    };
    Some(Entry { name: name.to_string(), enabled, interpreter, flags, matcher, order })
}

/// What `dir` holds: whether it is a mounted binfmt_misc, its global status, and every entry.
#[derive(Debug, Clone, Default)]
pub struct Instance {
    pub mounted: bool,
    pub enabled: bool,
    pub entries: Vec<Entry>,
}

pub fn read(dir: &Path) -> Instance {
    let mounted = dir.join("register").exists();
    if !mounted {
        return Instance::default();
    }
    let enabled = std::fs::read_to_string(dir.join("status")).is_ok_and(|s| s.trim() == "enabled");
    let mut entries = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        // std's read_dir yields getdents order: newest entry first. Larger `order` is newer.
        for (pos, de) in rd.flatten().enumerate() {
            let name = de.file_name().to_string_lossy().into_owned();
            if name == "register" || name == "status" {
                continue;
            }
            let order = u64::MAX / 2 - pos as u64;
            // Entry files are a few hundred bytes; an entry removed meanwhile just drops out.
            if let Ok(text) = std::fs::read_to_string(de.path()) {
                if let Some(e) = parse(&name, &text, order) {
                    entries.push(e);
                }
            }
        }
    }
    entries.sort_by(|a, b| b.order.cmp(&a.order).then(a.name.cmp(&b.name)));
    Instance { mounted, enabled, entries }
}

/// The first 20 bytes of an ELF program of `arch` with e_type `ty` (2 = ET_EXEC, 3 = ET_DYN).
pub fn header(arch: &Arch, ty: u16) -> [u8; 20] {
    let mut h = *arch.magic;
    let t = match arch.endian {
        Endian::Little => ty.to_le_bytes(),
        Endian::Big => ty.to_be_bytes(),
    };
    h[16..18].copy_from_slice(&t);
    h
}

impl Entry {
    pub fn is_ours(&self) -> bool {
        self.name.starts_with(super::NAME_PREFIX)
    }

    /// Does the kernel's comparison of this entry accept `header` (a file's first bytes)?
    pub fn matches(&self, header: &[u8]) -> bool {
        match &self.matcher {
            Matcher::Extension(_) => false,
            Matcher::Magic { offset, magic, mask } => {
                let Some(h) = header.get(*offset..offset + magic.len()) else { return false };
                h.iter().zip(magic).zip(mask).all(|((h, m), k)| h & k == m & k)
            }
        }
    }

    /// Does it take programs of `arch` (ET_EXEC or ET_DYN)?
    pub fn serves(&self, arch: &Arch) -> bool {
        self.matches(&header(arch, 2)) || self.matches(&header(arch, 3))
    }

    /// Systems whose programs this entry takes.
    pub fn systems(&self) -> Vec<&'static Arch> {
        ARCHES.iter().filter(|a| self.serves(a)).collect()
    }
}

/// Enabled entries that take `arch`'s programs, in the order the kernel tries them (newest first):
/// the first one is what the kernel uses.
pub fn candidates<'a>(entries: &'a [Entry], arch: &Arch) -> Vec<&'a Entry> {
    let mut v: Vec<&Entry> = entries.iter().filter(|e| e.enabled && e.serves(arch)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.order));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::by_name;

    const QEMU_AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    #[test]
    fn parses_what_the_kernel_prints() {
        let e = parse("qemu-aarch64", QEMU_AARCH64, 7).unwrap();
        assert!(e.enabled);
        assert_eq!(e.flags, "POCF");
        assert_eq!(e.interpreter, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P");
        let names: Vec<_> = e.systems().iter().map(|a| a.name).collect();
        assert_eq!(names, ["aarch64"]);
        let ext = parse("py", "disabled\ninterpreter /usr/bin/python3\nflags: \nextension .pyc\n", 1).unwrap();
        assert_eq!(ext.matcher, Matcher::Extension("pyc".into()));
        assert!(ext.systems().is_empty());
        assert!(parse("bad", "enabled\nmagic 7f4\n", 1).is_none());
    }

    #[test]
    fn newest_enabled_entry_is_first() {
        let a = by_name("aarch64").unwrap();
        let old = parse("qemu-aarch64", QEMU_AARCH64, 5).unwrap();
        let mut new = parse("nixqimg-aarch64", QEMU_AARCH64, 9).unwrap();
        let entries = vec![old.clone(), new.clone()];
        let c: Vec<_> = candidates(&entries, a).iter().map(|e| e.name.as_str()).collect();
        assert_eq!(c, ["nixqimg-aarch64", "qemu-aarch64"]);
        new.enabled = false;
        let entries = vec![old, new];
        let c: Vec<_> = candidates(&entries, a).iter().map(|e| e.name.as_str()).collect();
        assert_eq!(c, ["qemu-aarch64"]);
    }

    #[test]
    fn offset_and_short_headers_do_not_panic() {
        let e = Entry {
            name: "x".into(),
            enabled: true,
            interpreter: "/x".into(),
            flags: String::new(),
            matcher: Matcher::Magic { offset: 250, magic: vec![1, 2], mask: vec![0xff, 0xff] },
            order: 1,
        };
        assert!(e.systems().is_empty());
    }
}
