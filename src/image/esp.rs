//! The EFI system partition, laid out the way NixOS's systemd-boot-builder.py (plus `bootctl install`)
//! lays it out, so `nixos-rebuild boot` inside the machine finds its own layout and takes over:
//! systemd-boot as `EFI/BOOT/BOOT<ARCH>.EFI` and `EFI/systemd/systemd-boot<arch>.efi`, kernel and initrd as
//! `EFI/nixos/<store dir>-<file>.efi`, `loader/loader.conf` and `loader/entries/nixos-generation-1.conf`.
//! `plan` is pure; `write` formats FAT32 into the image with the fatfs crate (fixed volume id, and no
//! clock: fatfs without chrono stamps every entry 1980-01-01, so the bytes do not depend on the time).

use super::bootspec::Bootspec;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Copy(PathBuf),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspPlan {
    pub dirs: Vec<&'static str>,
    pub files: Vec<(String, Content)>,
    /// ESP paths of the kernel and initrd, as the entry names them (a BIOS loader reads the same files).
    pub kernel: String,
    pub initrd: String,
    /// The kernel command line of the entry (`init=... kernelParams`).
    pub options: String,
}

/// UEFI's names for an architecture (removable-media path suffix, systemd-boot's file suffix).
pub fn efi_names(arch_name: &str) -> Option<(&'static str, &'static str)> {
    match arch_name {
        "x86_64" => Some(("X64", "x64")),
        "aarch64" => Some(("AA64", "aa64")),
        _ => None,
    }
}

/// `EFI/nixos/<store dir>-<file name>.efi` for a (resolved) store file, as copy_from_file names it.
pub fn nixos_name(store_dir: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(store_dir).ok()?;
    let subdir = rel.components().next()?.as_os_str().to_str()?;
    let name = file.file_name()?.to_str()?;
    Some(if name == subdir { format!("EFI/nixos/{name}.efi") } else { format!("EFI/nixos/{subdir}-{name}.efi") })
}

/// `YYYY-MM-DD` (UTC) of a Unix time, for the entry's "built on" (NixOS takes the profile's ctime).
pub fn date(secs: u64) -> String {
    let z = (secs / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

pub struct PlanInput<'a> {
    pub spec: &'a Bootspec,
    pub store_dir: &'a Path,
    /// Resolved (symlink-free) kernel and initrd store files.
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub systemd_boot: &'a Path,
    pub arch_name: &'a str,
    pub timeout: u32,
    pub build_time: u64,
}

pub fn plan(i: &PlanInput) -> std::result::Result<EspPlan, String> {
    let (upper, lower) = efi_names(i.arch_name).ok_or_else(|| format!("no UEFI boot for {}", i.arch_name))?;
    let name = |f: &Path| {
        nixos_name(i.store_dir, f).ok_or_else(|| format!("{} is not a file in {}", f.display(), i.store_dir.display()))
    };
    let kernel = name(i.kernel)?;
    let initrd = name(i.initrd)?;
    let mut options = format!("init={}", i.spec.init.display());
    for p in &i.spec.kernel_params {
        options.push(' ');
        options.push_str(p);
    }
    let entry = format!(
        "title NixOS\nsort-key {}\nversion Generation 1 {}, built on {}\nlinux /{kernel}\ninitrd /{initrd}\noptions {options}\n",
        i.spec.sort_key,
        i.spec.label,
        date(i.build_time)
    );
    let loader = format!("timeout {}\ndefault nixos-generation-1.conf\nconsole-mode keep\n", i.timeout);
    let sd = i.systemd_boot.to_path_buf();
    Ok(EspPlan {
        dirs: vec!["EFI", "EFI/BOOT", "EFI/systemd", "EFI/Linux", "EFI/nixos", "loader", "loader/entries"],
        files: vec![
            (format!("EFI/BOOT/BOOT{upper}.EFI"), Content::Copy(sd.clone())),
            (format!("EFI/systemd/systemd-boot{lower}.efi"), Content::Copy(sd)),
            (kernel.clone(), Content::Copy(i.kernel.to_path_buf())),
            (initrd.clone(), Content::Copy(i.initrd.to_path_buf())),
            ("loader/entries.srel".into(), Content::Text("type1\n".into())),
            ("loader/loader.conf".into(), Content::Text(loader)),
            ("loader/entries/nixos-generation-1.conf".into(), Content::Text(entry)),
        ],
        kernel,
        initrd,
        options,
    })
}

/// FAT's first representable instant, 1980-01-01 00:00: entries carry no build time (fatfs without
/// chrono would write the invalid date 1980-00-00).
#[derive(Debug)]
pub(crate) struct Epoch1980;

impl fatfs::TimeProvider for Epoch1980 {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date { year: 1980, month: 1, day: 1 }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime { date: self.get_current_date(), time: fatfs::Time { hour: 0, min: 0, sec: 0, millis: 0 } }
    }
}

pub(crate) static EPOCH_1980: Epoch1980 = Epoch1980;

/// The same instant as a Unix time, for tools that stamp FAT entries themselves (mtools).
pub const FAT_EPOCH: u64 = 315_532_800;

/// A window of the image file that fatfs sees as the whole volume.
struct Slice<'a> {
    file: &'a File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.len.saturating_sub(self.pos) as usize);
        let n = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Slice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write past the end of the ESP"));
        }
        let n = self.file.write_at(buf, self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek outside the ESP"))?;
        Ok(self.pos)
    }
}

/// Formats the ESP at `offset` in `image` and fills it.
pub fn write(image: &File, offset: u64, size: u64, volume_id: u32, plan: &EspPlan) -> Result<()> {
    let fail = |e: io::Error| Error::new(format!("cannot write the ESP: {e}"));
    let opts = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .volume_id(volume_id)
        .volume_label(*b"ESP        ");
    fatfs::format_volume(Slice { file: image, start: offset, len: size, pos: 0 }, opts)
        .map_err(|e| fail(e).hint("FAT32 needs an ESP of at least 64M (--esp-size)"))?;
    let fs = fatfs::FileSystem::new(
        Slice { file: image, start: offset, len: size, pos: 0 },
        fatfs::FsOptions::new().time_provider(&EPOCH_1980),
    )
    .map_err(fail)?;
    let root = fs.root_dir();
    for d in &plan.dirs {
        root.create_dir(d).map_err(fail)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    for (dest, content) in &plan.files {
        let mut f = root.create_file(dest).map_err(|e| Error::new(format!("ESP {dest}: {e}")))?;
        f.truncate().map_err(fail)?;
        match content {
            Content::Text(t) => f.write_all(t.as_bytes()).map_err(fail)?,
            Content::Copy(src) => {
                let mut s = File::open(src).map_err(|e| Error::io(src, e))?;
                loop {
                    let n = s.read(&mut buf).map_err(|e| Error::io(src, e))?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n]).map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero | io::ErrorKind::Other => {
                            Error::new(format!("ESP {dest}: {e}")).hint("the ESP is full: give a larger --esp-size")
                        }
                        _ => fail(e),
                    })?;
                }
            }
        }
        f.flush().map_err(fail)?;
    }
    drop(root);
    fs.unmount().map_err(fail)
}

/// Records the partition's start in the FAT's "hidden sectors" (as `mkfs.vfat --offset` does; fatfs
/// writes 0), in the boot sector and its FAT32 backup: BIOS boot code adds it to find its own sectors.
pub fn set_hidden_sectors(image: &File, offset: u64) -> Result<()> {
    let fail = |e: io::Error| Error::new(format!("cannot write the ESP's boot sector: {e}"));
    let lba = u32::try_from(offset / 512).map_err(|_| Error::new("the ESP starts beyond 2 TiB"))?;
    let mut bpb = [0u8; 52];
    image.read_exact_at(&mut bpb, offset).map_err(fail)?;
    let backup = u64::from(u16::from_le_bytes([bpb[50], bpb[51]]));
    for sector in [0, backup] {
        image.write_all_at(&lba.to_le_bytes(), offset + sector * 512 + 28).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Bootspec {
        super::super::bootspec::parse(
            r#"{"org.nixos.bootspec.v1": {"system": "x86_64-linux", "init": "/nix/store/t-sys/init",
            "initrd": "/nix/store/i-initrd/initrd", "kernel": "/nix/store/k-linux/bzImage",
            "kernelParams": ["console=ttyS0", "quiet"], "label": "NixOS 24.05", "toplevel": "/nix/store/t-sys"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn layout_and_entry_as_nixos_writes_them() {
        let s = spec();
        let p = plan(&PlanInput {
            spec: &s,
            store_dir: Path::new("/nix/store"),
            kernel: Path::new("/nix/store/k-linux/bzImage"),
            initrd: Path::new("/nix/store/i-initrd/initrd"),
            systemd_boot: Path::new("/nix/store/s-systemd/lib/systemd/boot/efi/systemd-bootx64.efi"),
            arch_name: "x86_64",
            timeout: 5,
            build_time: 1_700_000_000,
        })
        .unwrap();
        let names: Vec<&str> = p.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "EFI/BOOT/BOOTX64.EFI",
                "EFI/systemd/systemd-bootx64.efi",
                "EFI/nixos/k-linux-bzImage.efi",
                "EFI/nixos/i-initrd-initrd.efi",
                "loader/entries.srel",
                "loader/loader.conf",
                "loader/entries/nixos-generation-1.conf"
            ]
        );
        let entry = match &p.files[6].1 {
            Content::Text(t) => t.clone(),
            c => panic!("{c:?}"),
        };
        assert_eq!(
            entry,
            "title NixOS\nsort-key nixos\nversion Generation 1 NixOS 24.05, built on 2023-11-14\n\
             linux /EFI/nixos/k-linux-bzImage.efi\ninitrd /EFI/nixos/i-initrd-initrd.efi\n\
             options init=/nix/store/t-sys/init console=ttyS0 quiet\n"
        );
        assert_eq!(
            p.files[5].1,
            Content::Text("timeout 5\ndefault nixos-generation-1.conf\nconsole-mode keep\n".into())
        );
    }

    #[test]
    fn aarch64_names_and_unknown_arches() {
        assert_eq!(efi_names("aarch64"), Some(("AA64", "aa64")));
        assert_eq!(efi_names("riscv64"), None);
    }

    #[test]
    fn a_store_path_that_is_the_file_keeps_its_name() {
        let s = Path::new("/nix/store");
        assert_eq!(nixos_name(s, Path::new("/nix/store/abc-initrd")).unwrap(), "EFI/nixos/abc-initrd.efi");
        assert_eq!(
            nixos_name(s, Path::new("/nix/store/abc-linux/boot/Image")).unwrap(),
            "EFI/nixos/abc-linux-Image.efi"
        );
        assert_eq!(nixos_name(s, Path::new("/elsewhere/x")), None);
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_700_000_000), "2023-11-14");
    }
}
