//! A stable, in-process fuzz harness for the interpreter's hostile-input path: `elf::read` and
//! `plan::plan` on mutated real ELFs, checking the bounds of issue 12 (no panic, no I/O error for a
//! damaged file, at most [`PROBE_LIMIT`] file probes, every error line at most 4 KiB, no input over
//! [`SLOW`]).
//!
//! In CI it runs a fixed 20,000 inputs (a few seconds). The long run, with overflow checks on, is
//! `benches/fuzz [INPUTS]` (default 10 million). Seeds: real aarch64 and x86_64 ELFs installed by
//! .ci/packages (libc6-arm64-cross's loader and libanl, coreutils' `true`) and synthetic dynamic
//! programs shaped like Nix ones; mutations are bit flips, interesting values written over header,
//! program-header and dynamic-entry fields, and long PT_INTERP/RUNPATH strings and many DT_NEEDED.

use super::elf::{self, ElfError};
use super::plan::{self, Mode, Probe, Request, Strategy};
use std::cell::Cell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// "A few hundred" file probes per exec (issue 12): the planner's budget plus slack.
const PROBE_LIMIT: usize = 416;
/// An input this slow is a finding (a real exec's whole budget is a few hundred µs).
const SLOW: Duration = Duration::from_millis(250);

/// xorshift64*: deterministic, so a failing input can be regenerated from its seed and index. The
/// planner's and paths' generated-input tests draw from it too.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Answers from a hash of the path, so both sides of every branch are seen; counts every probe.
struct HashFs {
    salt: u64,
    count: Cell<usize>,
}
impl HashFs {
    fn hit(&self, p: &Path) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.salt, p).hash(&mut h);
        h.finish() % 8 == 0
    }
}
impl Probe for HashFs {
    fn is_file(&self, p: &Path) -> bool {
        self.count.set(self.count.get() + 1);
        self.hit(p)
    }
    fn list(&self, dir: &Path, _: &[u8]) -> Vec<PathBuf> {
        self.count.set(self.count.get() + 1);
        if self.hit(dir) {
            vec![dir.join("ld-linux-aarch64.so.1")]
        } else {
            Vec::new()
        }
    }
    fn loader_has_argv0(&self, l: &Path) -> bool {
        self.hit(l)
    }
    fn canonicalize(&self, p: &Path) -> Option<PathBuf> {
        self.count.set(self.count.get() + 1);
        self.hit(p).then(|| p.to_path_buf())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    Panic,
    IoErrorForDamage,
    TooManyProbes,
    LongLine,
    Slow,
}

/// The error line the interpreter would write for `what` (the writer in `interp/mod.rs`).
fn line_len(what: &str) -> usize {
    super::error_line(b"/nix/store/x/bin/prog", what, "a hint of ordinary length, as every error has").len()
}

/// One input through both stages; `None` when every bound held.
fn check(file: &File, salt: u64) -> Option<Finding> {
    let t = Instant::now();
    let facts = match elf::read(file) {
        Ok(f) => f,
        Err(ElfError::Io(_)) => return Some(Finding::IoErrorForDamage),
        Err(e) => return (line_len(&e.to_string()) > super::MAX_LINE).then_some(Finding::LongLine),
    };
    let fs = HashFs { salt, count: Cell::new(0) };
    let sysroots = [PathBuf::from("/sysroot")];
    let args = [OsStr::new("a")];
    let env = [OsStr::new("A=1"), OsStr::new("LD_X=1")];
    for strategy in [Strategy::Auto, Strategy::LoaderFirst] {
        let req = Request {
            program: OsStr::new("/nix/store/x/bin/prog"),
            path: OsStr::new("/nix/store/x/bin/prog"),
            argv0: OsStr::new("prog"),
            args: &args,
            env: &env,
            facts: &facts,
            qemu: PathBuf::from("/q/qemu-aarch64"),
            strategy,
            sysroots: &sysroots,
            page_size: 16384,
            secure: false,
            explain: true,
        };
        fs.count.set(0);
        match plan::plan(&req, &fs) {
            Ok(p) => {
                if facts.is_static() && p.mode != Mode::Direct {
                    return Some(Finding::Panic);
                }
            }
            Err(e) => {
                if line_len(&e.to_string()) > super::MAX_LINE {
                    return Some(Finding::LongLine);
                }
            }
        }
        if fs.count.get() > PROBE_LIMIT {
            return Some(Finding::TooManyProbes);
        }
    }
    (t.elapsed() > SLOW).then_some(Finding::Slow)
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = at.checked_add(v.len()).and_then(|end| b.get_mut(at..end)) {
        s.copy_from_slice(v);
    }
}

/// Interesting 64-bit values for offsets and sizes.
fn interesting(r: &mut Rng, len: usize) -> u64 {
    let v = [
        0,
        1,
        4095,
        4096,
        len as u64,
        len as u64 + 1,
        (len as u64).wrapping_sub(1),
        i64::MAX as u64,
        1 << 63,
        (1 << 63) + 4096,
        u64::MAX,
        u64::MAX - 8,
        1 << 32,
        0x40_0000,
    ];
    let x = v[r.below(v.len())];
    if r.below(4) == 0 {
        x.wrapping_add(r.next() % 64)
    } else {
        x
    }
}

/// Mutates an ELF64 little-endian image in place (other classes get byte mutations only).
fn mutate(r: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + r.below(4) {
        let len = b.len();
        match r.below(6) {
            0 if len > 0 => {
                let i = r.below(len);
                b[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                b[i] = [0, 0xff, 0x7f, 0x80, 1, b':', b'/'][r.below(7)];
            }
            2 => {
                // A header field: e_phoff, e_phnum, e_phentsize.
                let v = interesting(r, len);
                match r.below(3) {
                    0 => put(b, 32, &v.to_le_bytes()),
                    1 => put(b, 56, &(v as u16).to_le_bytes()),
                    _ => put(b, 54, &(v as u16).to_le_bytes()),
                }
            }
            3 => {
                // A program header's offset, vaddr, filesz or memsz.
                let phoff = b.get(32..40).map_or(64, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])));
                let phnum = b.get(56..58).map_or(0, |s| u16::from_le_bytes([s[0], s[1]])) as usize;
                let i = r.below(phnum.min(32));
                let field = [8, 16, 32, 40][r.below(4)];
                let v = interesting(r, len);
                if let Ok(at) = usize::try_from(phoff) {
                    put(b, at.saturating_add(i * 56 + field), &v.to_le_bytes());
                }
            }
            4 if len > 0 => {
                // A dynamic-looking word anywhere 8-aligned.
                let at = r.below(len) & !7;
                put(b, at, &interesting(r, len).to_le_bytes());
            }
            _ => {
                if r.below(3) == 0 && len > 64 {
                    b.truncate(64 + r.below(len - 64));
                } else {
                    b.extend(std::iter::repeat(0u8).take(r.below(256)));
                }
            }
        }
    }
}

/// A synthetic dynamic program: PT_INTERP of 1 to 4095 bytes, a RUNPATH of up to 4096 directories,
/// up to 64 DT_NEEDED (issue 12's shapes are inside this space).
fn synthetic(r: &mut Rng) -> Vec<u8> {
    let interp_len = [26, 60, 200, 1000, 4095][r.below(5)];
    let mut interp = b"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-glibc/lib/ld-linux-aarch64.so.1".to_vec();
    interp.resize(interp_len, b'l');
    let dirs = [0, 1, 12, 100, 1000, 4096][r.below(6)];
    let runpath = (dirs > 0).then(|| {
        let mut s = b"x:".repeat(dirs);
        s.pop();
        s
    });
    let needed = [0, 1, 12, 64][r.below(4)];
    elf::tests::hostile(&interp, runpath.as_deref(), needed)
}

fn seeds() -> Vec<Vec<u8>> {
    let real =
        ["/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1", "/usr/aarch64-linux-gnu/lib/libanl.so.1", "/usr/bin/true"];
    let mut v: Vec<Vec<u8>> = real
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("fuzz seed {p} (see .ci/packages): {e}")))
        .collect();
    v.push(elf::tests::sample(b"/lib/ld-linux-aarch64.so.1", elf::ET_DYN, 0));
    v.push(elf::tests::sample(b"/nix/store/x-bootstrap-tools/lib/ld-linux-aarch64.so.1", elf::ET_EXEC, 0x3ff000));
    v
}

fn memfd() -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd it returns is owned by the File.
    let fd = unsafe { libc::memfd_create(c"nixqimg-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// Runs `inputs` mutated inputs from seed `salt`; returns each kind of finding with its count and
/// the first input's index.
pub fn run(inputs: u64, salt: u64) -> Vec<(Finding, u64, u64)> {
    let seeds = seeds();
    let mut r = Rng(salt | 1);
    let mut f = memfd();
    let mut found: Vec<(Finding, u64, u64)> = Vec::new();
    for i in 0..inputs {
        let mut b = match r.below(4) {
            0 => synthetic(&mut r),
            _ => seeds[r.below(seeds.len())].clone(),
        };
        if r.below(8) != 0 {
            mutate(&mut r, &mut b);
        }
        f.set_len(0).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&b, 0).unwrap();
        let _ = f.flush();
        let kind = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&f, r.next())))
            .unwrap_or(Some(Finding::Panic));
        if let Some(k) = kind {
            match found.iter_mut().find(|(f, ..)| *f == k) {
                Some(e) => e.1 += 1,
                None => found.push((k, 1, i)),
            }
        }
    }
    found.sort();
    found
}

/// The CI size: every bound holds on 20,000 inputs. `NIXQIMG_FUZZ_INPUTS` (benches/fuzz sets it)
/// makes it the long run.
#[test]
fn fuzz_elf_read_and_plan_stay_within_bounds() {
    let inputs = std::env::var("NIXQIMG_FUZZ_INPUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let salt = std::env::var("NIXQIMG_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1234_5678);
    let t = Instant::now();
    let found = run(inputs, salt);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("fuzz: {inputs} inputs in {secs:.1} s ({:.0} per second), seed {salt}", inputs as f64 / secs);
    for (k, n, first) in &found {
        eprintln!("fuzz: {k:?}: {n} inputs, first at #{first}");
    }
    assert!(found.is_empty(), "{found:?}");
}
