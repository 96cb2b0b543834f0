//! `write`: puts an image onto a disk or into a raw file, like `qemu-img convert -O host_device`, and reads
//! back what it wrote. Sources: a qcow2 file (converted by qemu-img, the reference reader of its own
//! format), a raw file, or a raw or zstd-compressed raw stream on stdin (`ssh rescue nixqimg write - /dev/sda
//! < image.raw.zst`; decoded by the zstd tool, which checks the frame checksums, with no C library built
//! into nixqimg). It refuses a device that is in use: mounted, swapped on, held by device-mapper/md, or the
//! disk holding `/`. Deciding that is pure (`in_use`) over what /proc and /sys say.

use crate::error::{Error, Result};
use std::collections::hash_map::DefaultHasher;
use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: a qcow2 or raw file, or `-` for a raw or zstd-compressed raw stream on stdin.
    source: PathBuf,
    /// A block device (needs --yes) or a raw file.
    dest: PathBuf,
    /// Overwrite a block device.
    #[arg(long)]
    yes: bool,
}

const CHUNK: usize = 1 << 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A block device number as /proc and /sys write it, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dev(pub u32, pub u32);

impl Dev {
    fn parse(s: &str) -> Option<Dev> {
        let (a, b) = s.trim().split_once(':')?;
        Some(Dev(a.parse().ok()?, b.parse().ok()?))
    }
    fn of(rdev: u64) -> Dev {
        Dev(libc::major(rdev), libc::minor(rdev))
    }
}

/// The mounts of /proc/self/mountinfo: device and mount point (octal escapes left as they are).
pub fn parse_mountinfo(text: &str) -> Vec<(Dev, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = Dev::parse(f.nth(2)?)?;
            let point = f.nth(1)?.to_string();
            Some((dev, point))
        })
        .collect()
}

/// Why `family` (a disk, its partitions and everything stacked on them) must not be written, if it must not.
pub fn in_use(family: &[(Dev, String)], mounts: &[(Dev, String)], swaps: &[(Dev, String)]) -> Option<String> {
    for (dev, name) in family {
        if let Some((_, p)) = mounts.iter().find(|(d, p)| d == dev && p == "/") {
            return Some(format!("it is the disk holding / ({name} is mounted on {p})"));
        }
    }
    for (dev, name) in family {
        if let Some((_, p)) = mounts.iter().find(|(d, _)| d == dev) {
            return Some(format!("{name} is mounted on {p}"));
        }
        if let Some((_, p)) = swaps.iter().find(|(d, _)| d == dev) {
            return Some(format!("{name} is in use as swap ({p})"));
        }
    }
    None
}

/// The device, its partitions, and (recursively) what holds any of them (device-mapper, md), from sysfs.
pub fn family(sys_block_dev: &Path, dev: Dev) -> Vec<(Dev, String)> {
    let mut out = Vec::new();
    let mut todo = vec![sys_block_dev.join(format!("{}:{}", dev.0, dev.1))];
    while let Some(dir) = todo.pop() {
        let Ok(dir) = dir.canonicalize() else { continue };
        let Some(d) = std::fs::read_to_string(dir.join("dev")).ok().and_then(|s| Dev::parse(&s)) else { continue };
        if out.iter().any(|(x, _)| *x == d) {
            continue;
        }
        let name = dir.file_name().map(|n| format!("/dev/{}", n.to_string_lossy())).unwrap_or_default();
        out.push((d, name));
        for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if sub.path().join("partition").is_file() {
                todo.push(sub.path());
            }
        }
        for h in std::fs::read_dir(dir.join("holders")).into_iter().flatten().flatten() {
            todo.push(h.path());
        }
    }
    out
}

fn swaps() -> Vec<(Dev, String)> {
    let text = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let p = l.split_whitespace().next()?;
            let m = std::fs::metadata(p).ok()?;
            m.file_type().is_block_device().then(|| (Dev::of(m.rdev()), p.to_string()))
        })
        .collect()
}

fn human(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    }
}

enum Dest {
    Block { size: u64 },
    File,
}

fn check_dest(a: &Args) -> Result<Dest> {
    let shown = a.dest.display();
    let meta = match std::fs::metadata(&a.dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Dest::File),
        Err(e) => return Err(Error::io(&a.dest, e)),
    };
    if meta.file_type().is_file() {
        return Ok(Dest::File);
    }
    if !meta.file_type().is_block_device() {
        return Err(Error::new(format!("{shown} is neither a block device nor a regular file")).code(2));
    }
    let dev = Dev::of(meta.rdev());
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let fam = family(Path::new("/sys/dev/block"), dev);
    let fam = if fam.is_empty() { vec![(dev, shown.to_string())] } else { fam };
    if let Some(why) = in_use(&fam, &mounts, &swaps()) {
        let hint = if why.starts_with("it is the disk holding /") {
            "pick another disk: this one runs the system"
        } else {
            "unmount it first, or pick another disk"
        };
        return Err(Error::new(format!("refusing to write {shown}: {why}")).hint(hint));
    }
    let size = File::open(&a.dest).and_then(|mut f| f.seek(SeekFrom::End(0))).map_err(|e| Error::io(&a.dest, e))?;
    if !a.yes {
        return Err(Error::new(format!("{shown} is a block device ({}): everything on it will be lost", human(size)))
            .hint("add --yes to overwrite it")
            .code(2));
    }
    Ok(Dest::Block { size })
}

fn open_dest(path: &Path, dest: &Dest) -> Result<File> {
    let mut o = OpenOptions::new();
    match dest {
        // O_EXCL on a block device fails with EBUSY while the kernel has it mounted: a last guard
        // against a mount that appeared after the check.
        Dest::Block { .. } => o.write(true).read(true).custom_flags(libc::O_EXCL),
        Dest::File => o.write(true).read(true).create(true).truncate(true),
    };
    o.open(path).map_err(|e| Error::io(path, e))
}

struct Progress {
    on: bool,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress { on: std::io::stderr().is_terminal(), start: now, last: now }
    }
    fn show(&mut self, what: &str, done: u64, total: Option<u64>) {
        if !self.on || self.last.elapsed().as_millis() < 200 {
            return;
        }
        self.last = Instant::now();
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(0.001) / f64::from(1u32 << 20);
        let of = total.map(|t| format!(" of {}", human(t))).unwrap_or_default();
        eprint!("\r{what} {}{of} ({rate:.0} MiB/s)   ", human(done));
    }
    fn end(&self) {
        if self.on {
            eprintln!();
        }
    }
}

fn chunk_hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(b);
    h.finish()
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies `src` to `out`, remembering a hash per chunk for the read-back. A regular file gets holes
/// where the image has zeros; a device gets every byte, since its old contents must not show through.
fn copy(src: &mut dyn Read, out: &mut File, dest: &Path, sparse: bool, total: Option<u64>) -> Result<(u64, Vec<u64>)> {
    let mut buf = vec![0u8; CHUNK];
    let mut hashes = Vec::new();
    let mut done = 0u64;
    let mut p = Progress::new();
    loop {
        let n = read_full(src, &mut buf).map_err(|e| Error::new(format!("reading the image: {e}")))?;
        if n == 0 {
            break;
        }
        let b = &buf[..n];
        hashes.push(chunk_hash(b));
        if sparse && b.iter().all(|&x| x == 0) {
            out.seek(SeekFrom::Current(n as i64)).map_err(|e| Error::io(dest, e))?;
        } else {
            out.write_all(b).map_err(|e| {
                let hint =
                    if e.raw_os_error() == Some(libc::ENOSPC) { " (the image is larger than the disk)" } else { "" };
                Error::new(format!("{}: {e}{hint}", dest.display()))
            })?;
        }
        done += n as u64;
        p.show("written", done, total);
    }
    p.end();
    if sparse {
        out.set_len(done).map_err(|e| Error::io(dest, e))?;
    }
    out.sync_all().map_err(|e| Error::io(dest, e))?;
    Ok((done, hashes))
}

/// Reads back the first `len` bytes of `dest` from the disk (not the page cache) and compares them chunk
/// by chunk with what was written.
fn verify(out: &mut File, dest: &Path, len: u64, hashes: &[u64]) -> Result<()> {
    // SAFETY: posix_fadvise only reads the descriptor, which `out` keeps open for the call.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(out), 0, 0, libc::POSIX_FADV_DONTNEED) };
    out.seek(SeekFrom::Start(0)).map_err(|e| Error::io(dest, e))?;
    let mut r = out.take(len);
    let mut buf = vec![0u8; CHUNK];
    let mut p = Progress::new();
    for (i, want) in hashes.iter().enumerate() {
        let n = read_full(&mut r, &mut buf).map_err(|e| Error::io(dest, e))?;
        if n == 0 || chunk_hash(&buf[..n]) != *want {
            return Err(Error::new(format!(
                "{}: verification failed: MiB {i} reads back differently from what was written",
                dest.display()
            ))
            .hint("the disk may be failing; try again or use another disk"));
        }
        p.show("verified", (i as u64 + 1) * CHUNK as u64, Some(len));
    }
    p.end();
    Ok(())
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
    Command::new("qemu-img").args(args).stderr(Stdio::piped()).output().map_err(|e| {
        Error::new(format!("cannot run qemu-img: {e}")).hint("install the Debian package qemu-utils").code(127)
    })
}

/// `"virtual-size": N` from `qemu-img info --output=json`.
pub fn virtual_size(json: &str) -> Option<u64> {
    let rest = &json[json.find("\"virtual-size\"")? + "\"virtual-size\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
}

fn write_qcow2(a: &Args, dest: &Dest) -> Result<u64> {
    let src = a.source.as_os_str();
    let info = qemu_img(&["info".as_ref(), "--output=json".as_ref(), "-f".as_ref(), "qcow2".as_ref(), src])?;
    let size = virtual_size(&String::from_utf8_lossy(&info.stdout))
        .ok_or_else(|| Error::new(format!("{}: qemu-img cannot read it as qcow2", a.source.display())))?;
    let target = match dest {
        Dest::Block { size: dev } => {
            if *dev < size {
                return Err(Error::new(format!(
                    "{} ({}) is smaller than the image ({})",
                    a.dest.display(),
                    human(*dev),
                    human(size)
                )));
            }
            "host_device"
        }
        Dest::File => {
            // convert -n writes into an existing target of the right size (it cannot create a device).
            let f = open_dest(&a.dest, dest)?;
            f.set_len(size).map_err(|e| Error::io(&a.dest, e))?;
            "raw"
        }
    };
    // A device is written around the page cache, so the compare below reads the disk; a file may live on
    // tmpfs, which refuses O_DIRECT, and is flushed by qemu-img at the end anyway.
    let cache = if target == "host_device" { "none" } else { "writeback" };
    let mut args: Vec<std::ffi::OsString> =
        ["convert", "-n", "-f", "qcow2", "-O", target, "-t", cache].iter().map(|s| s.into()).collect();
    if std::io::stderr().is_terminal() {
        args.push("-p".into());
    }
    args.extend([src.to_os_string(), a.dest.clone().into_os_string()]);
    let st = Command::new("qemu-img")
        .args(&args)
        .status()
        .map_err(|e| Error::new(format!("cannot run qemu-img: {e}")).hint("install the Debian package qemu-utils"))?;
    if !st.success() {
        return Err(Error::new(format!("qemu-img convert to {} failed ({st})", a.dest.display())));
    }
    // Compare only the image's length of the destination: a disk larger than the image keeps old bytes after it.
    let mut left = std::ffi::OsString::from("driver=qcow2,file.filename=");
    left.push(src.to_string_lossy().replace(',', ",,"));
    let mut right = std::ffi::OsString::from(format!("driver=raw,size={size},file.filename="));
    right.push(a.dest.as_os_str().to_string_lossy().replace(',', ",,"));
    let out = qemu_img(&["compare".as_ref(), "--image-opts".as_ref(), &left, &right])?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        return Err(Error::new(format!(
            "{}: verification failed: {}",
            a.dest.display(),
            said.lines().next().unwrap_or("qemu-img compare failed").trim()
        )));
    }
    Ok(size)
}

/// The image as a byte stream: a raw file, stdin, or stdin through `zstd -d` when it starts with a zstd frame.
/// The bytes, the decoder to reap (zstd), and the length when known.
type Stream = (Box<dyn Read>, Option<std::process::Child>, Option<u64>);

fn stream(a: &Args) -> Result<Stream> {
    if a.source.as_os_str() != "-" {
        let f = File::open(&a.source).map_err(|e| Error::io(&a.source, e))?;
        let len = f.metadata().map(|m| m.len()).ok();
        return Ok((Box::new(f), None, len));
    }
    let mut stdin = std::io::stdin().lock();
    let mut head = [0u8; 4];
    let n = read_full(&mut stdin, &mut head).map_err(|e| Error::new(format!("reading stdin: {e}")))?;
    drop(stdin);
    if n == 0 {
        return Err(Error::new("stdin is empty")
            .hint("pipe the image in: nixqimg write - DEST < image.raw.zst")
            .code(2));
    }
    let head = head[..n].to_vec();
    if head != ZSTD_MAGIC {
        return Ok((Box::new(std::io::Cursor::new(head).chain(std::io::stdin())), None, None));
    }
    let mut child = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(format!("cannot run zstd: {e}")).hint("install the Debian package zstd").code(127))?;
    let mut to = child.stdin.take().ok_or_else(|| Error::new("zstd has no stdin"))?;
    let from = child.stdout.take().ok_or_else(|| Error::new("zstd has no stdout"))?;
    std::thread::spawn(move || {
        if to.write_all(&head).is_ok() {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to);
        }
    });
    Ok((Box::new(from), Some(child), None))
}

fn is_qcow2(p: &Path) -> bool {
    let mut m = [0u8; 4];
    File::open(p).and_then(|mut f| f.read_exact(&mut m)).is_ok() && &m == b"QFI\xfb"
}

pub fn run(a: Args) -> Result<()> {
    // The destination is checked before a single byte of the image is read.
    let dest = check_dest(&a)?;
    if a.source.as_os_str() != "-" {
        let sm = std::fs::metadata(&a.source).map_err(|e| Error::io(&a.source, e))?;
        if let Ok(dm) = std::fs::metadata(&a.dest) {
            if (sm.dev(), sm.ino()) == (dm.dev(), dm.ino()) {
                return Err(Error::new("the image and the destination are the same file").code(2));
            }
        }
        if is_qcow2(&a.source) {
            let size = write_qcow2(&a, &dest)?;
            eprintln!("nixqimg: wrote {} to {} and verified it", human(size), a.dest.display());
            return Ok(());
        }
    }
    let (mut src, child, total) = stream(&a)?;
    if let (Dest::Block { size }, Some(t)) = (&dest, total) {
        if *size < t {
            return Err(Error::new(format!(
                "{} ({}) is smaller than the image ({})",
                a.dest.display(),
                human(*size),
                human(t)
            )));
        }
    }
    let mut out = open_dest(&a.dest, &dest)?;
    let res = copy(&mut src, &mut out, &a.dest, matches!(dest, Dest::File), total);
    drop(src);
    if let Some(mut c) = child {
        let mut said = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut said);
        }
        let st = c.wait().map_err(|e| Error::new(format!("waiting for zstd: {e}")))?;
        if !st.success() {
            // zstd's own words, on one line: "/*stdin*\ : Read error (39) : premature end".
            let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(
                Error::new(format!("zstd could not decode stdin ({st}): {said}")).hint("is it a complete .zst file?")
            );
        }
    }
    let (len, hashes) = res?;
    verify(&mut out, &a.dest, len, &hashes)?;
    eprintln!("nixqimg: wrote {} to {} and verified it", human(len), a.dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 8:17 / /mnt/data rw - ext4 /dev/sdb1 rw
41 27 253:0 / /srv rw - xfs /dev/mapper/vg-srv rw
";

    fn fam(v: &[(u32, u32, &str)]) -> Vec<(Dev, String)> {
        v.iter().map(|(a, b, n)| (Dev(*a, *b), n.to_string())).collect()
    }

    #[test]
    fn mountinfo_gives_device_and_mount_point() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m[1], (Dev(254, 0), "/".to_string()));
        assert_eq!(m[2], (Dev(8, 17), "/mnt/data".to_string()));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn the_root_disk_is_refused_as_such() {
        let m = parse_mountinfo(MOUNTINFO);
        let why = in_use(&fam(&[(254, 0, "/dev/vda")]), &m, &[]).unwrap();
        assert_eq!(why, "it is the disk holding / (/dev/vda is mounted on /)");
    }

    #[test]
    fn a_disk_with_a_mounted_partition_or_a_mounted_holder_is_refused() {
        let m = parse_mountinfo(MOUNTINFO);
        let why = in_use(&fam(&[(8, 16, "/dev/sdb"), (8, 17, "/dev/sdb1")]), &m, &[]).unwrap();
        assert_eq!(why, "/dev/sdb1 is mounted on /mnt/data");
        let why = in_use(&fam(&[(8, 32, "/dev/sdc"), (8, 33, "/dev/sdc1"), (253, 0, "/dev/dm-0")]), &m, &[]).unwrap();
        assert_eq!(why, "/dev/dm-0 is mounted on /srv");
    }

    #[test]
    fn swap_is_refused_and_an_idle_disk_is_not() {
        let m = parse_mountinfo(MOUNTINFO);
        let s = fam(&[(8, 50, "/dev/sdd2")]);
        let why = in_use(&fam(&[(8, 48, "/dev/sdd"), (8, 50, "/dev/sdd2")]), &m, &s).unwrap();
        assert_eq!(why, "/dev/sdd2 is in use as swap (/dev/sdd2)");
        assert_eq!(in_use(&fam(&[(8, 64, "/dev/sde")]), &m, &s), None);
    }

    #[test]
    fn virtual_size_is_read_from_qemu_img_json() {
        let j = "{\n    \"children\": [],\n    \"virtual-size\": 314572800,\n    \"filename\": \"x\"}";
        assert_eq!(virtual_size(j), Some(314_572_800));
        assert_eq!(virtual_size("{}"), None);
    }
}
