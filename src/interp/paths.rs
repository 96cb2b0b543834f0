//! Paths as bytes, for the interpreter's success path. std::path parses components (Path::join,
//! parent, file_name, strip_prefix) in code of its own, and generic iterator and collect code lands
//! in pages of its own too; each such page range is a page fault per exec (benches/interp counts
//! them). Pure, and a leaf: the planner, the configuration and the entry point use it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn path(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// `dir/rel` for a relative `rel` (one name or several), as Path::join gives it.
pub fn join(dir: &Path, rel: impl AsRef<OsStr>) -> PathBuf {
    let (d, r) = (bytes(dir), rel.as_ref().as_bytes());
    let mut v = Vec::with_capacity(d.len() + 1 + r.len());
    v.extend_from_slice(d);
    if !d.is_empty() && !d.ends_with(b"/") {
        v.push(b'/');
    }
    v.extend_from_slice(r);
    PathBuf::from(OsString::from_vec(v))
}

/// `p` without what std::path ignores at its end: slashes and `/.` components (`/` stays `/`).
fn trimmed(p: &[u8]) -> &[u8] {
    let mut b = p;
    loop {
        while b.len() > 1 && b.ends_with(b"/") {
            b = &b[..b.len() - 1];
        }
        match b.strip_suffix(b"/.") {
            Some(r) if !r.is_empty() => b = r,
            Some(_) => return b"/",
            None => return b,
        }
    }
}

/// The directory of an absolute file path (`/` for `/x`); None for a relative one or `/`.
pub fn dir_of(p: &Path) -> Option<&Path> {
    let b = bytes(p);
    if b.first() != Some(&b'/') {
        return None;
    }
    parent(p)
}

/// Path::parent: None for `/` and for a lone name.
pub fn parent(p: &Path) -> Option<&Path> {
    let b = trimmed(bytes(p));
    if b == b"/" || b.is_empty() {
        return None;
    }
    match b.iter().rposition(|&c| c == b'/') {
        None => Some(path(b"")),
        Some(i) => {
            let d = trimmed(&b[..i]);
            Some(path(if d.is_empty() { b"/" } else { d }))
        }
    }
}

/// The last component of `p` (Path::file_name, for the paths a PT_INTERP holds).
pub fn file_name(p: &Path) -> Option<&OsStr> {
    let b = trimmed(bytes(p));
    let name = &b[b.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1)..];
    (!name.is_empty() && name != b"." && name != b".." && name != b"/").then(|| OsStr::from_bytes(name))
}

/// `p` without its leading slashes: an absolute path made relative, to be looked up under a root.
pub fn without_root(p: &Path) -> &Path {
    let b = bytes(p);
    path(&b[b.iter().position(|&c| c != b'/').unwrap_or(b.len())..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn they_agree_with_std_path_for_the_paths_the_interpreter_meets() {
        for (dir, name) in
            [("/usr/bin", "qemu-aarch64"), ("/", "nixqimg.conf"), ("/nix/store/x-q/bin/", "q"), ("/s", "lib/ld.so")]
        {
            assert_eq!(join(Path::new(dir), name), Path::new(dir).join(name));
        }
        for p in
            ["/usr/bin/nixqimg", "/nixqimg", "/a/b/", "/a//b", "/", "x", "a/b", "a/b/", "/nix/store/h-x/lib/ld.so.1"]
        {
            assert_eq!(parent(Path::new(p)), Path::new(p).parent(), "{p}");
            assert_eq!(file_name(Path::new(p)), Path::new(p).file_name(), "{p}");
        }
        assert_eq!(dir_of(Path::new("/usr/bin/nixqimg")), Some(Path::new("/usr/bin")));
        assert_eq!(dir_of(Path::new("/")), None);
        assert_eq!(dir_of(Path::new("nixqimg")), None, "relative: no directory to trust");
        for p in ["/lib/ld-linux-aarch64.so.1", "//lib/ld.so", "lib/ld.so", "/"] {
            assert_eq!(without_root(Path::new(p)), Path::new(p).strip_prefix("/").unwrap_or(Path::new(p)), "{p}");
        }
    }

    /// PT_INTERP and RUNPATH come from the file: generated paths of `/`, names, `.` and `..`.
    /// parent and without_root keep the path as written where std normalises (`a//b`, `/./`, a
    /// leading `./`), so those are compared normalised; file_name must agree exactly.
    #[test]
    fn generated_paths_agree_with_std_path() {
        let norm = |p: Option<&Path>| {
            p.map(|p| p.components().filter(|c| *c != std::path::Component::CurDir).collect::<PathBuf>())
        };
        let parts = ["/", "//", "a", "ld.so", ".", "..", "/."];
        let mut rng = crate::interp::fuzz::Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut s = String::new();
            for _ in 0..rng.below(6) {
                s.push_str(parts[rng.below(parts.len())]);
            }
            let p = Path::new(&s);
            assert_eq!(file_name(p), p.file_name(), "{s:?}");
            assert_eq!(norm(parent(p)), norm(p.parent()), "{s:?}");
            let rel = p.strip_prefix("/").unwrap_or(p);
            assert_eq!(norm(Some(without_root(p))), norm(Some(rel)), "{s:?}");
        }
    }
}
