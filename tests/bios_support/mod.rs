//! Helpers for tests/bios.rs: blank GPT+FAT disks made by the usual tools, the real syslinux
//! installer for comparison, a Debian cloud kernel with a busybox initramfs that prints its command
//! line, and SeaBIOS boots under TCG with a deadline.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ESP_START: u64 = 2048;
pub const EPOCH: &str = "1700000000";

pub fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package} (tests/run does)");
}

pub fn run(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bios").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn nixqimg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nixqimg"))
}

pub fn mtools_img(img: &Path) -> String {
    format!("{}@@{}", img.display(), ESP_START * 512)
}

/// A GPT disk with one ESP at sector 2048 holding a fresh FAT (`fat` is 16 or 32), as sfdisk and
/// mkfs.vfat make it, with fixed ids.
pub fn blank_disk(img: &Path, disk_mib: u64, esp_sectors: u64, fat: u32) {
    need("sfdisk", "fdisk");
    need("mkfs.vfat", "dosfstools");
    let f = std::fs::File::create(img).unwrap();
    f.set_len(disk_mib << 20).unwrap();
    drop(f);
    let script = format!(
        "label: gpt\nlabel-id: 5A1F0000-0000-4000-8000-000000000001\nunit: sectors\n\
         start={ESP_START}, size={esp_sectors}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, \
         uuid=5A1F0000-0000-4000-8000-000000000002, name=\"ESP\"\n"
    );
    let mut c = Command::new("sfdisk");
    c.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(img).stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = c.spawn().expect("cannot run sfdisk");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed on {}", img.display());
    run(Command::new("mkfs.vfat")
        .args(["-F", &fat.to_string(), "-n", "ESP", "-i", "5A1F0001", "--offset", &ESP_START.to_string()])
        .arg(img)
        .arg((esp_sectors / 2).to_string()));
}

/// What the field does by hand: syslinux's installer, gptmbr.bin into the MBR, the GPT attribute.
pub fn real_syslinux_install(img: &Path) {
    need("syslinux", "syslinux");
    run(Command::new("syslinux")
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .env("TZ", "UTC")
        .args(["--install", "--offset", &(ESP_START * 512).to_string()])
        .arg(img));
    let mbr = std::fs::read("/usr/lib/syslinux/mbr/gptmbr.bin").expect("gptmbr.bin: install syslinux-common");
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).unwrap();
    run(Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--part-attrs"])
        .arg(img)
        .args(["1", "LegacyBIOSBootable"]));
}

pub fn nixqimg_install(img: &Path) {
    run(nixqimg().args(["bootloader", "install", "--syslinux", "/", "--source-date-epoch", EPOCH, "--disk"]).arg(img));
}

/// Debian bookworm's amd64 cloud kernel (cached across runs).
pub fn kernel() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debcache-bios");
        let fetch = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs");
        run(Command::new(&fetch).arg("bookworm").arg(&cache).arg("linux-image-cloud-amd64"));
        let meta = std::fs::read_dir(cache.join("debs"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("linux-image-cloud-amd64_"))
            .max()
            .expect("fetch-debs left no linux-image-cloud-amd64 .deb");
        let deps = run(Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"));
        let pkg = deps
            .split([',', ' '])
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
            .unwrap_or_else(|| panic!("no kernel package in {deps}"))
            .to_string();
        run(Command::new(&fetch).arg("bookworm").arg(&cache).arg(&pkg));
        let boot = cache.join("root").join(format!("{pkg}_amd64/boot"));
        std::fs::read_dir(&boot)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
            .unwrap_or_else(|| panic!("no vmlinuz in {}", boot.display()))
    })
}

/// A busybox initramfs whose /init prints `NIXQIMG-BIOS <tag> cmdline=[...]` and powers off.
pub fn initramfs(dir: &Path, tag: &str) -> PathBuf {
    need("busybox", "busybox-static");
    need("cpio", "cpio");
    let root = dir.join(format!("initramfs-{tag}"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let bb = run(Command::new("sh").args(["-c", "command -v busybox"])).trim().to_string();
    std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /proc\n/bin/busybox mount -t proc proc /proc\n\
         /bin/busybox echo \"NIXQIMG-BIOS {tag} cmdline=[$(/bin/busybox cat /proc/cmdline)]\"\n/bin/busybox poweroff -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    run(Command::new("chmod").arg("755").arg(root.join("init")));
    let out = dir.join(format!("initrd-{tag}.cpio"));
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet > '{}'",
        root.display(),
        out.display()
    )));
    out
}

struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the disk under SeaBIOS (QEMU's default firmware) with TCG; returns the serial log once the
/// guest powers off, or panics with the log after the deadline.
pub fn boot_bios(img: &Path, deadline: Duration) -> String {
    need("qemu-system-x86_64", "qemu-system-x86");
    let log = img.with_extension("serial.log");
    let _ = std::fs::remove_file(&log);
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot", "-nodefaults", "-vga", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let mut vm = Reap(child);
    let start = Instant::now();
    loop {
        if let Some(st) = vm.0.try_wait().unwrap() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(st.success(), "qemu exited with {st}; serial log:\n{text}");
            return text;
        }
        if start.elapsed() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("no power-off within {deadline:?}; serial log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The marker line the initramfs printed.
pub fn marker(log: &str, tag: &str) -> String {
    let want = format!("NIXQIMG-BIOS {tag} cmdline=[");
    log.lines()
        .find_map(|l| l.find(&want).map(|i| l[i..].trim_end().to_string()))
        .unwrap_or_else(|| panic!("no {want} line in the serial log:\n{log}"))
}
