//! `run`: boots a disk image in qemu-system with the flags people otherwise copy by hand: firmware (and a
//! fresh copy of its VARS file), the virtio disk, the NoCloud SMBIOS serial, a seed disk, the serial
//! console on the terminal and SSH forwarded. Deciding the command line is pure (`command`); finding
//! firmware, proving KVM and watching the guest are the edges.

use crate::arch::{self, Arch};
use crate::error::{Error, Result};
use crate::util::TempDir;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The disk image (qcow2 or raw).
    image: PathBuf,
    /// The guest's architecture; by default read from the image's ESP (EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI).
    #[arg(long)]
    arch: Option<String>,
    /// uefi (default) or bios (x86_64 only, SeaBIOS).
    #[arg(long, value_enum, default_value_t = Firmware::Uefi)]
    firmware: Firmware,
    /// A NoCloud seed volume (from `nixqimg seed`) attached as a second virtio disk.
    #[arg(long, conflicts_with_all = ["ssh_key", "metadata"])]
    seed: Option<PathBuf>,
    /// Make a seed for this run that authorizes this SSH public key file for root.
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// Write nothing to the image (QEMU keeps changes in a temporary overlay).
    #[arg(long)]
    snapshot: bool,
    /// auto proves KVM works by booting a tiny guest first, and falls back to TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Host port forwarded to the guest's SSH port (default: a free one, printed).
    #[arg(long)]
    ssh_port: Option<u16>,
    /// Stop QEMU once the guest prints a line containing TEXT, and exit 0 (for tests and scripts).
    #[arg(long, value_name = "TEXT")]
    until: Option<String>,
    /// Give up after SECS seconds: stop QEMU and exit 124.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Stand in for a cloud's metadata service instead of a seed: `hetzner:DIR` serves DIR/metadata and
    /// DIR/userdata at 169.254.169.254 as Hetzner Cloud does, with SMBIOS vendor Hetzner.
    #[arg(long, value_name = "hetzner:DIR", conflicts_with = "ssh_key")]
    metadata: Option<String>,
    /// Print the QEMU command line instead of running it.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    Uefi,
    Bios,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// Exit status when `--timeout` runs out, as timeout(1) has it.
pub const TIMED_OUT: u8 = 124;

/// A UEFI firmware pair: the read-only code and the template of the variable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// Everything the command line depends on, decided before anything runs.
#[derive(Debug)]
pub struct Spec<'a> {
    pub arch: &'static Arch,
    pub image: &'a Path,
    pub qcow2: bool,
    /// The code file and the per-run copy of the VARS file; `None` means BIOS (QEMU's own SeaBIOS).
    pub uefi: Option<Uefi>,
    pub seed: Option<&'a Path>,
    pub snapshot: bool,
    pub kvm: bool,
    pub memory: u32,
    pub cpus: u32,
    pub ssh_port: u16,
    /// Tests and scripts want QEMU to end when the guest reboots (a kernel panic with panic=N does).
    pub no_reboot: bool,
    /// A metadata service stand-in, with the nixqimg that serves it (`__metadata`) and its request log.
    pub metadata: Option<(crate::vm::metadata::Metadata, PathBuf, PathBuf)>,
}

/// The qemu-system argv (without the program) for `spec`.
pub fn command(spec: &Spec) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    match spec.arch.name {
        "aarch64" => {
            push("-machine");
            push("virt");
            push("-cpu");
            // pauth-impdef: QEMU's own pointer-auth algorithm is much faster under TCG than the
            // architected one and boots ~40% sooner (NOTES.md).
            push(if spec.kvm { "host" } else { "max,pauth-impdef=on" });
        }
        _ => {
            push("-machine");
            push("q35");
            if spec.kvm {
                push("-cpu");
                push("host");
            }
        }
    }
    push("-accel");
    push(if spec.kvm { "kvm" } else { "tcg" });
    push("-m");
    push(&spec.memory.to_string());
    push("-smp");
    push(&spec.cpus.to_string());
    push("-nodefaults");
    push("-display");
    push("none");
    push("-serial");
    push("mon:stdio");
    if let Some(u) = &spec.uefi {
        a.push("-drive".into());
        a.push(drive_arg("if=pflash,format=raw,unit=0,readonly=on,file=", &u.code));
        a.push("-drive".into());
        a.push(drive_arg("if=pflash,format=raw,unit=1,file=", &u.vars));
    }
    let format = if spec.qcow2 { "qcow2" } else { "raw" };
    a.push("-drive".into());
    a.push(drive_arg(
        &format!("cache=writeback,format={format},id=drive1,if=none,index=1,werror=report,file="),
        spec.image,
    ));
    a.push("-device".into());
    a.push("virtio-blk-pci,drive=drive1,bootindex=1".into());
    if let Some(seed) = spec.seed {
        a.push("-drive".into());
        a.push(drive_arg("format=raw,id=drive2,if=none,index=2,readonly=on,file=", seed));
        a.push("-device".into());
        a.push("virtio-blk-pci,drive=drive2".into());
    }
    a.push("-smbios".into());
    // cloud-init's NoCloud reads its mode from the SMBIOS serial: `ds=nocloud` looks for a local seed
    // volume, `ds=nocloud-net` for a network one (and, in practice, the image's own defaults). Hetzner's
    // datasource wants the instance id there instead.
    let netdev = format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", spec.ssh_port);
    match &spec.metadata {
        Some((md, exe, log)) => {
            a.push(md.smbios().into());
            a.push("-netdev".into());
            a.push(format!("{netdev}{}", md.netdev(exe, log)).into());
        }
        None => {
            a.push(
                if spec.seed.is_some() { "type=1,serial=ds=nocloud" } else { "type=1,serial=ds=nocloud-net" }.into(),
            );
            a.push("-netdev".into());
            a.push(netdev.into());
        }
    }
    a.push("-device".into());
    a.push("virtio-net-pci,netdev=net0".into());
    if spec.snapshot {
        a.push("-snapshot".into());
    }
    if spec.no_reboot {
        a.push("-no-reboot".into());
    }
    a
}

/// `-drive` takes comma-separated options, so a comma in a file name must be doubled.
fn drive_arg(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.as_os_str().to_string_lossy().replace(',', ",,"));
    s
}

/// Where each firmware is looked for, first match wins: the documented variables (a Nix user points
/// them at `${pkgs.OVMF.fd}/FV` or sets NIXQIMG_FIRMWARE_DIR to a directory holding the files), then
/// Debian's packages, then NixOS's libvirt copy.
pub fn uefi_candidates(arch: &Arch, var: &dyn Fn(&str) -> Option<OsString>) -> Vec<Uefi> {
    let (own_var, code_names, vars_names, system_dirs): (_, &[&str], &[&str], &[&str]) = match arch.name {
        "aarch64" => (
            "NIXQIMG_AAVMF",
            &["AAVMF_CODE.fd", "QEMU_EFI-pflash.raw"],
            &["AAVMF_VARS.fd", "vars-template-pflash.raw"],
            &["/usr/share/AAVMF", "/run/libvirt/nix-ovmf"],
        ),
        _ => (
            "NIXQIMG_OVMF",
            &["OVMF_CODE_4M.fd", "OVMF_CODE.fd"],
            &["OVMF_VARS_4M.fd", "OVMF_VARS.fd"],
            &["/usr/share/OVMF", "/run/libvirt/nix-ovmf"],
        ),
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for v in [own_var, "NIXQIMG_FIRMWARE_DIR"] {
        if let Some(d) = var(v).filter(|d| !d.is_empty()) {
            let d = PathBuf::from(d);
            dirs.push(d.join("FV"));
            dirs.push(d);
        }
    }
    dirs.extend(system_dirs.iter().map(PathBuf::from));
    let mut out = Vec::new();
    for d in dirs {
        for (c, v) in code_names.iter().zip(vars_names.iter()) {
            out.push(Uefi { code: d.join(c), vars: d.join(v) });
        }
    }
    out
}

fn find_uefi(arch: &Arch) -> Result<Uefi> {
    let var = |k: &str| std::env::var_os(k);
    uefi_candidates(arch, &var).into_iter().find(|u| u.code.is_file() && u.vars.is_file()).ok_or_else(|| {
        let (pkg, v) =
            if arch.name == "aarch64" { ("qemu-efi-aarch64", "NIXQIMG_AAVMF") } else { ("ovmf", "NIXQIMG_OVMF") };
        Error::new(format!("no UEFI firmware for {} found", arch.name))
            .hint(format!("install the Debian package {pkg}, or set {v} to a directory with the CODE and VARS files"))
    })
}

/// The architecture of the default loaders in an ESP's `EFI/BOOT`: one of them must be there, not both.
pub fn arch_from_loaders<S: AsRef<str>>(names: &[S]) -> Option<&'static Arch> {
    let has = |n: &str| names.iter().any(|m| m.as_ref().eq_ignore_ascii_case(n));
    match (has("BOOTX64.EFI"), has("BOOTAA64.EFI")) {
        (true, false) => arch::by_name("x86_64"),
        (false, true) => arch::by_name("aarch64"),
        _ => None,
    }
}

/// The file names in `EFI/BOOT` of a FAT volume.
fn loader_names<T: fatfs::ReadWriteSeek>(volume: T) -> Option<Vec<String>> {
    let fs = fatfs::FileSystem::new(volume, fatfs::FsOptions::new()).ok()?;
    let dir = fs.root_dir().open_dir("EFI/BOOT").ok()?;
    let names = dir.iter().filter_map(|e| e.ok()).map(|e| e.file_name()).take(1024).collect();
    Some(names)
}

/// Bytes fetched from the disk in chunks, on first use: what a FAT reader touches to walk to `EFI/BOOT`
/// is the boot sector, a few FAT sectors and three directories, a few hundred KiB of a 256 MiB ESP.
struct LazyEsp<'a> {
    image: &'a Path,
    qcow2: bool,
    tmp: &'a Path,
    start: u64,
    len: u64,
    pos: u64,
    chunks: std::collections::HashMap<u64, Vec<u8>, crate::util::FixedState>,
    fetched: u64,
}

const CHUNK: u64 = 64 << 10;
/// A walk that needs more than this is not a plain ESP: we stop rather than read the disk.
const ESP_READ_CAP: u64 = 8 << 20;

impl Read for LazyEsp<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let index = self.pos / CHUNK;
        if !self.chunks.contains_key(&index) {
            let want = CHUNK.min(self.len - index * CHUNK);
            if self.fetched + want > ESP_READ_CAP {
                return Err(std::io::Error::other("the ESP walk read too much"));
            }
            let bytes = read_disk(self.image, self.qcow2, self.start + index * CHUNK, want, self.tmp)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.fetched += want;
            self.chunks.insert(index, bytes);
        }
        let chunk = &self.chunks[&index];
        let off = (self.pos - index * CHUNK) as usize;
        let n = buf.len().min(chunk.len().saturating_sub(off));
        buf[..n].copy_from_slice(&chunk[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for LazyEsp<'_> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "the ESP is read, never written"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for LazyEsp<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek outside the ESP"))?;
        Ok(self.pos)
    }
}

const ESP_TYPE: [u8; 16] =
    [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];

/// The ESP's byte range from a GPT (the first 34 sectors of the disk, 512-byte sectors).
pub fn esp_range(head: &[u8]) -> Option<(u64, u64)> {
    let hdr = head.get(512..512 + 92)?;
    if &hdr[..8] != b"EFI PART" {
        return None;
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let entries_lba = le64(&hdr[72..80]);
    let count = le32(&hdr[80..84]).min(128) as usize;
    let size = le32(&hdr[84..88]) as usize;
    if size < 128 {
        return None;
    }
    let start = usize::try_from(entries_lba).ok()?.checked_mul(512)?;
    (0..count).find_map(|i| {
        let e = head.get(start + i * size..start + i * size + 128)?;
        (e[..16] == ESP_TYPE).then(|| {
            let first = le64(&e[32..40]);
            let last = le64(&e[40..48]);
            (first * 512, (last + 1).saturating_sub(first) * 512)
        })
    })
}

fn is_qcow2(image: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(image).map_err(|e| Error::io(image, e))?;
    let n = f.read(&mut magic).map_err(|e| Error::io(image, e))?;
    Ok(n == 4 && &magic == b"QFI\xfb")
}

/// Reads `len` bytes at `off` of the guest-visible disk (qcow2 through qemu-img, which knows the format).
fn read_disk(image: &Path, qcow2: bool, off: u64, len: u64, tmp: &Path) -> Result<Vec<u8>> {
    if !qcow2 {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(image).map_err(|e| Error::io(image, e))?;
        let len = len.min(f.metadata().map(|m| m.len()).unwrap_or(0).saturating_sub(off));
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Error::new("ESP too large"))?];
        f.read_exact_at(&mut buf, off).map_err(|e| Error::io(image, e))?;
        return Ok(buf);
    }
    let out = tmp.join("part.raw");
    let _ = std::fs::remove_file(&out);
    // A raw node over the qcow2 with offset and size: the window converts as a whole image. (qemu-img dd
    // is no help: 7.2 counts `count` from the start of the disk, later versions after `skip`.)
    let mut opts = OsString::from(format!("driver=raw,offset={off},size={len},file.driver=qcow2,"));
    opts.push(drive_arg("file.file.filename=", image));
    let st = Command::new("qemu-img")
        .args(["convert", "--image-opts"])
        .arg(opts)
        .args(["-O", "raw"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::new(format!("cannot run qemu-img: {e}")).hint("install the Debian package qemu-utils"))?;
    if !st.success() {
        return Err(Error::new(format!("{}: qemu-img convert failed ({st})", image.display())));
    }
    std::fs::read(&out).map_err(|e| Error::io(&out, e))
}

fn detect_arch(image: &Path, qcow2: bool, tmp: &Path) -> Result<&'static Arch> {
    let head = read_disk(image, qcow2, 0, 34 * 512, tmp)?;
    let unknown = || {
        Error::new(format!("{}: cannot tell the guest's architecture from the image", image.display()))
            .hint("pass --arch x86_64 or --arch aarch64")
    };
    let (start, len) = esp_range(&head).ok_or_else(unknown)?;
    let esp = LazyEsp { image, qcow2, tmp, start, len, pos: 0, chunks: Default::default(), fetched: 0 };
    let names = loader_names(esp).ok_or_else(unknown)?;
    arch_from_loaders(&names).ok_or_else(unknown)
}

/// Kills and reaps QEMU if we leave early (error, panic), so no VM outlives nixqimg.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Proves KVM runs a guest of `arch` here by booting a 64 KiB firmware that does what real firmware
/// does first and then exits QEMU with a known status. Seeing /dev/kvm is not enough: on some hosts
/// QEMU starts under KVM and the guest then dies on its first x87 instruction ("KVM internal error ...
/// emulation failure") and QEMU hangs.
fn kvm_works(arch: &Arch, tmp: &Path) -> std::result::Result<(), String> {
    if arch.name != arch::host().name {
        return Err(format!("KVM cannot run an {} guest on this {} host", arch.name, arch::host().name));
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("there is no /dev/kvm".into());
    }
    let Some(bin) = arch.qemu_system else { return Err(format!("no qemu-system for {}", arch.name)) };
    let rom = tmp.join("kvm-probe.rom");
    let (image, args, expect): (Vec<u8>, Vec<&str>, i32) = match arch.name {
        "x86_64" => {
            let mut r = vec![0xf4u8; 65536];
            // At the reset vector: fwait; fninit; cpuid; mov al,0x2a; out 0xf4,al; hlt.
            // isa-debug-exit turns the byte into exit status (0x2a << 1) | 1 = 85.
            let code = [0x9b, 0xdb, 0xe3, 0x31, 0xc0, 0x0f, 0xa2, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4];
            r[65536 - 16..65536 - 16 + code.len()].copy_from_slice(&code);
            (r, vec!["-machine", "q35", "-cpu", "host", "-device", "isa-debug-exit,iobase=0xf4,iosize=1"], 85)
        }
        "aarch64" => {
            // PSCI SYSTEM_OFF (0x84000008) through hvc: QEMU exits 0.
            let mut r = Vec::new();
            for w in [0x5280_0100u32, 0x72b0_8000, 0xd400_0002, 0x1400_0000] {
                r.extend_from_slice(&w.to_le_bytes());
            }
            (r, vec!["-machine", "virt", "-cpu", "host"], 0)
        }
        _ => return Err(format!("no KVM probe for {}", arch.name)),
    };
    std::fs::write(&rom, image).map_err(|e| format!("{}: {e}", rom.display()))?;
    let child = Command::new(bin)
        .args(["-accel", "kvm", "-nodefaults", "-display", "none", "-m", "64"])
        .args(args)
        .arg("-bios")
        .arg(&rom)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = child.map_err(|e| format!("cannot run {bin}: {e}"))?;
    let mut child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match child.0.try_wait() {
            Ok(Some(st)) if st.code() == Some(expect) => return Ok(()),
            Ok(Some(st)) => return Err(format!("a tiny test guest under KVM ended with {st}")),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {bin}: {e}")),
        }
    }
    Err("a tiny test guest under KVM did not finish within 5s".into())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::new(format!("no free TCP port: {e}")))?;
    Ok(l.local_addr()?.port())
}

pub fn run(a: Args) -> Result<()> {
    let image = a.image.as_path();
    if !image.is_file() {
        return Err(Error::new(format!("{}: no such image", image.display())).hint("make one with nixqimg image"));
    }
    let tmp = TempDir::new("run")?;
    let qcow2 = is_qcow2(image)?;
    let arch = match &a.arch {
        Some(n) => arch::by_name(n).filter(|a| a.qemu_system.is_some()).ok_or_else(|| {
            Error::new(format!("cannot boot '{n}'")).hint("use --arch x86_64 or --arch aarch64").code(2)
        })?,
        None => detect_arch(image, qcow2, &tmp.0)?,
    };
    if a.firmware == Firmware::Bios && arch.name != "x86_64" {
        return Err(Error::new(format!("{} has no BIOS boot", arch.name)).hint("use --firmware uefi").code(2));
    }
    let uefi = match a.firmware {
        Firmware::Uefi => {
            let fw = find_uefi(arch)?;
            let vars = tmp.0.join("VARS.fd");
            std::fs::copy(&fw.vars, &vars).map_err(|e| Error::io(&fw.vars, e))?;
            Some(Uefi { code: fw.code, vars })
        }
        Firmware::Bios => None,
    };
    let seed = match (&a.seed, &a.ssh_key) {
        (Some(s), _) => {
            if !s.is_file() {
                return Err(Error::new(format!("{}: no such seed", s.display())).hint("make one with nixqimg seed"));
            }
            Some(s.clone())
        }
        (None, Some(key)) => {
            let out = tmp.0.join("seed.img");
            crate::image::seed::make(
                &crate::image::seed::Inputs { ssh_keys: vec![key.clone()], ..Default::default() },
                &out,
            )?;
            Some(out)
        }
        (None, None) => None,
    };
    let bin = arch.qemu_system.unwrap_or("qemu-system-x86_64");
    let kvm = match a.accel {
        Accel::Tcg => false,
        Accel::Kvm => {
            if arch.name != arch::host().name {
                return Err(Error::new(format!(
                    "KVM cannot run an {} guest on this {} host",
                    arch.name,
                    arch::host().name
                ))
                .hint("use --accel tcg")
                .code(2));
            }
            true
        }
        Accel::Auto => {
            // --dry-run starts nothing, so it cannot prove KVM and shows the TCG line.
            if a.dry_run {
                false
            } else if let Err(why) = kvm_works(arch, &tmp.0) {
                eprintln!("nixqimg: {why}; using TCG (slower)");
                false
            } else {
                true
            }
        }
    };
    let ssh_port = match a.ssh_port {
        Some(p) => p,
        None => free_port()?,
    };
    let spec = Spec {
        arch,
        image,
        qcow2,
        uefi,
        seed: seed.as_deref(),
        snapshot: a.snapshot,
        kvm,
        memory: a.memory,
        cpus: a.cpus,
        ssh_port,
        no_reboot: a.until.is_some() || a.timeout.is_some(),
        metadata: match &a.metadata {
            Some(m) => Some((crate::vm::metadata::parse(m)?, std::env::current_exe()?, tmp.0.join("metadata.log"))),
            None => None,
        },
    };
    let argv = command(&spec);
    if a.dry_run {
        let mut line = vec![bin.to_string()];
        line.extend(argv.iter().map(|s| crate::util::shell_quote(s)));
        println!("{}", line.join(" "));
        return Ok(());
    }
    eprintln!(
        "nixqimg: booting {} ({}, {}); ssh -p {ssh_port} root@127.0.0.1",
        image.display(),
        arch.name,
        if spec.uefi.is_some() { "UEFI" } else { "BIOS" }
    );
    let res = watch(bin, &argv, a.until.as_deref(), a.timeout.map(Duration::from_secs));
    if let Some((_, _, log)) = &spec.metadata {
        let served = std::fs::read_to_string(log).unwrap_or_default();
        eprintln!("nixqimg: the metadata service answered {} requests", served.lines().count());
        for l in served.lines() {
            eprintln!("nixqimg: metadata: {l}");
        }
    }
    res
}

/// Runs QEMU with the serial console on our terminal; with `until`/`timeout`, reads the console,
/// stops QEMU when the marker appears or time runs out, and turns that into the exit status.
fn watch(bin: &str, argv: &[OsString], until: Option<&str>, timeout: Option<Duration>) -> Result<()> {
    let watching = until.is_some() || timeout.is_some();
    let mut cmd = Command::new(bin);
    cmd.args(argv);
    if watching {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    let child = cmd.spawn().map_err(|e| {
        let pkg = if bin.ends_with("aarch64") { "qemu-system-arm" } else { "qemu-system-x86" };
        Error::new(format!("cannot run {bin}: {e}")).hint(format!("install the Debian package {pkg}")).code(127)
    })?;
    let mut child = Reaped(child);
    // Set by the reader when the marker went by. A flag, not a channel: std's channels keep a
    // thread-local that, with the rest, overflowed musl's built-in TLS block (see src/logging.rs),
    // and this binary is also the interpreter, which pays for its TLS on every foreign exec.
    let seen = Arc::new(AtomicBool::new(false));
    let tx = Arc::clone(&seen);
    // The console goes to our stdout in both modes; with a marker it is also scanned line by line.
    // (Taking stdout only when a marker was given left `--timeout` alone with nobody reading the pipe:
    // QEMU's writes failed with EPIPE and the console was lost.)
    let reader = child.0.stdout.take().map(|mut out| {
        let marker = until.map(|s| s.as_bytes().to_vec());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut line: Vec<u8> = Vec::new();
            let stdout = std::io::stdout();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = stdout.lock().write_all(&buf[..n]);
                let Some(marker) = &marker else { continue };
                for &b in &buf[..n] {
                    line.push(b);
                    if b == b'\n' {
                        if memchr::memmem::find(&line, marker).is_some() {
                            let _ = stdout.lock().flush();
                            tx.store(true, Ordering::Release);
                            return;
                        }
                        line.clear();
                    } else if line.len() > 1 << 16 {
                        // A console that never ends a line: keep only what could still hold the marker.
                        line.drain(..line.len() - marker.len());
                    }
                }
            }
            let _ = stdout.lock().flush();
        })
    });
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        if seen.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(st) = child.0.try_wait().map_err(|e| Error::new(format!("waiting for {bin}: {e}")))? {
            // QEMU is gone, so the pipe ends: let the reader pass on the console's last bytes (and
            // maybe the marker) before we judge.
            if let Some(r) = reader {
                let _ = r.join();
            }
            if seen.load(Ordering::Acquire) {
                return Ok(());
            }
            return match (until, st.code()) {
                (Some(m), _) => Err(Error::new(format!("the guest stopped ({st}) before printing '{m}'"))),
                (None, Some(0)) => Ok(()),
                (None, Some(c)) => {
                    Err(Error::new(format!("{bin} exited with status {c}")).code(u8::try_from(c).unwrap_or(1)))
                }
                (None, None) => Err(Error::new(format!("{bin} was killed ({st})"))),
            };
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let what = until.map(|m| format!(" without printing '{m}'")).unwrap_or_default();
            return Err(Error::new(format!(
                "the guest ran {}s{what}; stopped it",
                timeout.map(|t| t.as_secs()).unwrap_or(0)
            ))
            .hint("raise --timeout, or boot with a terminal to see where it stops")
            .code(TIMED_OUT));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(arch: &str, image: &'a Path) -> Spec<'a> {
        Spec {
            arch: arch::by_name(arch).unwrap(),
            image,
            qcow2: true,
            uefi: Some(Uefi { code: "/fw/CODE.fd".into(), vars: "/tmp/run/VARS.fd".into() }),
            seed: None,
            snapshot: false,
            kvm: false,
            memory: 1024,
            cpus: 2,
            ssh_port: 2222,
            no_reboot: false,
            metadata: None,
        }
    }

    fn joined(v: &[OsString]) -> String {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn x86_64_uefi_has_the_seed_readme_disk_flags_and_the_nocloud_net_serial() {
        let line = joined(&command(&spec("x86_64", Path::new("/i/nixos.qcow2"))));
        assert!(line.starts_with("-machine q35 -accel tcg -m 1024 -smp 2 -nodefaults -display none -serial mon:stdio"));
        assert!(line.contains("-drive if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"));
        assert!(line.contains("-drive if=pflash,format=raw,unit=1,file=/tmp/run/VARS.fd"));
        assert!(line.contains(
            "-drive cache=writeback,format=qcow2,id=drive1,if=none,index=1,werror=report,file=/i/nixos.qcow2 \
             -device virtio-blk-pci,drive=drive1,bootindex=1"
        ));
        assert!(line.contains("-smbios type=1,serial=ds=nocloud-net"));
        assert!(line.contains("hostfwd=tcp:127.0.0.1:2222-:22"));
        assert!(!line.contains("-snapshot") && !line.contains("-no-reboot") && !line.contains("-cpu"));
    }

    #[test]
    fn hetzner_metadata_sets_the_smbios_vendor_and_serial_and_forwards_169_254_169_254_to_nixqimg() {
        let mut s = spec("x86_64", Path::new("/i/a.qcow2"));
        let md = crate::vm::metadata::Metadata { dir: "/md".into(), instance_id: "4711".into() };
        s.metadata = Some((md, "/bin/nixqimg".into(), "/t/md.log".into()));
        let line = joined(&command(&s));
        assert!(line.contains(" -smbios type=1,manufacturer=Hetzner,product=vServer,serial=4711 -netdev "), "{line}");
        assert!(!line.contains("nocloud"), "{line}");
        assert!(line.contains(
            ",net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-cmd:'/bin/nixqimg' __metadata 'hetzner:/md' '/t/md.log' "
        ));
    }

    #[test]
    fn a_seed_is_a_second_read_only_virtio_disk_and_switches_the_serial_to_nocloud() {
        let mut s = spec("aarch64", Path::new("/i/a.raw"));
        s.qcow2 = false;
        s.seed = Some(Path::new("/s/seed.img"));
        s.snapshot = true;
        s.no_reboot = true;
        let line = joined(&command(&s));
        assert!(line.starts_with("-machine virt -cpu max,pauth-impdef=on -accel tcg"));
        assert!(line.contains("format=raw,id=drive1"));
        assert!(line.contains("-drive format=raw,id=drive2,if=none,index=2,readonly=on,file=/s/seed.img -device virtio-blk-pci,drive=drive2"));
        assert!(line.contains("-smbios type=1,serial=ds=nocloud "));
        assert!(line.contains("-snapshot") && line.ends_with("-no-reboot"));
    }

    #[test]
    fn bios_has_no_pflash_and_kvm_uses_the_host_cpu() {
        let mut s = spec("x86_64", Path::new("/i/x"));
        s.uefi = None;
        s.kvm = true;
        let line = joined(&command(&s));
        assert!(!line.contains("pflash"));
        assert!(line.starts_with("-machine q35 -cpu host -accel kvm"));
    }

    #[test]
    fn commas_in_file_names_are_doubled_for_drive() {
        let line = joined(&command(&spec("x86_64", Path::new("/i/a,b.img"))));
        assert!(line.contains("file=/i/a,,b.img "));
    }

    #[test]
    fn firmware_variables_come_before_debian_paths() {
        let x86 = arch::by_name("x86_64").unwrap();
        let env = |k: &str| (k == "NIXQIMG_OVMF").then(|| OsString::from("/nix/store/x-OVMF-fd"));
        let c = uefi_candidates(x86, &env);
        assert_eq!(c[0].code, Path::new("/nix/store/x-OVMF-fd/FV/OVMF_CODE_4M.fd"));
        assert!(c.iter().any(|u| u.code == Path::new("/nix/store/x-OVMF-fd/FV/OVMF_CODE.fd")
            && u.vars == Path::new("/nix/store/x-OVMF-fd/FV/OVMF_VARS.fd")));
        assert!(c.iter().any(|u| u.code == Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd")
            && u.vars == Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd")));
        let arm = uefi_candidates(arch::by_name("aarch64").unwrap(), &|_| None);
        assert_eq!(
            arm[0],
            Uefi { code: "/usr/share/AAVMF/AAVMF_CODE.fd".into(), vars: "/usr/share/AAVMF/AAVMF_VARS.fd".into() }
        );
    }

    #[test]
    fn arch_comes_from_the_default_loader_entry() {
        assert_eq!(arch_from_loaders(&["BOOTAA64.EFI"]).unwrap().name, "aarch64");
        assert_eq!(arch_from_loaders(&["grub.cfg", "bootx64.efi"]).unwrap().name, "x86_64");
        assert!(
            arch_from_loaders(&["BOOTX64.EFI", "BOOTAA64.EFI"]).is_none(),
            "both loaders: ambiguous, ask for --arch"
        );
        assert!(arch_from_loaders::<&str>(&[]).is_none());
    }

    #[test]
    fn loaders_are_found_in_a_real_fat_volume() {
        let mut v = std::io::Cursor::new(vec![0u8; 40 << 20]);
        fatfs::format_volume(&mut v, fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32)).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut v, fatfs::FsOptions::new()).unwrap();
            fs.root_dir().create_dir("EFI").unwrap();
            fs.root_dir().create_dir("EFI/BOOT").unwrap();
            fs.root_dir().create_file("EFI/BOOT/BOOTAA64.EFI").unwrap();
        }
        v.set_position(0);
        assert_eq!(loader_names(&mut v).unwrap(), [".", "..", "BOOTAA64.EFI"]);
    }

    #[test]
    fn esp_range_reads_the_gpt_entry() {
        let mut head = vec![0u8; 34 * 512];
        head[512..520].copy_from_slice(b"EFI PART");
        head[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        head[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        head[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // Entry 1 is the ESP: LBA 2048..=133119.
        let e = 1024 + 128;
        head[e..e + 16].copy_from_slice(&ESP_TYPE);
        head[e + 32..e + 40].copy_from_slice(&2048u64.to_le_bytes());
        head[e + 40..e + 48].copy_from_slice(&133119u64.to_le_bytes());
        assert_eq!(esp_range(&head), Some((1 << 20, 131072 * 512)));
        head[512] = b'X';
        assert_eq!(esp_range(&head), None);
    }
}
