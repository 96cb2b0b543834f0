//! Registration lines as systemd-binfmt and `/proc/sys/fs/binfmt_misc/register` read them:
//! `:NAME:TYPE:OFFSET:MAGIC:MASK:INTERPRETER:FLAGS`, the first character being the separator and
//! MAGIC/MASK holding `\xHH` escapes. Used to find other tools' binfmt.d files that claim the same
//! machines, and to check our table against Debian's files.

use super::entries::{Entry, Matcher};
use std::path::{Path, PathBuf};

/// Decodes binfmt_misc's escapes: `\xHH` and `\\`; other bytes stand for themselves.
fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            match b.get(i + 1) {
                Some(b'x') => {
                    let hex = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 4;
                }
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                _ => return None,
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Parses one registration line into an (unregistered, enabled) [`Entry`].
pub fn parse(line: &str) -> Option<Entry> {
    let line = line.trim_end_matches(['\n', '\r']);
    let sep = line.chars().next()?;
    let f: Vec<&str> = line[sep.len_utf8()..].split(sep).collect();
    if f.len() < 6 {
        return None;
    }
    let matcher = match f[1] {
        "M" => {
            let magic = unescape(f[3])?;
            let mask = if f[4].is_empty() { vec![0xff; magic.len()] } else { unescape(f[4])? };
            let offset = if f[2].is_empty() { 0 } else { f[2].parse().ok()? };
            Matcher::Magic { offset, magic, mask }
        }
        "E" => Matcher::Extension(f[3].to_string()),
        _ => return None,
    };
    Some(Entry {
        name: f[0].to_string(),
        enabled: true,
        interpreter: f[5].to_string(),
        flags: f.get(6).unwrap_or(&"").to_string(),
        matcher,
        order: 0,
    })
}

/// The directories systemd-binfmt reads, most important first.
pub const BINFMT_D: &[&str] = &["/etc/binfmt.d", "/run/binfmt.d", "/usr/local/lib/binfmt.d", "/usr/lib/binfmt.d"];

/// Every `*.conf` line in the binfmt.d directories, with the file it came from.
/// A file name masked by an earlier directory (e.g. `/etc/binfmt.d/x.conf -> /dev/null`) is skipped,
/// as systemd does.
pub fn read_binfmt_d(dirs: &[PathBuf]) -> Vec<(PathBuf, Entry)> {
    let mut seen = std::collections::HashSet::with_hasher(crate::util::FixedState::default());
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| is_conf(p)).collect();
        files.sort();
        for f in files {
            if !seen.insert(f.file_name().map(|n| n.to_os_string())) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            for l in text.lines().filter(|l| !l.starts_with(['#', ';']) && !l.trim().is_empty()) {
                if let Some(e) = parse(l) {
                    out.push((f.clone(), e));
                }
            }
        }
    }
    out
}

fn is_conf(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "conf")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{self, ARCHES};

    #[test]
    fn parses_our_own_lines_back() {
        for a in ARCHES {
            let l = super::super::registration_line(a, "n", Path::new("/i"), "F").unwrap();
            let e = parse(&l).unwrap();
            assert_eq!(e.matcher, Matcher::Magic { offset: 0, magic: a.magic.to_vec(), mask: a.mask.to_vec() });
            assert_eq!((e.interpreter.as_str(), e.flags.as_str()), ("/i", "PF"));
        }
    }

    /// Debian's qemu-user-static ships one file per foreign machine; every one of them that names an
    /// architecture in our table must carry exactly our magic and mask.
    #[test]
    fn table_agrees_with_debians_binfmt_d_files() {
        let dir = Path::new("/usr/lib/binfmt.d");
        let mut compared = Vec::new();
        for a in ARCHES.iter().filter(|a| a.name != arch::host().name) {
            let f = dir.join(format!("qemu-{}.conf", a.qemu));
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            let e = parse(text.lines().find(|l| l.starts_with(':')).unwrap()).unwrap();
            let Matcher::Magic { magic, mask, .. } = e.matcher else { panic!("{}: not a magic entry", f.display()) };
            assert_eq!(magic, a.magic.to_vec(), "magic of {} differs from {}", a.name, f.display());
            assert_eq!(mask, a.mask.to_vec(), "mask of {} differs from {}", a.name, f.display());
            compared.push(a.name);
        }
        // Debian leaves out the host's own family members (i386 on amd64): all others must be there.
        for want in ARCHES.iter().filter(|a| a.family != arch::host().family) {
            assert!(
                compared.contains(&want.name),
                "no {}/qemu-{}.conf: install qemu-user-static",
                dir.display(),
                want.qemu
            );
        }
    }
}
