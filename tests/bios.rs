//! BIOS boot: `nixqimg bootloader install` (SYSLINUX from the target package's bytes, installed by
//! nixqimg's own code) leaves exactly the bytes the real `syslinux --install --offset` + gptmbr.bin +
//! `sfdisk --part-attrs ... LegacyBIOSBootable` leave, and the result boots under SeaBIOS; a second
//! generation added on the image file with mtools and `bios-sync.sh` boots with its own parameters.

mod bios_support;
#[macro_use]
mod boot_support;

use bios_support::*;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// One VM at a time: the machine has two cores shared by everyone.
static VM: Mutex<()> = Mutex::new(());

fn tmp_path(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("bios").join(rel)
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    let diff: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).take(8).collect();
    assert!(diff.is_empty(), "{} and {} differ at bytes {diff:?}", a.display(), b.display());
}

/// Both installers on copies of one blank disk, then byte for byte.
fn compare(name: &str, disk_mib: u64, esp_sectors: u64, fat: u32, prepare: impl Fn(&Path)) {
    let dir = tmp(name);
    let base = dir.join("base.img");
    blank_disk(&base, disk_mib, esp_sectors, fat);
    prepare(&base);
    let (real, ours) = (dir.join("real.img"), dir.join("nixqimg.img"));
    std::fs::copy(&base, &real).unwrap();
    std::fs::copy(&base, &ours).unwrap();
    real_syslinux_install(&real);
    nixqimg_install(&ours);
    same_bytes(&real, &ours);
    // And the installer changed something: the comparison is not of two untouched copies.
    assert_ne!(std::fs::read(&base).unwrap(), std::fs::read(&ours).unwrap());
    // Installing again over an installed ESP (a repaired or updated image) also matches.
    real_syslinux_install(&real);
    nixqimg_install(&ours);
    same_bytes(&real, &ours);
    if name != "fragmented" {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn install_matches_syslinux_on_fat32() {
    compare("fat32", 80, 131072, 32, |_| {});
}

#[test]
fn install_matches_syslinux_on_fat16() {
    compare("fat16", 40, 65536, 16, |_| {});
}

#[test]
fn install_matches_syslinux_when_ldlinux_sys_is_fragmented() {
    // A full FAT with holes between files: ldlinux.sys can only land in pieces, so the sector
    // extents, the first-sector pointer and the ADV pointers are not one run.
    compare("fragmented", 40, 65536, 16, |img| {
        let dir = img.parent().unwrap();
        let put = |name: &str, len: usize| {
            let f = dir.join(name);
            std::fs::write(&f, vec![0x5a; len]).unwrap();
            run(Command::new("mcopy")
                .env("SOURCE_DATE_EPOCH", EPOCH)
                .arg("-i")
                .arg(mtools_img(img))
                .arg(&f)
                .arg("::/"));
        };
        for i in 0..12 {
            put(&format!("f{i}"), 40_000 + 512 * i);
        }
        let listing = run(Command::new("mdir").arg("-i").arg(mtools_img(img)).arg("::/"));
        let free_line = listing.lines().find(|l| l.contains("bytes free")).expect("mdir printed no free space");
        let free: usize = free_line.chars().filter(char::is_ascii_digit).collect::<String>().parse().unwrap();
        put("filler", free);
        for i in (1..12).step_by(2) {
            run(Command::new("mdel").arg("-i").arg(mtools_img(img)).arg(format!("::/f{i}")));
        }
    });
    let shown = run(Command::new("mshowfat")
        .arg("-i")
        .arg(mtools_img(&tmp_path("fragmented/nixqimg.img")))
        .arg("::/ldlinux.sys"));
    assert!(shown.matches('<').count() > 1, "ldlinux.sys is in one piece, the case tests nothing: {shown}");
    let _ = std::fs::remove_dir_all(tmp_path("fragmented"));
}

#[test]
fn install_refuses_what_it_cannot_boot() {
    let dir = tmp("refusals");
    let img = dir.join("nogpt.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let out = nixqimg().args(["bootloader", "install", "--syslinux", "/", "--disk"]).arg(&img).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no GPT") && err.lines().count() == 1, "{err}");

    let out =
        nixqimg().args(["bootloader", "install", "--syslinux"]).arg(&dir).arg("--disk").arg(&img).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no syslinux installer binary") && err.contains("syslinux-common"), "{err}");
}

/// Copies files into the image's ESP with mtools (no mounts), overwriting.
fn mcopy_in(img: &Path, from: &Path, to: &str) {
    run(Command::new("mcopy").args(["-o", "-s", "-i"]).arg(mtools_img(img)).arg(from).arg(to));
}

#[test]
fn seabios_boots_generation_1_then_generation_2_added_by_bios_sync_sh() {
    let dir = tmp("boot");
    let img = dir.join("disk.img");
    blank_disk(&img, 96, 147456, 32);

    // The ESP as NixOS's systemd-boot installer lays it out, then `nixqimg bootloader sync`.
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("EFI/nixos")).unwrap();
    std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
    std::fs::copy(kernel(), esp.join("EFI/nixos/k1-linux-bzImage.efi")).unwrap();
    std::fs::copy(initramfs(&dir, "gen1"), esp.join("EFI/nixos/i1-initrd.efi")).unwrap();
    std::fs::write(esp.join("loader/loader.conf"), "timeout 0\ndefault nixos-generation-1.conf\n").unwrap();
    std::fs::write(
        esp.join("loader/entries/nixos-generation-1.conf"),
        "title NixOS\nversion Generation 1\nlinux /EFI/nixos/k1-linux-bzImage.efi\ninitrd /EFI/nixos/i1-initrd.efi\n\
         options console=ttyS0,115200 panic=-1 nixqimg.gen=1 nixqimg.q=\"two words\"\n",
    )
    .unwrap();
    run(nixqimg().args(["bootloader", "sync", "--esp"]).arg(&esp));
    for part in ["EFI", "loader", "syslinux.cfg"] {
        mcopy_in(&img, &esp.join(part), "::/");
    }
    nixqimg_install(&img);

    let one = VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = boot_bios(&img, Duration::from_secs(150));
    drop(one);
    assert!(log.contains("SYSLINUX"), "no SYSLINUX banner on the serial console:\n{log}");
    let m = marker(&log, "gen1");
    assert!(m.contains(" nixqimg.gen=1 nixqimg.q=\"two words\""), "{m}");
    assert!(m.contains("BOOT_IMAGE=/EFI/nixos/k1-linux-bzImage.efi"), "{m}");
    eprintln!("boot 1: {m}");

    // nixos-rebuild on the machine: generation 2 written into the ESP, then extraInstallCommands runs
    // bios-sync.sh. Here on the image file: mtools out, the script, mtools back in.
    let esp2 = dir.join("esp2");
    std::fs::create_dir_all(&esp2).unwrap();
    run(Command::new("mcopy").args(["-s", "-i"]).arg(mtools_img(&img)).args(["::/loader", "::/EFI"]).arg(&esp2));
    std::fs::copy(kernel(), esp2.join("EFI/nixos/k2-linux-bzImage.efi")).unwrap();
    std::fs::copy(initramfs(&dir, "gen2"), esp2.join("EFI/nixos/i2-initrd.efi")).unwrap();
    std::fs::write(
        esp2.join("loader/entries/nixos-generation-2.conf"),
        "title NixOS\nversion Generation 2\nlinux /EFI/nixos/k2-linux-bzImage.efi\ninitrd /EFI/nixos/i2-initrd.efi\n\
         options console=ttyS0,115200 panic=-1 nixqimg.gen=2 nixqimg.q='it''s \"quoted\"'\n",
    )
    .unwrap();
    std::fs::write(esp2.join("loader/loader.conf"), "timeout 0\ndefault nixos-generation-2.conf\n").unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/bios-sync.sh");
    run(Command::new("sh").arg(&script).arg(&esp2));
    let cfg = std::fs::read_to_string(esp2.join("syslinux.cfg")).unwrap();
    assert!(cfg.contains("DEFAULT nixos-generation-2\n") && cfg.contains("LABEL nixos-generation-1\n"), "{cfg}");
    for part in ["EFI", "loader", "syslinux.cfg"] {
        mcopy_in(&img, &esp2.join(part), "::/");
    }

    let one = VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = boot_bios(&img, Duration::from_secs(150));
    drop(one);
    let m = marker(&log, "gen2");
    assert!(m.contains(" nixqimg.gen=2 nixqimg.q='it''s \"quoted\"'"), "{m}");
    assert!(m.contains("BOOT_IMAGE=/EFI/nixos/k2-linux-bzImage.efi"), "{m}");
    eprintln!("boot 2: {m}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `nixqimg run IMAGE --firmware bios`: the whole console output (the fixture's marker included).
fn run_bios(img: &Path) -> String {
    let _one = VM.lock().unwrap_or_else(|e| e.into_inner());
    let (code, out, err) = boot_support::nixqimg(&args![
        "run",
        img,
        "--firmware",
        "bios",
        "--accel",
        "tcg",
        "--snapshot",
        "--until",
        "NIXQIMG-BOOT-",
        "--timeout",
        "240",
    ]);
    assert_eq!(code, 0, "nixqimg run failed:\n{out}\n{err}");
    out
}

#[test]
fn hybrid_image_boots_a_generation_added_later_under_seabios() {
    // issue 6, item 3: the image `nixqimg image` makes, booted under SeaBIOS; then what nixos-rebuild
    // does to the ESP (a second entry, the default moved) plus the sync, on the image file with
    // mtools; the next BIOS boot runs generation 2 with its own kernel parameters.
    let toplevel = boot_support::system("x86_64");
    let dir = tmp("hybrid");
    let img = dir.join("nixos.raw");
    let (code, out, err) = boot_support::nixqimg(&args![
        "image",
        "--toplevel",
        toplevel,
        "--out",
        img,
        "--format",
        "raw",
        "--boot",
        "hybrid",
        "--timeout",
        "0",
    ]);
    assert_eq!(code, 0, "nixqimg image failed:\n{out}{err}");

    let bios_ok = "NIXQIMG-BOOT-OK arch=x86_64 firmware=bios ";
    let log = run_bios(&img);
    assert!(log.contains("SYSLINUX 6."), "no SYSLINUX banner on the serial console:\n{log}");
    let m = boot_support::marker(&log);
    eprintln!("generation 1: {m}");
    assert!(m.starts_with(bios_ok), "{m}");
    assert!(!log.contains("nixqimg.gen=2"), "{log}");

    let esp = dir.join("esp");
    std::fs::create_dir_all(&esp).unwrap();
    run(Command::new("mcopy").args(["-s", "-i"]).arg(mtools_img(&img)).args(["::/loader", "::/EFI"]).arg(&esp));
    let gen1 = std::fs::read_to_string(esp.join("loader/entries/nixos-generation-1.conf")).unwrap();
    let gen2: String = gen1
        .lines()
        .map(|l| match l.split_once(' ') {
            Some(("options", o)) => format!("options {o} ignore_loglevel nixqimg.gen=2 nixqimg.q=\"a b\"\n"),
            Some(("version", v)) => format!("version {}\n", v.replace("Generation 1", "Generation 2")),
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(gen2.contains("nixqimg.gen=2"), "no options line in generation 1's entry:\n{gen1}");
    std::fs::write(esp.join("loader/entries/nixos-generation-2.conf"), &gen2).unwrap();
    let conf = std::fs::read_to_string(esp.join("loader/loader.conf")).unwrap();
    let conf: String =
        conf.lines()
            .map(|l| {
                if l.starts_with("default ") {
                    "default nixos-generation-2.conf\n".to_string()
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
    std::fs::write(esp.join("loader/loader.conf"), conf).unwrap();
    run(nixqimg().args(["bootloader", "sync", "--esp"]).arg(&esp));
    let cfg = std::fs::read_to_string(esp.join("syslinux.cfg")).unwrap();
    assert!(cfg.contains("DEFAULT nixos-generation-2\n") && cfg.contains("LABEL nixos-generation-1\n"), "{cfg}");
    for part in ["loader", "syslinux.cfg"] {
        mcopy_in(&img, &esp.join(part), "::/");
    }
    // The image's own configuration was where the sync writes it: one syslinux.cfg, replaced.
    let listing = run(Command::new("mdir").args(["-b", "-i"]).arg(mtools_img(&img)).arg("::/"));
    assert_eq!(listing.lines().filter(|l| l.to_lowercase().contains("syslinux.cfg")).count(), 1, "{listing}");

    let log = run_bios(&img);
    let m = boot_support::marker(&log);
    eprintln!("generation 2: {m}");
    assert!(m.starts_with(bios_ok), "{m}");
    let cmdline = log
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .unwrap_or_else(|| panic!("ignore_loglevel did not show the command line:\n{log}"));
    assert!(cmdline.contains(" ignore_loglevel nixqimg.gen=2 nixqimg.q=\"a b\""), "{cmdline}");
    assert!(cmdline.contains(&format!("init={}/init ", toplevel.display())), "{cmdline}");
    eprintln!("{}", cmdline.trim());
    let _ = std::fs::remove_dir_all(&dir);
}
