//! Legacy BIOS boot for x86_64 images: SYSLINUX installed into the ESP's FAT, the way
//! `syslinux --install --offset` does it, but by nixqimg itself from the TARGET's syslinux package.
//!
//! Why SYSLINUX (and not GRUB i386-pc): it lives inside the ESP's own FAT (no extra BIOS boot
//! partition), reads the same kernels and initrds systemd-boot uses, its configuration is one small
//! text file that a POSIX sh script can regenerate on the machine (see `bootloader sync`), and its
//! installer's whole effect on an image file is checkable here byte for byte against the real tool.
//!
//! Neither Debian nor nixpkgs ships `ldlinux.sys` or the boot sector (`ldlinux.bss`) as files: both
//! exist only as data arrays inside the x86_64 installer binary (`syslinux_ldlinux`,
//! `syslinux_bootsect`, `syslinux_ldlinuxc32`, from syslinux's bin2c). nixqimg reads them out of that
//! ELF as bytes (by symbol when the binary keeps its symbol table, as nixpkgs' `strip -S` does; by
//! their fixed shapes when it is fully stripped, as Debian's is) and never executes it, so an aarch64
//! machine can make a BIOS-bootable x86_64 image. Files go into the FAT with mtools (a build-machine
//! tool, exactly as the real installer does); the sector map, the patching of ldlinux.sys, the boot
//! sector merge, the MBR boot code and the GPT attribute are done here.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SECTOR: usize = 512;
const LDLINUX_MAGIC: u32 = 0x3eb2_02fe;
const ADV_MAGIC1: u32 = 0x5a2d_2fa5;
const ADV_MAGIC2: u32 = 0xa304_1767;
const ADV_MAGIC3: u32 = 0xdd28_bf64;
/// EFI System Partition type GUID C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as GPT stores it.
const ESP_TYPE: [u8; 16] =
    [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];
/// GPT attribute bit 2: what gptmbr.bin looks for to pick the partition to chain-load.
const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;

/// The SYSLINUX pieces of one syslinux build (they must all come from the same build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BiosFiles {
    /// ldlinux.sys without its ADV (what bin2c calls `syslinux_ldlinux`, `_len` bytes).
    pub ldlinux: Vec<u8>,
    /// The FAT boot sector template (`ldlinux.bss`, 512 bytes).
    pub bootsect: Vec<u8>,
    /// ldlinux.c32, the rest of the loader, loaded from the FAT at boot.
    pub ldlinux_c32: Vec<u8>,
    /// gptmbr.bin: the MBR boot code that chain-loads the LegacyBIOSBootable GPT partition.
    pub gptmbr: Vec<u8>,
}

impl BiosFiles {
    /// Reads the pieces from a syslinux package root: nixpkgs' `$out` (`bin/.syslinux-wrapped`,
    /// `share/syslinux/gptmbr.bin`) or a Debian root (`usr/bin/syslinux`,
    /// `usr/lib/syslinux/mbr/gptmbr.bin`).
    pub fn from_syslinux(root: &Path) -> Result<Self> {
        let installer = first_existing(root, &["bin/.syslinux-wrapped", "bin/syslinux", "usr/bin/syslinux"], true)
            .ok_or_else(|| {
                Error::new(format!("{}: no syslinux installer binary (bin/syslinux) in it", root.display()))
                    .hint("pass the x86_64 syslinux package: nixpkgs' syslinux, or Debian's syslinux + syslinux-common")
            })?;
        let mbr = first_existing(
            root,
            &["share/syslinux/gptmbr.bin", "usr/lib/syslinux/mbr/gptmbr.bin", "usr/lib/SYSLINUX/gptmbr.bin"],
            false,
        )
        .ok_or_else(|| {
            Error::new(format!("{}: no gptmbr.bin in it", root.display()))
                .hint("Debian ships it in syslinux-common, nixpkgs in syslinux's share/syslinux")
        })?;
        let bin = std::fs::read(&installer).map_err(|e| Error::io(&installer, e))?;
        let (bootsect, ldlinux, ldlinux_c32) =
            extract(&bin).map_err(|e| Error::new(format!("{}: {e}", installer.display())))?;
        let gptmbr = std::fs::read(&mbr).map_err(|e| Error::io(&mbr, e))?;
        if gptmbr.len() > 440 || gptmbr.is_empty() {
            return Err(Error::new(format!("{}: {} bytes, MBR boot code is at most 440", mbr.display(), gptmbr.len())));
        }
        Ok(BiosFiles { ldlinux, bootsect, ldlinux_c32, gptmbr })
    }

    /// The bytes of a fresh `/ldlinux.sys`: the loader followed by two copies of an empty ADV.
    pub fn ldlinux_sys(&self) -> Vec<u8> {
        let mut v = self.ldlinux.clone();
        v.extend_from_slice(&empty_adv());
        v
    }
}

fn first_existing(root: &Path, rels: &[&str], elf: bool) -> Option<PathBuf> {
    rels.iter().map(|r| root.join(r)).find(|p| {
        if !elf {
            return p.is_file();
        }
        let mut m = [0u8; 4];
        File::open(p).and_then(|mut f| f.read_exact(&mut m)).is_ok() && &m == b"\x7fELF"
    })
}

/// Two copies of syslinux's empty Auxiliary Data Vector (`syslinux_reset_adv`).
pub fn empty_adv() -> Vec<u8> {
    let mut adv = vec![0u8; SECTOR];
    put32(&mut adv, 0, ADV_MAGIC1);
    let mut csum = ADV_MAGIC2;
    for i in (8..SECTOR - 4).step_by(4) {
        csum = csum.wrapping_sub(get32(&adv, i));
    }
    put32(&mut adv, 4, csum);
    put32(&mut adv, SECTOR - 4, ADV_MAGIC3);
    let mut both = adv.clone();
    both.extend_from_slice(&adv);
    both
}

fn get16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}
fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// (boot sector, ldlinux.sys, ldlinux.c32), as embedded in an installer.
type Pieces = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Finds (bootsect, ldlinux.sys, ldlinux.c32) inside an installer ELF: by symbol if it has a symbol
/// table, else by shape.
pub fn extract(bin: &[u8]) -> std::result::Result<Pieces, String> {
    if let Some(found) = by_symbols(bin)? {
        return Ok(found);
    }
    by_shape(bin)
}

fn by_symbols(bin: &[u8]) -> std::result::Result<Option<Pieces>, String> {
    let elf = goblin::elf::Elf::parse(bin).map_err(|e| format!("not a readable ELF: {e}"))?;
    let find = |name: &str| -> Option<usize> {
        let sym = elf.syms.iter().find(|s| elf.strtab.get_at(s.st_name) == Some(name))?;
        let sh = elf.section_headers.get(sym.st_shndx)?;
        if sh.sh_type == goblin::elf::section_header::SHT_NOBITS {
            return None;
        }
        let off = sym.st_value.checked_sub(sh.sh_addr)?.checked_add(sh.sh_offset)?;
        usize::try_from(off).ok()
    };
    let Some(ld) = find("syslinux_ldlinux") else { return Ok(None) };
    let missing = |n: &str| format!("has syslinux_ldlinux but no {n}: not a syslinux installer build nixqimg knows");
    let ld_len = find("syslinux_ldlinux_len").ok_or_else(|| missing("syslinux_ldlinux_len"))?;
    let bs = find("syslinux_bootsect").ok_or_else(|| missing("syslinux_bootsect"))?;
    let c32 = find("syslinux_ldlinuxc32").ok_or_else(|| missing("syslinux_ldlinuxc32"))?;
    let c32_len = find("syslinux_ldlinuxc32_len").ok_or_else(|| missing("syslinux_ldlinuxc32_len"))?;
    let slice = |o: usize, n: usize| bin.get(o..o.checked_add(n)?).map(<[u8]>::to_vec);
    let u32_at = |o: usize| slice(o, 4).map(|b| get32(&b, 0) as usize);
    let bad = || "a syslinux symbol points outside the file".to_string();
    let ld_n = u32_at(ld_len).ok_or_else(bad)?;
    let c32_n = u32_at(c32_len).ok_or_else(bad)?;
    Ok(Some((slice(bs, SECTOR).ok_or_else(bad)?, slice(ld, ld_n).ok_or_else(bad)?, slice(c32, c32_n).ok_or_else(bad)?)))
}

/// Stripped installers: bin2c lays the arrays out as boot sector (`EB 58 90 "SYSLINUX"` ... `55 AA`),
/// ldlinux.sys (starts with its banner, LDLINUX_MAGIC soon after, padded to 512 bytes) and ldlinux.c32
/// (a 32-bit ELF); the `_len` constants sit together in .rodata. Every length guessed from the shape
/// must also be found as such a constant, so a layout nixqimg does not know fails instead of guessing.
fn by_shape(bin: &[u8]) -> std::result::Result<Pieces, String> {
    let unknown = "stripped syslinux installer whose embedded loader nixqimg cannot find";
    let ld = find_from(bin, 0, b"\r\nSYSLINUX ")
        .filter(|&i| (0..64).step_by(4).any(|d| bin.len() >= i + d + 4 && get32(bin, i + d) == LDLINUX_MAGIC))
        .ok_or_else(|| format!("{unknown} (no ldlinux.sys banner)"))?;
    let bs = ld
        .checked_sub(SECTOR)
        .filter(|&b| &bin[b..b + 11] == b"\xeb\x58\x90SYSLINUX" && bin[b + 510..b + 512] == [0x55, 0xaa]);
    let bs = bs.ok_or_else(|| format!("{unknown} (no boot sector before ldlinux.sys)"))?;
    let c32 = find_from(bin, ld, b"\x7fELF\x01\x01\x01").ok_or_else(|| format!("{unknown} (no ldlinux.c32)"))?;
    let e = &bin[c32..];
    if e.len() < 52 {
        return Err(format!("{unknown} (truncated ldlinux.c32)"));
    }
    let c32_len = get32(e, 32) as usize + get16(e, 46) as usize * get16(e, 48) as usize;
    let last = bin[ld..c32].iter().rposition(|&b| b != 0).ok_or_else(|| format!("{unknown} (empty ldlinux.sys)"))?;
    let ld_len = (last + 1).div_ceil(SECTOR) * SECTOR;
    let consts = [SECTOR as u32, ld_len as u32, c32_len as u32];
    let confirmed = (0..bin.len().saturating_sub(24)).step_by(4).any(|i| {
        // bin2c writes `<name>_len` then `<name>_mtime` for each array, in link order; builds patched
        // for reproducibility may drop the mtimes.
        let with_mtimes = (0..3).all(|k| get32(bin, i + 8 * k) == consts[k]) && get32(bin, i + 4) == get32(bin, i + 12);
        with_mtimes || (0..3).all(|k| get32(bin, i + 4 * k) == consts[k])
    });
    if !confirmed || c32 + c32_len > bin.len() {
        return Err(format!("{unknown} (lengths {ld_len} and {c32_len} are not confirmed by its .rodata)"));
    }
    Ok((bin[bs..bs + SECTOR].to_vec(), bin[ld..ld + ld_len].to_vec(), bin[c32..c32 + c32_len].to_vec()))
}

fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay.get(from..)?, needle).map(|i| i + from)
}

/// A FAT16/FAT32 volume's geometry, from its boot sector.
#[derive(Debug, Clone, Copy)]
struct Fat {
    sec_per_clus: u64,
    fat_start: u64,
    fat_bytes: u64,
    root_start: u64,
    root_sectors: u64,
    data_start: u64,
    fat32_root: Option<u32>,
    clusters: u64,
}

fn parse_fat(bs: &[u8]) -> std::result::Result<Fat, String> {
    if bs.len() < SECTOR || bs[510..512] != [0x55, 0xaa] {
        return Err("no FAT boot sector (missing 55 AA)".into());
    }
    if get16(bs, 11) != 512 {
        return Err(format!("FAT sector size {} (SYSLINUX needs 512)", get16(bs, 11)));
    }
    let spc = u64::from(bs[13]);
    let res = u64::from(get16(bs, 14));
    let nfats = u64::from(bs[16]);
    let root_ents = u64::from(get16(bs, 17));
    let total = match get16(bs, 19) {
        0 => u64::from(get32(bs, 32)),
        n => u64::from(n),
    };
    let fatsz = match get16(bs, 22) {
        0 => u64::from(get32(bs, 36)),
        n => u64::from(n),
    };
    if spc == 0 || res == 0 || nfats == 0 || fatsz == 0 {
        return Err("not a FAT filesystem (zero field in its boot sector)".into());
    }
    let root_sectors = (root_ents * 32).div_ceil(512);
    let data_start = res + nfats * fatsz + root_sectors;
    let clusters = total.saturating_sub(data_start) / spc;
    let fat32 = clusters >= 65525;
    if clusters < 4085 {
        return Err("FAT12 filesystem (make the ESP FAT16 or FAT32)".into());
    }
    Ok(Fat {
        sec_per_clus: spc,
        fat_start: res,
        fat_bytes: fatsz * 512,
        root_start: res + nfats * fatsz,
        root_sectors,
        data_start,
        fat32_root: fat32.then(|| get32(bs, 44)),
        clusters,
    })
}

impl Fat {
    fn next_cluster(&self, fat: &[u8], c: u32) -> Option<u32> {
        let n = if self.fat32_root.is_some() {
            get32(fat, c as usize * 4) & 0x0fff_ffff
        } else {
            u32::from(get16(fat, c as usize * 2))
        };
        let end = if self.fat32_root.is_some() { 0x0fff_fff8 } else { 0xfff8 };
        (n >= 2 && n < end && u64::from(n) < self.clusters + 2).then_some(n)
    }
    fn cluster_sectors(&self, c: u32) -> impl Iterator<Item = u64> {
        let first = self.data_start + (u64::from(c) - 2) * self.sec_per_clus;
        first..first + self.sec_per_clus
    }
    /// Every sector of a chain, in order, stopping at `limit` sectors.
    fn chain_sectors(&self, fat: &[u8], start: u32, limit: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut c = Some(start).filter(|&c| c >= 2 && u64::from(c) < self.clusters + 2);
        let mut hops = 0u64;
        while let Some(cl) = c {
            out.extend(self.cluster_sectors(cl));
            hops += 1;
            if out.len() >= limit || hops > self.clusters {
                break;
            }
            c = self.next_cluster(fat, cl);
        }
        out.truncate(limit);
        out
    }
}

/// The sectors (relative to the filesystem) holding the root directory entry "LDLINUX SYS"'s data.
fn ldlinux_sectors(vol: &mut dyn ReadAt, fat: &Fat, want: usize) -> std::result::Result<Vec<u64>, String> {
    let table = vol.read_at(fat.fat_start * 512, fat.fat_bytes as usize)?;
    let dir_sectors: Vec<u64> = match fat.fat32_root {
        Some(root) => fat.chain_sectors(&table, root, usize::MAX),
        None => (fat.root_start..fat.root_start + fat.root_sectors).collect(),
    };
    for s in dir_sectors {
        let sec = vol.read_at(s * 512, SECTOR)?;
        for e in sec.chunks(32) {
            if e[0] == 0 {
                return Err("ldlinux.sys is not in the FAT's root directory".into());
            }
            if e[0] != 0xe5 && e[11] != 0x0f && &e[..11] == b"LDLINUX SYS" {
                let cl = (u32::from(get16(e, 20)) << 16) | u32::from(get16(e, 26));
                let secs = fat.chain_sectors(&table, cl, want);
                if secs.len() < want {
                    return Err(format!("ldlinux.sys has {} sectors, it needs {want}", secs.len()));
                }
                return Ok(secs);
            }
        }
    }
    Err("ldlinux.sys is not in the FAT's root directory".into())
}

trait ReadAt {
    fn read_at(&mut self, off: u64, len: usize) -> std::result::Result<Vec<u8>, String>;
}

struct Window<'a> {
    file: &'a mut File,
    base: u64,
}

impl ReadAt for Window<'_> {
    fn read_at(&mut self, off: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        self.file.seek(SeekFrom::Start(self.base + off)).map_err(|e| e.to_string())?;
        self.file.read_exact(&mut buf).map_err(|e| format!("reading the ESP: {e}"))?;
        Ok(buf)
    }
}

/// `syslinux_patch`: points the boot sector at ldlinux.sys's first sector and ldlinux.sys at the
/// rest of itself and its ADV copies, then fixes its checksum. `sectors` are filesystem-relative.
pub fn patch(ldlinux: &mut [u8], bootsect: &mut [u8], sectors: &[u64]) -> std::result::Result<(), String> {
    let nsect = ldlinux.len().div_ceil(SECTOR) + 2;
    if sectors.len() < nsect {
        return Err(format!("ldlinux.sys needs {nsect} sectors, the map has {}", sectors.len()));
    }
    let bad = || "ldlinux.sys has no valid patch area (not a SYSLINUX 4+ loader)".to_string();
    let pa = (0..ldlinux.len().saturating_sub(24)).step_by(4).find(|&i| get32(ldlinux, i) == LDLINUX_MAGIC);
    let pa = pa.ok_or_else(bad)?;
    let epa = get16(ldlinux, pa + 22) as usize;
    if epa + 20 > ldlinux.len() {
        return Err(bad());
    }
    let field = |k: usize| get16(ldlinux, epa + 2 * k) as usize;
    let (advptr, secptr, secptrcnt, s1p0, s1p1) = (field(0), field(5), field(6), field(7), field(8));
    if s1p1 + 2 > SECTOR || s1p0 + 2 > SECTOR || bootsect.len() != SECTOR {
        return Err(bad());
    }
    // The boot sector fields are 16-bit halves of the 32-bit LBA, as set_32 writes them (LSW, MSW).
    put32(bootsect, s1p0, sectors[0] as u32);
    put32(bootsect, s1p1, (sectors[0] >> 32) as u32);
    let rest = &sectors[1..];
    let dw = ldlinux.len() / 4;
    put16(ldlinux, pa + 8, (nsect - 2) as u16);
    put16(ldlinux, pa + 10, 2);
    put32(ldlinux, pa + 12, dw as u32);
    if secptr + secptrcnt * 10 > ldlinux.len() || advptr + 16 > ldlinux.len() {
        return Err(bad());
    }
    let extents = extents(&rest[..nsect - 3]);
    if extents.len() > secptrcnt {
        return Err(format!("ldlinux.sys is in {} pieces, the loader holds {secptrcnt}", extents.len()));
    }
    ldlinux[secptr..secptr + secptrcnt * 10].fill(0);
    for (k, (lba, len)) in extents.iter().enumerate() {
        put64(ldlinux, secptr + 10 * k, *lba);
        put16(ldlinux, secptr + 10 * k + 8, *len);
    }
    put64(ldlinux, advptr, rest[nsect - 3]);
    put64(ldlinux, advptr + 8, rest[nsect - 2]);
    put32(ldlinux, pa + 16, 0);
    let mut csum = LDLINUX_MAGIC;
    for i in 0..dw {
        csum = csum.wrapping_sub(get32(ldlinux, 4 * i));
    }
    put32(ldlinux, pa + 16, csum);
    Ok(())
}

/// `generate_extents`: runs of consecutive sectors, each under 64 KiB, no sector straddling a 64 KiB
/// boundary of the load address (ldlinux.sys loads at 0x8000).
fn extents(sectors: &[u64]) -> Vec<(u64, u16)> {
    let mut out = Vec::new();
    let (mut addr, mut base, mut lba, mut len) = (0x8000u32, 0x8000u32, 0u64, 0u32);
    for &s in sectors {
        if len > 0 {
            let xbytes = (len + 1) * SECTOR as u32;
            if s == lba + u64::from(len) && xbytes < 65536 && (addr ^ (base + xbytes - 1)) & 0xffff_0000 == 0 {
                len += 1;
                addr += SECTOR as u32;
                continue;
            }
            out.push((lba, len as u16));
        }
        base = addr;
        lba = s;
        len = 1;
        addr += SECTOR as u32;
    }
    if len > 0 {
        out.push((lba, len as u16));
    }
    out
}

/// `syslinux_make_bootsect` for FAT: SYSLINUX's jump and OEM name, and its code after the FAT32
/// extended BPB; the volume's own BPB stays.
pub fn merge_bootsect(vbr: &mut [u8], patched: &[u8]) {
    vbr[..11].copy_from_slice(&patched[..11]);
    vbr[90..510].copy_from_slice(&patched[90..510]);
}

/// Sets LegacyBIOSBootable on the GPT entry of type ESP in both GPT copies, fixing their CRCs.
/// Returns the ESP's first LBA. `disk` is the whole image.
fn mark_esp(disk: &mut File) -> Result<u64> {
    let len = disk.metadata()?.len();
    let primary = read_at(disk, 512, 512)?;
    if &primary[..8] != b"EFI PART" {
        return Err(Error::new("no GPT on the disk (LBA 1 is not \"EFI PART\")")
            .hint("BIOS boot needs a raw GPT disk image with an ESP; convert a qcow2 with qemu-img first"));
    }
    let backup_lba = get64(&primary, 32);
    let mut esp_start = None;
    for hdr_lba in [1u64, backup_lba] {
        if hdr_lba.saturating_mul(512) + 512 > len {
            return Err(Error::new("the backup GPT header lies past the end of the disk"));
        }
        let mut hdr = read_at(disk, hdr_lba * 512, 512)?;
        if &hdr[..8] != b"EFI PART" {
            return Err(Error::new(format!("no GPT header at LBA {hdr_lba}")));
        }
        let hsize = get32(&hdr, 12) as usize;
        let (ent_lba, n, esz) = (get64(&hdr, 72), get32(&hdr, 80) as usize, get32(&hdr, 84) as usize);
        if !(92..=512).contains(&hsize) || esz < 128 || n > 4096 {
            return Err(Error::new(format!("GPT header at LBA {hdr_lba} is malformed")));
        }
        let mut ents = read_at(disk, ent_lba * 512, n * esz)?;
        let idx = (0..n).find(|&i| ents[i * esz..i * esz + 16] == ESP_TYPE).ok_or_else(|| {
            Error::new("the GPT has no EFI System Partition").hint("BIOS boot reads the kernels from the ESP")
        })?;
        let e = idx * esz;
        esp_start.get_or_insert(get64(&ents, e + 32));
        let attrs = get64(&ents, e + 48);
        if attrs & LEGACY_BIOS_BOOTABLE != 0 {
            continue;
        }
        put64(&mut ents, e + 48, attrs | LEGACY_BIOS_BOOTABLE);
        put32(&mut hdr, 88, crc32fast::hash(&ents));
        put32(&mut hdr, 16, 0);
        let crc = crc32fast::hash(&hdr[..hsize]);
        put32(&mut hdr, 16, crc);
        write_at(disk, ent_lba * 512, &ents)?;
        write_at(disk, hdr_lba * 512, &hdr)?;
    }
    esp_start.ok_or_else(|| Error::new("the GPT has no EFI System Partition"))
}

fn read_at(f: &mut File, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf).map_err(|e| Error::new(format!("reading the disk at byte {off}: {e}")))?;
    Ok(buf)
}

fn write_at(f: &mut File, off: u64, data: &[u8]) -> Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.write_all(data).map_err(|e| Error::new(format!("writing the disk at byte {off}: {e}")))
}

/// Makes a GPT disk image BIOS-bootable from its ESP, with the same result as
/// `syslinux --install --offset <ESP> disk` + `dd if=gptmbr.bin of=disk bs=440 count=1` +
/// `sfdisk --part-attrs disk <ESP> LegacyBIOSBootable`.
///
/// The ESP must already hold a FAT16/FAT32 filesystem. Its hidden-sectors field is left as it is, as
/// the real installer leaves it: gptmbr.bin hands SYSLINUX's boot sector the partition's start
/// (mkfs.vfat --offset leaves the field 0 on an image file, and that boots). Writes `/ldlinux.sys` and `/ldlinux.c32` (mtools, like the real
/// installer; `epoch` is handed to mcopy as SOURCE_DATE_EPOCH so the image stays reproducible),
/// patches them in place, merges SYSLINUX's boot sector into the ESP's, puts gptmbr.bin into the MBR
/// and marks the ESP LegacyBIOSBootable. The configuration, `/syslinux.cfg`, is `bootloader::render`'s.
pub fn install(disk: &mut File, files: &BiosFiles, epoch: Option<u64>) -> Result<()> {
    let esp_lba = mark_esp(disk)?;
    let base = esp_lba * 512;
    let mut vbr = read_at(disk, base, SECTOR)?;
    let fat = parse_fat(&vbr).map_err(|e| Error::new(format!("ESP: {e}")))?;
    let img = format!("/proc/{}/fd/{}@@{}", std::process::id(), disk.as_raw_fd(), base);
    let mtools = |args: &[&str], stdin: Option<&[u8]>| -> Result<bool> {
        let mut c = Command::new(args[0]);
        c.args(&args[1..])
            .env("MTOOLSRC", "/dev/null")
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("MTOOLS_FAT_COMPATIBILITY", "1")
            .env("TZ", "UTC")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = epoch {
            c.env("SOURCE_DATE_EPOCH", t.to_string());
        }
        let mut child = c.spawn().map_err(|e| {
            Error::new(format!("cannot run {}: {e}", args[0])).hint("install mtools (Debian: mtools; nixpkgs: mtools)")
        })?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data).map_err(|e| Error::new(format!("{}: {e}", args[0])))?;
        }
        let out = child.wait_with_output()?;
        Ok(out.status.success())
    };
    let put = |name: &str, data: &[u8]| -> Result<()> {
        let dest = format!("::/{name}");
        // Fails harmlessly when the file is not there yet, as in syslinux's installer.
        mtools(&["mattrib", "-i", &img, "-h", "-r", "-s", &dest], None)?;
        if !mtools(&["mcopy", "-i", &img, "-D", "o", "-D", "O", "-o", "-", &dest], Some(data))? {
            return Err(Error::new(format!("ESP: mcopy could not write {name}")).hint("is the ESP full?"));
        }
        Ok(())
    };
    let mut ldlinux = files.ldlinux_sys();
    put("ldlinux.sys", &ldlinux)?;
    ldlinux.truncate(files.ldlinux.len());
    let want = files.ldlinux.len().div_ceil(SECTOR) + 2;
    let mut win = Window { file: disk, base };
    let sectors = ldlinux_sectors(&mut win, &fat, want).map_err(|e| Error::new(format!("ESP: {e}")))?;
    let mut bootsect = files.bootsect.clone();
    patch(&mut ldlinux, &mut bootsect, &sectors).map_err(|e| Error::new(format!("syslinux: {e}")))?;
    for (i, chunk) in ldlinux.chunks(SECTOR).enumerate() {
        // The real installer writes whole sectors from its zero-padded array.
        let mut s = chunk.to_vec();
        s.resize(SECTOR, 0);
        write_at(disk, base + sectors[i] * 512, &s)?;
    }
    mtools(&["mattrib", "-i", &img, "+r", "+h", "+s", "::/ldlinux.sys"], None)?;
    put("ldlinux.c32", &files.ldlinux_c32)?;
    mtools(&["mattrib", "-i", &img, "+r", "+h", "+s", "::/ldlinux.c32"], None)?;
    vbr = read_at(disk, base, SECTOR)?;
    merge_bootsect(&mut vbr, &bootsect);
    write_at(disk, base, &vbr)?;
    write_at(disk, 0, &files.gptmbr)?;
    disk.sync_data()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_adv_checksums_to_magic2() {
        let adv = empty_adv();
        assert_eq!(adv.len(), 1024);
        assert_eq!(adv[..512], adv[512..]);
        let sum = (4..508).step_by(4).fold(0u32, |a, i| a.wrapping_add(get32(&adv, i)));
        assert_eq!(sum, ADV_MAGIC2);
        assert_eq!(get32(&adv, 508), ADV_MAGIC3);
    }

    #[test]
    fn extents_split_on_gaps_and_64k() {
        let s: Vec<u64> = (100..300).collect();
        let ex = extents(&s);
        // A run stays under 64 KiB (127 sectors); a sector never straddles a 64 KiB boundary of
        // the load address, which sector-aligned loads from 0x8000 never do.
        assert_eq!(ex[0], (100, 127));
        assert_eq!(ex[1], (227, 73));
        assert_eq!(ex.iter().map(|e| u64::from(e.1)).sum::<u64>(), 200);
        assert_eq!(extents(&[5, 6, 9, 10]), vec![(5, 2), (9, 2)]);
    }

    #[test]
    fn patch_refuses_a_short_sector_map() {
        let mut ld = vec![0u8; 2048];
        let mut bs = vec![0u8; 512];
        assert!(patch(&mut ld, &mut bs, &[1, 2, 3]).unwrap_err().contains("needs 6 sectors"));
        assert!(patch(&mut ld, &mut bs, &[1, 2, 3, 4, 5, 6]).unwrap_err().contains("patch area"));
    }

    #[test]
    fn fat12_and_garbage_are_refused() {
        assert!(parse_fat(&[0u8; 512]).unwrap_err().contains("55 AA"));
        let mut bs = vec![0u8; 512];
        bs[510] = 0x55;
        bs[511] = 0xaa;
        put16(&mut bs, 11, 512);
        bs[13] = 1;
        put16(&mut bs, 14, 1);
        bs[16] = 2;
        put16(&mut bs, 17, 224);
        put16(&mut bs, 19, 2880);
        put16(&mut bs, 22, 9);
        assert!(parse_fat(&bs).unwrap_err().contains("FAT12"));
    }

    #[test]
    fn shapes_without_confirming_constants_are_refused() {
        let mut bin = vec![0u8; 8192];
        bin[512..523].copy_from_slice(b"\xeb\x58\x90SYSLINUX");
        bin[1022] = 0x55;
        bin[1023] = 0xaa;
        bin[1024..1035].copy_from_slice(b"\r\nSYSLINUX ");
        put32(&mut bin, 1048, LDLINUX_MAGIC);
        bin[1500] = 1;
        bin[4096..4103].copy_from_slice(b"\x7fELF\x01\x01\x01");
        assert!(by_shape(&bin).unwrap_err().contains("not confirmed"));
    }

    #[test]
    fn symbols_and_shapes_find_the_same_bytes() {
        // Debian's installer is stripped (found by shape); the same arrays in an object that keeps
        // its symbols, as nixpkgs' `strip -S` leaves bin/.syslinux-wrapped, must read back the same.
        let bin = std::fs::read("/usr/bin/syslinux").expect("/usr/bin/syslinux: install the Debian package syslinux");
        assert_eq!(by_symbols(&bin).unwrap(), None, "Debian's installer was expected to be stripped");
        let (bs, ld, c32) = by_shape(&bin).unwrap();
        assert_eq!((bs.len(), ld.len() % SECTOR), (SECTOR, 0));
        assert_eq!(&c32[..4], b"\x7fELF");
        let dir = std::env::temp_dir().join(format!("nixqimg-bios-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = String::new();
        for (name, data) in [("syslinux_bootsect", &bs), ("syslinux_ldlinux", &ld), ("syslinux_ldlinuxc32", &c32)] {
            let bytes: Vec<String> = data.iter().map(|b| b.to_string()).collect();
            c.push_str(&format!(
                "unsigned char {name}[] = {{{}}};\nconst unsigned int {name}_len = {};\nconst int {name}_mtime = 0;\n",
                bytes.join(","),
                data.len()
            ));
        }
        std::fs::write(dir.join("arrays.c"), c).unwrap();
        let st = Command::new("cc").arg("-c").arg(dir.join("arrays.c")).arg("-o").arg(dir.join("arrays.o")).status();
        assert!(st.expect("cc: install gcc").success());
        let obj = std::fs::read(dir.join("arrays.o")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(by_symbols(&obj).unwrap(), Some((bs.clone(), ld.clone(), c32.clone())));

        // The same arrays laid out by a build without bin2c's mtimes are found by shape too.
        let mut blob = vec![0u8; 64];
        for n in [SECTOR, ld.len(), c32.len()] {
            blob.extend_from_slice(&(n as u32).to_le_bytes());
        }
        blob.resize(1024, 0);
        for part in [&bs, &ld, &c32] {
            blob.extend_from_slice(part);
        }
        assert_eq!(by_shape(&blob).unwrap(), (bs, ld, c32));
    }
}
