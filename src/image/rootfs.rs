//! The root filesystem: the closure staged at its own absolute paths, NixOS's first-boot state (system
//! profile, Nix database, /etc/NIXOS), then e2fsprogs' `mkfs.ext4 -d` straight into the image at the
//! partition's offset.
//!
//! Staging links a store file rather than copying it (the copy was most of `image`'s time) whenever
//! mkfs.ext4 -d then reads exactly what a copy would give it: same content, same mode (a store file
//! has no setuid bits to drop), no extended attributes (mkfs copies those), and an inode not staged
//! under another name yet: an optimised store's shared inodes get a copy for each further name, so
//! they do not become hard links in the image. Everything a link does differ in (owner, times, link
//! count) the pass below overwrites, so the bytes are the same either way (tests/image.rs builds one
//! image linking as root and one copying as nobody, whom fs.protected_hardlinks refuses, and compares
//! them). Another filesystem or a refused link falls back to copying.
//!
//! `mkfs.ext4 -d` copies each file's owner and ctime from the staging tree, so an image staged by a
//! non-root builder (or in a Nix sandbox, where the store shows as 65534) would carry those owners, and
//! every build a different ctime. One `debugfs -w -f` pass afterwards sets owner 0:0 and all times to
//! the image's fixed time on every inode in use (mkfs.ext4 -d allocates them contiguously, and the pass
//! takes ~0.25 s per 50k inodes). E2FSPROGS_FAKE_TIME fixes the superblock's and new inodes' times.

use super::closure::Closure;
use super::layout::BLOCK;
use crate::error::{Error, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Default, Clone, Copy)]
pub struct Staged {
    /// Bytes the content takes on ext4 (each file and directory rounded up to a block).
    pub data: u64,
    pub inodes: u64,
}

fn io<T>(p: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(p, e))
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    io(p, fs::create_dir(p))?;
    io(p, fs::set_permissions(p, fs::Permissions::from_mode(mode)))
}

/// Whether a store file may be linked into the staging tree instead of copied (see the top).
struct Links {
    on: bool,
    dev: u64,
    seen: std::collections::HashSet<(u64, u64), crate::util::FixedState>,
}

impl Links {
    fn new(root: &Path) -> Links {
        match fs::metadata(root) {
            Ok(m) => Links { on: true, dev: m.dev(), seen: Default::default() },
            Err(_) => Links { on: false, dev: 0, seen: Default::default() },
        }
    }

    fn link(&mut self, src: &Path, dst: &Path, meta: &fs::Metadata) -> bool {
        if !self.on || meta.dev() != self.dev || meta.mode() & 0o7000 != 0 {
            return false;
        }
        if !self.seen.insert((meta.dev(), meta.ino())) || has_xattrs(src) {
            return false;
        }
        match fs::hard_link(src, dst) {
            Ok(()) => true,
            Err(e) => {
                // EPERM (fs.protected_hardlinks: not our file) or EXDEV will not change for the rest.
                if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EXDEV)) {
                    self.on = false;
                }
                false
            }
        }
    }
}

fn has_xattrs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return true };
    // SAFETY: c is a valid NUL-terminated path; a null list with size 0 only asks for the length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    n != 0
}

/// Stages one store path (file, directory or symlink) at the same path under `root`.
fn copy_tree(src: &Path, dst: &Path, st: &mut Staged, links: &mut Links, tick: &mut dyn FnMut(u64)) -> Result<()> {
    let meta = io(src, fs::symlink_metadata(src))?;
    let ft = meta.file_type();
    st.inodes += 1;
    if ft.is_symlink() {
        let target = io(src, fs::read_link(src))?;
        io(dst, std::os::unix::fs::symlink(&target, dst))?;
        if target.as_os_str().len() >= 60 {
            st.data += BLOCK;
        }
    } else if ft.is_file() {
        if !links.link(src, dst, &meta) {
            io(dst, fs::copy(src, dst))?;
            // Only the permission bits a store file can have: no setuid/setgid leaks from the builder.
            io(dst, fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o777)))?;
        }
        st.data += meta.len().div_ceil(BLOCK) * BLOCK;
        tick(meta.len());
    } else if ft.is_dir() {
        io(dst, fs::create_dir(dst))?;
        let mut names: Vec<_> = io(src, fs::read_dir(src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(src, e))?;
        names.sort();
        st.data += (names.len() as u64 * 64).div_ceil(BLOCK).max(1) * BLOCK;
        for n in names {
            copy_tree(&src.join(&n), &dst.join(&n), st, links, tick)?;
        }
        io(dst, fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o777)))?;
    } else {
        return Err(Error::new(format!(
            "{}: not a file, directory or symlink; a Nix store holds only those",
            src.display()
        )));
    }
    Ok(())
}

/// The staging root, as / will be on the image.
pub fn mkdir_root(root: &Path) -> Result<()> {
    mkdir(root, 0o755)
}

/// Where `abs` (an absolute path) lands under `root`.
pub fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Stages the whole root tree; the Nix database is written by the caller into `nix/var/nix/db`.
pub fn stage(
    root: &Path,
    closure: &Closure,
    store_dir: &Path,
    toplevel: &Path,
    tick: &mut dyn FnMut(u64),
) -> Result<Staged> {
    let mut st = Staged::default();
    let mut dir = root.to_path_buf();
    for c in store_dir.strip_prefix("/").unwrap_or(store_dir).components() {
        dir.push(c);
        // The store as nix-daemon keeps it (root:root here; Nix regroups it to nixbld when it starts).
        mkdir(&dir, if dir == under(root, store_dir) { 0o1775 } else { 0o755 })?;
        st.inodes += 1;
    }
    let mut links = Links::new(root);
    for p in &closure.paths {
        let src = Path::new(&p.path);
        copy_tree(src, &under(root, src), &mut st, &mut links, tick)?;
    }
    for d in [
        "nix",
        "nix/var",
        "nix/var/nix",
        "nix/var/nix/db",
        "nix/var/nix/gcroots",
        "nix/var/nix/profiles",
        "etc",
        "boot",
    ] {
        let p = root.join(d);
        if !p.exists() {
            mkdir(&p, 0o755)?;
            st.inodes += 1;
        }
    }
    let profiles = root.join("nix/var/nix/profiles");
    io(&profiles, std::os::unix::fs::symlink("system-1-link", profiles.join("system")))?;
    io(&profiles, std::os::unix::fs::symlink(toplevel, profiles.join("system-1-link")))?;
    // nixos-install marks the target so switch-to-configuration accepts it.
    let marker = root.join("etc/NIXOS");
    io(&marker, fs::write(&marker, b""))?;
    io(&marker, fs::set_permissions(&marker, fs::Permissions::from_mode(0o644)))?;
    st.inodes += 5;
    st.data += 4 * BLOCK + 16 * BLOCK * (closure.paths.len() as u64 / 64 + 1);
    Ok(st)
}

pub struct Mkfs<'a> {
    pub staging: &'a Path,
    pub image: &'a Path,
    pub offset: u64,
    pub size: u64,
    pub inodes: u64,
    pub uuid: &'a str,
    pub hash_seed: &'a str,
    pub time: u64,
}

/// The mkfs.ext4 arguments (pure, so the unit tests see exactly what is run).
pub fn mkfs_args(m: &Mkfs) -> Vec<String> {
    vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        BLOCK.to_string(),
        "-L".into(),
        "nixos".into(),
        "-U".into(),
        m.uuid.into(),
        "-N".into(),
        m.inodes.to_string(),
        "-E".into(),
        format!("hash_seed={},offset={},root_owner=0:0", m.hash_seed, m.offset),
        "-d".into(),
        m.staging.display().to_string(),
        m.image.display().to_string(),
        (m.size / BLOCK).to_string(),
    ]
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    // The compiled-in defaults, not this machine's /etc/mke2fs.conf: the same features everywhere.
    c.env("MKE2FS_CONFIG", "/nonexistent/nixqimg").env("E2FSPROGS_FAKE_TIME", "");
    c
}

fn run(name: &str, c: &mut Command) -> Result<String> {
    let out = c.output().map_err(|e| {
        Error::new(format!("cannot run {name}: {e}")).hint("install e2fsprogs (>= 1.43, for mkfs.ext4 -d)")
    })?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let msg = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
        let mut e = Error::new(format!("{name} failed: {msg}"));
        if msg.contains("allocate") || msg.contains("space") || msg.contains("inodes") {
            e = e.hint("the root filesystem is too small: give a larger --size or use --size auto");
        }
        return Err(e);
    }
    Ok(err + &String::from_utf8_lossy(&out.stdout))
}

pub fn mkfs(m: &Mkfs) -> Result<()> {
    run("mkfs.ext4", tool("mkfs.ext4").args(mkfs_args(m)).env("E2FSPROGS_FAKE_TIME", m.time.to_string()))?;
    let dev = format!("{}?offset={}", m.image.display(), m.offset);
    let stats = run("debugfs", tool("debugfs").args(["-R", "stats", &dev]))?;
    let field = |k: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::new(format!("debugfs stats: no '{k}'")))
    };
    let used = field("Inode count:")? - field("Free inodes:")?;
    let script = fixup_script(used, m.time);
    let file = m.staging.with_extension("debugfs");
    io(&file, fs::write(&file, script))?;
    let out = run(
        "debugfs",
        tool("debugfs").args(["-w", "-f"]).arg(&file).arg(&dev).env("E2FSPROGS_FAKE_TIME", m.time.to_string()),
    );
    let _ = fs::remove_file(&file);
    // debugfs exits 0 whatever its commands do: anything but its banner and its echo of each command
    // is a failed command.
    if let Some(bad) = out?.lines().find(|l| !l.starts_with("debugfs") && !l.trim().is_empty()) {
        return Err(Error::new(format!("debugfs could not fix owners and times: {bad}")));
    }
    Ok(())
}

/// Owner 0:0 and the fixed time on the root directory and every inode from the first non-reserved one
/// (11, lost+found) to the last one in use.
pub fn fixup_script(last_used: u64, time: u64) -> String {
    let mut s = String::with_capacity(last_used as usize * 100);
    for ino in std::iter::once(2).chain(11..=last_used) {
        for f in ["uid 0", "gid 0"] {
            s.push_str(&format!("sif <{ino}> {f}\n"));
        }
        for f in ["atime", "mtime", "ctime", "crtime"] {
            s.push_str(&format!("sif <{ino}> {f} @{time}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixup_covers_root_and_every_used_inode() {
        let s = fixup_script(13, 7);
        assert!(s.starts_with("sif <2> uid 0\nsif <2> gid 0\nsif <2> atime @7\n"));
        for ino in [11, 12, 13] {
            assert!(s.contains(&format!("sif <{ino}> ctime @7\n")));
        }
        assert!(!s.contains("<10>") && !s.contains("<14>"));
    }

    #[test]
    fn mkfs_is_labelled_and_seeded() {
        let m = Mkfs {
            staging: Path::new("/t/root"),
            image: Path::new("/o/img"),
            offset: 1 << 20,
            size: 1 << 30,
            inodes: 1000,
            uuid: "u",
            hash_seed: "h",
            time: 1,
        };
        let a = mkfs_args(&m).join(" ");
        assert!(
            a.contains("-L nixos -U u -N 1000 -E hash_seed=h,offset=1048576,root_owner=0:0 -d /t/root /o/img 262144"),
            "{a}"
        );
    }
}
