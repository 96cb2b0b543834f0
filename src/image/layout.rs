//! Where everything goes on the disk: the GPT (ESP first, root last so a cloud's growpart can extend
//! it), MiB-aligned partitions, the root filesystem's size and inode count. Pure; sfdisk writes the table.

use super::ids::Ids;

pub const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The ESP's type GUID (UEFI spec) and "Linux filesystem data" (what make-disk-image uses for root).
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub disk: u64,
    pub esp_offset: u64,
    pub esp_size: u64,
    pub root_offset: u64,
    pub root_size: u64,
}

/// 1 MiB before the ESP (protective MBR, primary GPT, room for a BIOS loader's core) and 1 MiB after
/// root (backup GPT), as sfdisk and parted align by default.
pub fn layout(esp_size: u64, root_size: u64) -> Layout {
    let esp_size = round_up(esp_size, MIB);
    let root_size = round_up(root_size, MIB);
    Layout { disk: MIB + esp_size + root_size + MIB, esp_offset: MIB, esp_size, root_offset: MIB + esp_size, root_size }
}

/// The layout for a disk of a given size, or why it cannot hold `need` bytes of root filesystem.
pub fn for_disk(disk: u64, esp_size: u64, need: u64) -> Result<Layout, String> {
    let esp_size = round_up(esp_size, MIB);
    let disk = disk / MIB * MIB;
    let root = disk.saturating_sub(esp_size + 2 * MIB);
    if root < need {
        return Err(format!(
            "--size {} is too small: the ESP takes {} and the root filesystem needs at least {}",
            human(disk),
            human(esp_size),
            human(round_up(need, MIB))
        ));
    }
    Ok(layout(esp_size, root))
}

/// The sfdisk script for the layout; `legacy_bios_bootable` sets the ESP attribute that gptmbr-style
/// BIOS boot code looks for.
pub fn sfdisk_script(l: &Layout, ids: &Ids, legacy_bios_bootable: bool) -> String {
    let attrs = if legacy_bios_bootable { ", attrs=\"LegacyBIOSBootable\"" } else { "" };
    format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nsector-size: 512\n\
         start={}, size={}, type={ESP_TYPE}, uuid={}, name=\"ESP\"{attrs}\n\
         start={}, size={}, type={LINUX_TYPE}, uuid={}, name=\"nixos\"\n",
        ids.disk.to_uppercase(),
        l.esp_offset / SECTOR,
        l.esp_size / SECTOR,
        ids.esp_part.to_uppercase(),
        l.root_offset / SECTOR,
        l.root_size / SECTOR,
        ids.root_part.to_uppercase(),
    )
}

/// Root filesystem size and inode count for staged content of `data` bytes (each file rounded up to a
/// block) in `inodes` inodes: room for ext4's metadata and journal, a margin, and an inode ratio no
/// sparser than 1 per 16 KiB so the filesystem keeps enough inodes when the cloud grows it.
pub fn root_estimate(data: u64, inodes: u64) -> (u64, u64) {
    let want_inodes = inodes + inodes / 4 + 2048;
    let journal = 64 * MIB;
    let mut size = data + data / 10 + journal + 32 * MIB;
    for _ in 0..3 {
        let n = want_inodes.max(size / 16384);
        size = data + data / 10 + journal + 32 * MIB + n * 256 + size / 64;
    }
    let size = round_up(size, MIB);
    (size, want_inodes.max(size / 16384))
}

pub fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// `8G`, `512M`, `1T`, `100K` or a byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult).filter(|&n| n > 0)
}

pub fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", b.div_ceil(MIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_mib_aligned_and_root_is_last() {
        let l = layout(256 * MIB, 1000 * MIB + 1);
        assert_eq!(l.esp_offset, MIB);
        assert_eq!(l.root_offset, 257 * MIB);
        assert_eq!(l.root_size, 1001 * MIB);
        assert_eq!(l.disk, l.root_offset + l.root_size + MIB);
    }

    #[test]
    fn a_fixed_disk_size_must_hold_the_root() {
        let l = for_disk(8 << 30, 256 * MIB, 100 * MIB).unwrap();
        assert_eq!(l.disk, 8 << 30);
        assert_eq!(l.root_offset + l.root_size + MIB, 8 << 30);
        let e = for_disk(300 * MIB, 256 * MIB, 100 * MIB).unwrap_err();
        assert!(e.contains("too small") && e.contains("100 MiB"), "{e}");
    }

    #[test]
    fn script_carries_ids_and_bios_attribute() {
        let ids = super::super::ids::derive("x");
        let s = sfdisk_script(&layout(64 * MIB, 64 * MIB), &ids, true);
        assert!(s.contains(&format!("label-id: {}", ids.disk.to_uppercase())));
        assert!(s.contains("start=2048, size=131072, type=C12A7328"));
        assert!(s.contains("attrs=\"LegacyBIOSBootable\""));
        assert!(!sfdisk_script(&layout(64 * MIB, 64 * MIB), &ids, false).contains("attrs"));
    }

    #[test]
    fn estimate_leaves_room_and_inodes() {
        let (size, n) = root_estimate(1 << 30, 50_000);
        assert!(size > (1 << 30) + (1 << 30) / 10 && size < 2 << 30, "{size}");
        assert!(n >= 62_500 && n >= size / 16384, "{n}");
        assert_eq!(size % MIB, 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
