//! Bounded reading of the few ELF facts the planner needs: machine, type, PT_INTERP, the lowest fixed
//! load address, and from PT_DYNAMIC the DT_NEEDED, DT_RUNPATH and DT_RPATH strings.
//!
//! Every ELF is hostile input: each read is a `pread` of a size we chose, every offset and count is
//! checked before use, and nothing here can panic or allocate in proportion to a field of the file.

use crate::arch::{self, Arch, Class, Endian};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

/// The kernel refuses program header tables over 64 KiB; so do we.
const MAX_PHDRS_BYTES: usize = 64 * 1024;
/// PT_INTERP is a path: the kernel caps it at PATH_MAX.
const MAX_INTERP: u64 = 4096;
/// Enough for every dynamic section seen in practice (a few hundred entries).
const MAX_DYNAMIC_BYTES: u64 = 64 * 1024;
/// DT_NEEDED/RUNPATH strings are read from one window of .dynstr at most this large.
const MAX_STRTAB_WINDOW: u64 = 256 * 1024;
/// A single path string (RUNPATH may list several dirs).
const MAX_STR: usize = 8192;
/// Programs with more than this many DT_NEEDED are real, but we only check the first ones.
const MAX_NEEDED: usize = 64;
/// Largest address span of all PT_LOAD segments together.
const MAX_IMAGE_SPAN: u64 = 64 << 30;

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfFacts {
    pub arch: &'static Arch,
    pub e_type: u16,
    /// PT_INTERP without its NUL.
    pub interp: Option<Vec<u8>>,
    /// DT_RUNPATH if present, else DT_RPATH (ld.so ignores RPATH when RUNPATH exists).
    pub runpath: Option<Vec<u8>>,
    /// True when the search path came from DT_RPATH (bootstrap-tools' forced RPATH).
    pub runpath_is_rpath: bool,
    pub needed: Vec<Vec<u8>>,
    /// Lowest PT_LOAD address rounded down to the guest's 4 KiB page: what qemu must reserve at a
    /// fixed place for an ET_EXEC image.
    pub lowest_load: Option<u64>,
    pub highest_load: Option<u64>,
}

#[derive(Debug)]
pub enum ElfError {
    Io(io::Error),
    NotElf,
    /// The file ends (or a table points) before the named part.
    Truncated(&'static str),
    Malformed(&'static str),
    UnknownMachine {
        machine: u16,
        class: u8,
        data: u8,
    },
}

impl std::fmt::Display for ElfError {
    #[cold]
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ElfError::Io(e) => write!(f, "cannot read: {e}"),
            ElfError::NotElf => write!(f, "not an ELF file"),
            ElfError::Truncated(what) => {
                write!(f, "truncated ELF: {what} lies beyond the end of the file")
            }
            ElfError::Malformed(what) => write!(f, "malformed ELF: {what}"),
            ElfError::UnknownMachine { machine, class, data } => write!(
                f,
                "ELF machine {machine} ({}-bit, {}) is not one nixqimg knows",
                if *class == 1 { 32 } else { 64 },
                if *data == 2 { "big-endian" } else { "little-endian" }
            ),
        }
    }
}

impl ElfFacts {
    pub fn is_static(&self) -> bool {
        self.interp.is_none()
    }
    pub fn is_fixed_address(&self) -> bool {
        self.e_type == ET_EXEC
    }
}

/// The largest offset `pread` takes (its `off_t` is signed): a field pointing further is damage, not
/// an I/O error (the kernel's EINVAL would otherwise surface as "cannot read: Invalid argument").
const MAX_OFFSET: u64 = i64::MAX as u64;

/// `off .. off + len` as a range `pread` can be asked for, or `Truncated(what)`.
fn checked_range(off: u64, len: usize, what: &'static str) -> Result<(), ElfError> {
    match off.checked_add(len as u64) {
        Some(end) if end <= MAX_OFFSET => Ok(()),
        _ => Err(ElfError::Truncated(what)),
    }
}

/// The program, and its first bytes as already read. A read that lies inside them is served from
/// memory: PT_INTERP, the dynamic section and its strings nearly always sit in a program's first
/// 4 KiB, and reading them again cost every dynamic exec three preads.
struct Source<'a> {
    file: &'a File,
    head: &'a [u8],
}

impl Source<'_> {
    fn exact_at(&self, buf: &mut [u8], off: u64, what: &'static str) -> Result<(), ElfError> {
        if self.upto_at(buf, off, what)? < buf.len() {
            return Err(ElfError::Truncated(what));
        }
        Ok(())
    }

    /// Up to `buf.len()` bytes at `off`, fewer only at the end of the file: `read_upto_at`'s answer.
    fn upto_at(&self, buf: &mut [u8], off: u64, what: &'static str) -> Result<usize, ElfError> {
        checked_range(off, buf.len(), what)?;
        if let Some(inside) = usize::try_from(off).ok().and_then(|o| self.head.get(o..o.checked_add(buf.len())?)) {
            buf.copy_from_slice(inside);
            return Ok(buf.len());
        }
        read_upto_at(self.file, buf, off, what)
    }
}

/// Reads up to `buf.len()` bytes at `off`; fewer only at the end of the file.
fn read_upto_at(file: &File, buf: &mut [u8], off: u64, what: &'static str) -> Result<usize, ElfError> {
    checked_range(off, buf.len(), what)?;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ElfError::Io(e)),
        }
    }
    Ok(done)
}

/// How the file's integers are laid out: its class (word width) and byte order.
#[derive(Clone, Copy)]
struct Layout {
    class: Class,
    endian: Endian,
}

impl Layout {
    /// The `N` bytes at `off`, zeros where `b` ends first (callers size `b`; nothing here panics).
    fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        b.get(off..off.saturating_add(N)).and_then(|s| s.try_into().ok()).unwrap_or([0; N])
    }
    fn u16(self, b: &[u8], off: usize) -> u16 {
        let v = Self::bytes(b, off);
        match self.endian {
            Endian::Little => u16::from_le_bytes(v),
            Endian::Big => u16::from_be_bytes(v),
        }
    }
    fn u32(self, b: &[u8], off: usize) -> u32 {
        let v = Self::bytes(b, off);
        match self.endian {
            Endian::Little => u32::from_le_bytes(v),
            Endian::Big => u32::from_be_bytes(v),
        }
    }
    fn u64(self, b: &[u8], off: usize) -> u64 {
        let v = Self::bytes(b, off);
        match self.endian {
            Endian::Little => u64::from_le_bytes(v),
            Endian::Big => u64::from_be_bytes(v),
        }
    }
    /// An address, offset or size: 4 bytes in ELF32, 8 in ELF64.
    fn word(self, b: &[u8], off: usize) -> u64 {
        match self.class {
            Class::Elf32 => self.u32(b, off) as u64,
            Class::Elf64 => self.u64(b, off),
        }
    }
    /// The header's e_phoff, e_phentsize and e_phnum: after the entry point, where the word width
    /// puts them.
    fn phdr_table(self, header: &[u8]) -> (u64, u16, u16) {
        match self.class {
            Class::Elf32 => (self.word(header, 28), self.u16(header, 42), self.u16(header, 44)),
            Class::Elf64 => (self.word(header, 32), self.u16(header, 54), self.u16(header, 56)),
        }
    }
    fn phentsize(self) -> usize {
        match self.class {
            Class::Elf32 => 32,
            Class::Elf64 => 56,
        }
    }
    /// One program header from its `phentsize` bytes (the two classes order the fields apart).
    fn phdr(self, e: &[u8]) -> Phdr {
        match self.class {
            Class::Elf32 => Phdr {
                p_type: self.u32(e, 0),
                p_offset: self.word(e, 4),
                p_vaddr: self.word(e, 8),
                p_filesz: self.word(e, 16),
                p_memsz: self.word(e, 20),
                p_align: self.word(e, 28),
            },
            Class::Elf64 => Phdr {
                p_type: self.u32(e, 0),
                p_offset: self.word(e, 8),
                p_vaddr: self.word(e, 16),
                p_filesz: self.word(e, 32),
                p_memsz: self.word(e, 40),
                p_align: self.word(e, 48),
            },
        }
    }
    /// The program headers of `table`, decoded as they are walked: no list is built.
    fn phdrs(self, table: &[u8]) -> impl Iterator<Item = Phdr> + '_ {
        table.chunks_exact(self.phentsize()).map(move |e| self.phdr(e))
    }
}

/// The fields of a program header the planner's checks use. Decoded by hand, not by goblin: its
/// generic header and table parsing (and the Vec it fills) were a twelfth of the interpreter's
/// instructions per exec and code of their own in the hot text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phdr {
    p_type: u32,
    p_offset: u64,
    p_vaddr: u64,
    p_filesz: u64,
    p_memsz: u64,
    p_align: u64,
}

/// Reads the facts from an open file. Reads at most a few hundred KiB whatever the file says.
pub fn read(file: &File) -> Result<ElfFacts, ElfError> {
    // One read covers the header and, for nearly every program, the program headers too.
    let mut head = [0u8; 4096];
    let n = read_some(file, &mut head)?;
    let head = &head[..n];
    let src = Source { file, head };
    if head.len() < 4 || &head[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if head.len() < 20 {
        return Err(ElfError::Truncated("the ELF identification"));
    }
    let class = match head[4] {
        1 => Class::Elf32,
        2 => Class::Elf64,
        _ => return Err(ElfError::Malformed("EI_CLASS is neither 32- nor 64-bit")),
    };
    let endian = match head[5] {
        1 => Endian::Little,
        2 => Endian::Big,
        _ => return Err(ElfError::Malformed("EI_DATA is neither little- nor big-endian")),
    };
    let lay = Layout { class, endian };
    let e_type = lay.u16(head, 16);
    let machine = lay.u16(head, 18);
    let arch = arch::by_elf(machine, class, endian).ok_or(ElfError::UnknownMachine {
        machine,
        class: head[4],
        data: head[5],
    })?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(ElfError::Malformed("e_type is neither ET_EXEC nor ET_DYN"));
    }
    let ehsize = if class == Class::Elf64 { 64 } else { 52 };
    if head.len() < ehsize {
        return Err(ElfError::Truncated("the ELF header"));
    }
    let (phoff, phentsize, phnum) = lay.phdr_table(head);
    if phnum == 0 {
        return Err(ElfError::Malformed("no program headers"));
    }
    if phentsize as usize != lay.phentsize() {
        return Err(ElfError::Malformed("e_phentsize does not match the ELF class"));
    }
    let phbytes = phnum as usize * lay.phentsize();
    if phbytes > MAX_PHDRS_BYTES {
        return Err(ElfError::Malformed("program header table over 64 KiB"));
    }
    let mut far;
    let table: &[u8] = match usize::try_from(phoff).ok().and_then(|o| Some((o, o.checked_add(phbytes)?))) {
        Some((start, end)) if end <= head.len() => &head[start..end],
        _ if phoff.checked_add(phbytes as u64).is_none() => {
            return Err(ElfError::Malformed("e_phoff overflows"));
        }
        _ => {
            far = zeroed(phbytes);
            src.exact_at(&mut far, phoff, "the program header table")?;
            &far[..]
        }
    };

    let mut interp = None;
    let mut span = None;
    let mut dynamic = None;
    let file_size = crate::interp::sys::file_size(file).map_err(ElfError::Io)?;
    for ph in lay.phdrs(table) {
        match ph.p_type {
            PT_LOAD => load_span(&ph, file_size, &mut span)?,
            PT_INTERP => {
                if interp.is_some() {
                    return Err(ElfError::Malformed("more than one PT_INTERP"));
                }
                interp = Some(read_interp(&src, &ph)?);
            }
            PT_DYNAMIC => dynamic = Some(ph),
            _ => {}
        }
    }
    let Some((lo, hi)) = span else {
        return Err(ElfError::Malformed("no PT_LOAD segment"));
    };
    // qemu-user reserves and tracks the whole image span up front; a damaged size of a terabyte makes
    // it grind for minutes instead of failing. No real program's image spans this much.
    if hi - lo > MAX_IMAGE_SPAN {
        return Err(ElfError::Malformed("the loaded segments span more than 64 GiB"));
    }
    // Static programs (and static-pie) have nothing more the planner uses.
    let d = match (dynamic, interp.is_some()) {
        (Some(dynph), true) => read_dynamic(&src, &dynph, table, lay)?,
        _ => Dynamic::default(),
    };
    // Built once from what was read: assigning into a made struct drops its empty Vec through
    // generic drop code, another page range on the hot path.
    Ok(ElfFacts {
        arch,
        e_type,
        interp,
        runpath: d.runpath,
        runpath_is_rpath: d.runpath_is_rpath,
        needed: d.needed,
        lowest_load: Some(lo),
        highest_load: Some(hi),
    })
}

/// What the dynamic section says that the planner uses.
#[derive(Default)]
struct Dynamic {
    needed: Vec<Vec<u8>>,
    runpath: Option<Vec<u8>>,
    runpath_is_rpath: bool,
}

/// A PT_LOAD checked as the kernel and ld.so would check it, widening the loaded span.
fn load_span(ph: &Phdr, file_size: u64, span: &mut Option<(u64, u64)>) -> Result<(), ElfError> {
    // What the kernel and ld.so would refuse, refused here with a clear word (a bad
    // segment handed on can make qemu or ld.so spin instead of failing).
    if ph.p_filesz > ph.p_memsz {
        return Err(ElfError::Malformed("a PT_LOAD segment's file size exceeds its memory size"));
    }
    if ph.p_vaddr.checked_add(ph.p_memsz).is_none() {
        return Err(ElfError::Malformed("a PT_LOAD segment wraps around the address space"));
    }
    // A segment with no file bytes (bss only) reads nothing: the kernel ignores its offset,
    // which linkers leave wherever the previous section ended, often past the end.
    if ph.p_filesz > 0 && ph.p_offset.checked_add(ph.p_filesz).map_or(true, |end| end > file_size) {
        return Err(ElfError::Truncated("a loaded segment"));
    }
    if ph.p_align > 1 && (!ph.p_align.is_power_of_two() || ph.p_vaddr % ph.p_align != ph.p_offset % ph.p_align) {
        return Err(ElfError::Malformed("a PT_LOAD segment's address and offset are not aligned alike"));
    }
    let lo = ph.p_vaddr & !0xfff;
    let hi = ph.p_vaddr.saturating_add(ph.p_memsz);
    *span = Some(span.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
    Ok(())
}

/// `vec![0; len]` without the generic from_elem code, which sat in a page range of its own: every
/// range the interpreter touches is a page fault per exec (benches/interp counts them).
#[allow(clippy::slow_vector_initialization)] // the point: resize is inlined, from_elem is not
fn zeroed(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, 0);
    v
}

/// PT_INTERP's path, up to its first NUL.
fn read_interp(src: &Source, ph: &Phdr) -> Result<Vec<u8>, ElfError> {
    if ph.p_filesz < 2 || ph.p_filesz > MAX_INTERP {
        return Err(ElfError::Malformed("PT_INTERP size out of range"));
    }
    let mut buf = zeroed(ph.p_filesz as usize);
    src.exact_at(&mut buf, ph.p_offset, "PT_INTERP")?;
    // The kernel insists on the terminating NUL and uses the string up to the first one.
    if buf.last() != Some(&0) {
        return Err(ElfError::Malformed("PT_INTERP is not NUL-terminated"));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    if end == 0 {
        return Err(ElfError::Malformed("PT_INTERP is empty"));
    }
    buf.truncate(end);
    Ok(buf)
}

fn read_some(file: &File, buf: &mut [u8]) -> Result<usize, ElfError> {
    read_upto_at(file, buf, 0, "the ELF header")
}

/// File offset of virtual address `vaddr`, through the PT_LOAD that maps it from the file.
fn vaddr_to_offset(lay: Layout, table: &[u8], vaddr: u64) -> Option<(u64, u64)> {
    lay.phdrs(table)
        .filter(|p| p.p_type == PT_LOAD)
        .find_map(|p| {
            let rel = vaddr.checked_sub(p.p_vaddr)?;
            (rel < p.p_filesz).then(|| (p.p_offset.checked_add(rel), p.p_filesz - rel))
        })
        .and_then(|(o, avail)| Some((o?, avail)))
}

fn read_dynamic(src: &Source, dynph: &Phdr, table: &[u8], lay: Layout) -> Result<Dynamic, ElfError> {
    let entsize: usize = if lay.class == Class::Elf64 { 16 } else { 8 };
    let len = dynph.p_filesz.min(MAX_DYNAMIC_BYTES) as usize / entsize * entsize;
    if len == 0 {
        return Ok(Dynamic::default());
    }
    let mut buf = zeroed(len);
    src.exact_at(&mut buf, dynph.p_offset, "the dynamic section")?;
    let half = entsize / 2;
    let (mut strtab, mut strsz, mut runpath, mut rpath) = (None, None, None, None);
    let mut needed: Vec<u64> = Vec::with_capacity((len / entsize).min(MAX_NEEDED));
    for ent in buf.chunks_exact(entsize) {
        let (tag, val) = (lay.word(ent, 0), lay.word(ent, half));
        match tag {
            DT_NULL => break,
            DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_RUNPATH => runpath = Some(val),
            DT_RPATH => rpath = Some(val),
            _ => {}
        }
    }
    let Some(strtab) = strtab else {
        return Ok(Dynamic::default());
    };
    // DT_STRTAB is an address; in ET_DYN files it is relative to the load base 0, as the vaddrs are.
    let Some((str_off, avail)) = vaddr_to_offset(lay, table, strtab) else {
        return Err(ElfError::Malformed("DT_STRTAB is not inside a loaded segment"));
    };
    let strsz = strsz.unwrap_or(avail).min(avail);
    // The span of the strings wanted, by hand: chain/filter/collect is generic code paged in apart.
    let mut span: Option<(u64, u64)> = None;
    let mut want = |o: u64| {
        if o < strsz {
            span = Some(span.map_or((o, o), |(lo, hi)| (lo.min(o), hi.max(o))));
        }
    };
    for &o in &needed {
        want(o);
    }
    for o in [runpath, rpath].into_iter().flatten() {
        want(o);
    }
    let Some((min, max)) = span else {
        return Ok(Dynamic::default());
    };
    let end = max.saturating_add(MAX_STR as u64).min(strsz);
    if end - min > MAX_STRTAB_WINDOW {
        return Err(ElfError::Malformed("dynamic strings spread over more than 256 KiB"));
    }
    let mut window = zeroed((end - min) as usize);
    let at = str_off.checked_add(min).ok_or(ElfError::Truncated("the dynamic strings"))?;
    let n = src.upto_at(&mut window, at, "the dynamic strings")?;
    window.truncate(n);
    let string = |off: u64| -> Option<Vec<u8>> {
        let rel = usize::try_from(off.checked_sub(min)?).ok()?;
        let s = window.get(rel..)?;
        let len = s.iter().take(MAX_STR).position(|&b| b == 0)?;
        Some(s[..len].to_vec())
    };
    // Every field given: `..Dynamic::default()` would make and drop a Vec of its own.
    let mut d = Dynamic { needed: Vec::with_capacity(needed.len()), runpath: None, runpath_is_rpath: false };
    for &o in &needed {
        if let Some(s) = string(o).filter(|s| !s.is_empty()) {
            d.needed.push(s);
        }
    }
    if let Some(rp) = runpath.and_then(string) {
        d.runpath = Some(rp);
    } else if let Some(rp) = rpath.and_then(string) {
        d.runpath = Some(rp);
        d.runpath_is_rpath = true;
    }
    Ok(d)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// `len` bytes starting with a little-endian aarch64 ELF64 header of type `e_type` whose 3
    /// program headers follow it at 64 (e_phoff), 56 bytes each.
    fn header(len: usize, e_type: u16) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&e_type.to_le_bytes());
        f[18..20].copy_from_slice(&183u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        f
    }

    /// A dynamic aarch64 ET_DYN ELF64 like the hostile ones issue 12 found: PT_INTERP `interp`,
    /// DT_RUNPATH `runpath` (if any) and `needed` DT_NEEDED entries `libmissingN.so`.
    pub(crate) fn hostile(interp: &[u8], runpath: Option<&[u8]>, needed: usize) -> Vec<u8> {
        let interp_at = 0x100usize;
        let dyn_at = (interp_at + interp.len() + 1 + 15) & !15;
        let ndyn = needed + 4;
        let str_at = dyn_at + ndyn * 16;
        let mut strtab = vec![0u8];
        let mut offs = Vec::new();
        for i in 0..needed {
            offs.push(strtab.len() as u64);
            strtab.extend_from_slice(format!("libmissing{i}.so\0").as_bytes());
        }
        let rp_off = strtab.len() as u64;
        if let Some(rp) = runpath {
            strtab.extend_from_slice(rp);
            strtab.push(0);
        }
        let mut f = header(str_at + strtab.len(), ET_DYN);
        let total = f.len() as u64;
        let mut ph = |i: usize, t: u32, off: u64, sz: u64| {
            let b = 64 + i * 56;
            f[b..b + 4].copy_from_slice(&t.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            f[b + 16..b + 24].copy_from_slice(&off.to_le_bytes());
            f[b + 32..b + 40].copy_from_slice(&sz.to_le_bytes());
            f[b + 40..b + 48].copy_from_slice(&sz.to_le_bytes());
        };
        ph(0, PT_LOAD, 0, total);
        ph(1, PT_INTERP, interp_at as u64, interp.len() as u64 + 1);
        ph(2, PT_DYNAMIC, dyn_at as u64, ndyn as u64 * 16);
        f[interp_at..interp_at + interp.len()].copy_from_slice(interp);
        let mut ents: Vec<(u64, u64)> = offs.iter().map(|&o| (DT_NEEDED, o)).collect();
        if runpath.is_some() {
            ents.push((DT_RUNPATH, rp_off));
        }
        ents.push((DT_STRTAB, str_at as u64));
        ents.push((DT_STRSZ, strtab.len() as u64));
        for (i, (tag, val)) in ents.iter().enumerate() {
            let b = dyn_at + i * 16;
            f[b..b + 8].copy_from_slice(&tag.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&val.to_le_bytes());
        }
        f[str_at..].copy_from_slice(&strtab);
        f
    }

    /// `x:x:...`: 4096 one-letter relative directories, the most an 8 KiB RUNPATH holds.
    pub(crate) fn runpath_4096() -> Vec<u8> {
        let mut rp = b"x:".repeat(4096);
        rp.pop();
        rp
    }

    /// Regression (issue 12): offsets past i64::MAX made `pread` fail with EINVAL, reported as
    /// "cannot read: Invalid argument" with no hint instead of a damaged file.
    #[test]
    fn offsets_past_i64_max_are_a_truncated_file_not_an_io_error() {
        let good = hostile(b"/lib/ld-linux-aarch64.so.1", None, 1);
        assert!(facts_of(&good).is_ok());
        let put = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
        for off in [1u64 << 63, u64::MAX - 4096, (1u64 << 63) - 8, 1 << 40] {
            let mut phoff = good.clone();
            put(&mut phoff, 32, off);
            let mut interp = good.clone();
            put(&mut interp, 64 + 56 + 8, off);
            let mut dynamic = good.clone();
            put(&mut dynamic, 64 + 2 * 56 + 8, off);
            for (name, bad) in [("e_phoff", phoff), ("PT_INTERP", interp), ("PT_DYNAMIC", dynamic)] {
                match facts_of(&bad) {
                    Err(ElfError::Truncated(_) | ElfError::Malformed(_)) => {}
                    other => panic!("{name} at {off:#x}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_hostile_shapes_parse_as_their_fields_say() {
        let rp = runpath_4096();
        let f = facts_of(&hostile(&[b'l'; 4095], Some(&rp), 64)).unwrap();
        assert_eq!(f.interp.as_ref().map(Vec::len), Some(4095));
        assert_eq!(f.runpath.as_deref(), Some(&rp[..]));
        assert_eq!(f.needed.len(), 64);
    }

    /// A small but complete dynamic aarch64 ELF64: header, 4 phdrs, interp, dynamic, strtab.
    pub(crate) fn sample(interp: &[u8], e_type: u16, load: u64) -> Vec<u8> {
        let mut f = header(0x400, e_type);
        let ph = |f: &mut Vec<u8>, i: usize, t: u32, off: u64, vaddr: u64, sz: u64| {
            let b = 64 + i * 56;
            f[b..b + 4].copy_from_slice(&t.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            f[b + 16..b + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[b + 32..b + 40].copy_from_slice(&sz.to_le_bytes());
            f[b + 40..b + 48].copy_from_slice(&sz.to_le_bytes());
        };
        ph(&mut f, 0, PT_LOAD, 0, load, 0x400);
        ph(&mut f, 1, PT_INTERP, 0x200, load + 0x200, interp.len() as u64 + 1);
        ph(&mut f, 2, PT_DYNAMIC, 0x300, load + 0x300, 5 * 16);
        f[0x200..0x200 + interp.len()].copy_from_slice(interp);
        // strtab at 0x380: "\0libc.so.6\0/opt/lib\0"
        let strtab = b"\0libc.so.6\0/opt/lib\0";
        f[0x380..0x380 + strtab.len()].copy_from_slice(strtab);
        let dynent = |f: &mut Vec<u8>, i: usize, tag: u64, val: u64| {
            let b = 0x300 + i * 16;
            f[b..b + 8].copy_from_slice(&tag.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&val.to_le_bytes());
        };
        dynent(&mut f, 0, DT_NEEDED, 1);
        dynent(&mut f, 1, DT_RPATH, 11);
        dynent(&mut f, 2, DT_STRTAB, load + 0x380);
        dynent(&mut f, 3, DT_STRSZ, strtab.len() as u64);
        dynent(&mut f, 4, DT_NULL, 0);
        f
    }

    pub(crate) fn facts_of(bytes: &[u8]) -> Result<ElfFacts, ElfError> {
        let mut t = tempfile();
        t.write_all(bytes).unwrap();
        read(&t)
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("nixqimg-elf-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    /// Whatever the offset and length, a read served from the first bytes answers what a pread
    /// answers: inside them, across their end, past the end of a short file, past the end of a long
    /// one.
    #[test]
    fn reads_served_from_the_head_equal_preads() {
        let mut rng = crate::interp::fuzz::Rng(0x0bad_cafe_f00d_1234);
        for size in [100usize, 4095, 4096, 6000] {
            let bytes: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
            let mut t = tempfile();
            t.write_all(&bytes).unwrap();
            let head = &bytes[..size.min(4096)];
            let src = Source { file: &t, head };
            for _ in 0..2000 {
                let off = rng.below(size + 200) as u64;
                let len = rng.below(5000);
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                let served = src.upto_at(&mut a, off, "x").unwrap();
                let read = read_upto_at(&t, &mut b, off, "x").unwrap();
                assert_eq!((served, &a[..served]), (read, &b[..read]), "size {size}, {len} bytes at {off}");
            }
        }
    }

    #[test]
    fn reads_interp_rpath_needed_and_lowest_load() {
        let f =
            facts_of(&sample(b"/nix/store/x-bootstrap-tools/lib/ld-linux-aarch64.so.1", ET_EXEC, 0x3ff000)).unwrap();
        assert_eq!(f.arch.name, "aarch64");
        assert_eq!(f.interp.as_deref(), Some(&b"/nix/store/x-bootstrap-tools/lib/ld-linux-aarch64.so.1"[..]));
        assert_eq!(f.needed, vec![b"libc.so.6".to_vec()]);
        assert_eq!(f.runpath.as_deref(), Some(&b"/opt/lib"[..]));
        assert!(f.runpath_is_rpath);
        assert_eq!(f.lowest_load, Some(0x3ff000));
        assert!(f.is_fixed_address());
    }

    #[test]
    fn every_truncation_and_every_flipped_header_byte_is_an_error_or_a_fact_never_a_panic() {
        let good = sample(b"/lib/ld-linux-aarch64.so.1", ET_DYN, 0);
        for cut in 0..good.len() {
            let _ = facts_of(&good[..cut]);
        }
        for i in 0..0x400 {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                let _ = facts_of(&bad);
            }
            let mut bad = good.clone();
            bad[i] = 0xff;
            let _ = facts_of(&bad);
        }
    }

    /// The hand-written decoding reads every header and program-header field as goblin (the
    /// reference it replaced on the hot path, still a dependency for the image code) reads it: both
    /// classes, both byte orders, random bytes in every field.
    #[test]
    fn header_and_program_headers_decode_as_goblin_decodes_them() {
        use goblin::container::{Container, Ctx};
        use goblin::elf::program_header::ProgramHeader;
        let mut rng = crate::interp::fuzz::Rng(0x5eed_0fe1_f0ca_fe11);
        for round in 0..4000 {
            let (class, container, ehsize) =
                if round % 2 == 0 { (Class::Elf64, Container::Big, 64) } else { (Class::Elf32, Container::Little, 52) };
            let (endian, gendian, data) = if round % 4 < 2 {
                (Endian::Little, goblin::container::Endian::Little, 1)
            } else {
                (Endian::Big, goblin::container::Endian::Big, 2)
            };
            let lay = Layout { class, endian };
            let n = 1 + rng.below(6);
            let mut b: Vec<u8> = (0..ehsize + n * lay.phentsize()).map(|_| rng.next() as u8).collect();
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = if class == Class::Elf64 { 2 } else { 1 };
            b[5] = data;
            let h = goblin::elf::Elf::parse_header(&b).unwrap();
            assert_eq!(lay.phdr_table(&b), (h.e_phoff, h.e_phentsize, h.e_phnum), "round {round}");
            assert_eq!((lay.u16(&b, 16), lay.u16(&b, 18)), (h.e_type, h.e_machine), "round {round}");
            let table = &b[ehsize..];
            let theirs = ProgramHeader::parse(table, 0, n, Ctx::new(container, gendian)).unwrap();
            assert_eq!(ProgramHeader::size(Ctx::new(container, gendian)), lay.phentsize());
            let ours: Vec<Phdr> = lay.phdrs(table).collect();
            let theirs: Vec<Phdr> = theirs
                .iter()
                .map(|p| Phdr {
                    p_type: p.p_type,
                    p_offset: p.p_offset,
                    p_vaddr: p.p_vaddr,
                    p_filesz: p.p_filesz,
                    p_memsz: p.p_memsz,
                    p_align: p.p_align,
                })
                .collect();
            assert_eq!(ours, theirs, "round {round}");
        }
    }

    #[test]
    fn not_elf_and_unknown_machine() {
        assert!(matches!(facts_of(b"#!/bin/sh\n"), Err(ElfError::NotElf)));
        let mut s = sample(b"/lib/ld.so", ET_DYN, 0);
        s[18] = 0x99;
        assert!(matches!(facts_of(&s), Err(ElfError::UnknownMachine { machine: 0x99, .. })));
    }
}
