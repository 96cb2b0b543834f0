//! `image`: assembles a bootable GPT disk image (FAT32 ESP with systemd-boot, ext4 root holding the
//! closure and its Nix database) from a NixOS system, natively, with no VM, no root, no mounts and no
//! loop devices. Same inputs and seed give the same bytes. The output appears atomically (temp file in
//! the output's directory, then rename); on failure nothing is left behind.
//!
//! Decisions live in the submodules and are pure (bootspec, closure, ids, layout, esp plan, nixdb SQL,
//! mkfs arguments); this file only sequences the side effects.

pub mod bios;
pub mod bootloader;
mod bootspec;
mod closure;
pub(crate) mod esp;
mod ids;
mod layout;
mod nixdb;
mod rootfs;
pub mod seed;

use crate::arch;
use crate::error::{Error, Result};
use layout::{human, MIB};
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Qcow2,
    Raw,
    #[value(name = "raw.zst")]
    RawZst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Boot {
    Uefi,
    Bios,
    Hybrid,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("system").required(true).multiple(true).args(["toplevel", "closure_info"])))]
pub struct Args {
    /// The NixOS system (config.system.build.toplevel, or a `result` link to it).
    #[arg(long)]
    toplevel: Option<PathBuf>,
    /// nixpkgs' closureInfo of the system (its `registration` file); the toplevel is found in it.
    #[arg(long, value_name = "DIR")]
    closure_info: Option<PathBuf>,
    /// Where to write the image (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "qcow2")]
    format: Format,
    /// Disk size (e.g. 8G), or `auto`: the closure plus room for ext4 (clouds grow the root on boot).
    #[arg(long, default_value = "auto")]
    size: String,
    /// ESP size: room for configurationLimit generations of kernels and initrds.
    #[arg(long, default_value = "256M")]
    esp_size: String,
    /// Firmware the image boots from; default: hybrid (UEFI and BIOS) on x86_64, uefi elsewhere.
    #[arg(long, value_enum)]
    boot: Option<Boot>,
    /// Derive the disk's UUIDs from this string (default: from the inputs).
    #[arg(long)]
    seed: Option<String>,
    /// systemd-boot's seconds of menu (loader.conf `timeout`; NixOS's default is 5).
    #[arg(long, default_value_t = 5)]
    timeout: u32,
    /// The systemd-boot EFI binary (default: `<toplevel>/systemd/lib/systemd/boot/efi/`, or any in the closure).
    #[arg(long, value_name = "FILE")]
    systemd_boot: Option<PathBuf>,
    /// The x86_64 syslinux package for BIOS boot (nixpkgs' syslinux or a Debian root; default: from the closure, else /).
    #[arg(long, value_name = "DIR")]
    syslinux: Option<PathBuf>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C or SIGTERM: finish the current step's child (which gets the signal too), then clean up.
fn catch_signals() {
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; a handler (not
        // SIG_IGN) resets to the default in exec'd children, so tools still die on the signal.
        unsafe {
            libc::signal(s, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Error::new("image: interrupted; nothing was written").code(130));
    }
    Ok(())
}

/// Removes the paths it holds when dropped.
struct Cleanup(Vec<PathBuf>);

impl Cleanup {
    fn add(&mut self, p: PathBuf) -> PathBuf {
        self.0.push(p.clone());
        p
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            if let Ok(m) = fs::symlink_metadata(p) {
                if m.is_dir() {
                    make_writable(p);
                    let _ = fs::remove_dir_all(p);
                } else {
                    let _ = fs::remove_file(p);
                }
            }
        }
    }
}

/// Store directories are staged read-only (0555); a non-root user must open them to delete.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::symlink_metadata(dir) {
        if m.is_dir() {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}

struct Progress {
    on: bool,
    steps: usize,
    n: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.n += 1;
        if self.on {
            let _ = write!(std::io::stderr(), "\r\x1b[K[{}/{}] {what}\n", self.n, self.steps);
        }
    }
    fn bytes(&self, done: u64, total: u64) {
        if self.on && total > 0 {
            let _ = write!(std::io::stderr(), "\r\x1b[K      {}% of {}", done * 100 / total, human(total));
        }
    }
}

/// Follows `result`-style links to the store path itself (not `canonicalize`: the store directory may
/// sit under a symlink, and its spelling is part of every store path).
fn resolve_store_link(p: &Path) -> Result<PathBuf> {
    let mut p = p.to_path_buf();
    for _ in 0..40 {
        match fs::read_link(&p) {
            Ok(t) => p = if t.is_absolute() { t } else { p.parent().unwrap_or(Path::new("/")).join(t) },
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return Ok(p),
            Err(e) => return Err(Error::io(&p, e).hint("--toplevel must be a built NixOS system")),
        }
    }
    Err(Error::new(format!("{}: too many levels of symlinks", p.display())))
}

/// The store path (store dir + first component) a file inside the store belongs to.
fn store_path_of(store_dir: &Path, file: &Path) -> Option<PathBuf> {
    let first = file.strip_prefix(store_dir).ok()?.components().next()?;
    Some(store_dir.join(first))
}

/// Resolves symlinks inside the store (as NixOS's builder does with `Path.resolve()`), relative to the
/// store's own spelling.
fn resolve_in_store(store_dir: &Path, file: &Path) -> Result<PathBuf> {
    let real_store = fs::canonicalize(store_dir).map_err(|e| Error::io(store_dir, e))?;
    let real = fs::canonicalize(file).map_err(|e| Error::io(file, e).hint("the system's closure is incomplete"))?;
    let rel = real.strip_prefix(&real_store).map_err(|_| {
        Error::new(format!(
            "{} resolves to {}, outside the store {}",
            file.display(),
            real.display(),
            store_dir.display()
        ))
    })?;
    Ok(store_dir.join(rel))
}

fn find_toplevel(closure: &closure::Closure) -> Result<PathBuf> {
    // The system is the path with a boot.json that no other such path refers to (specialisations are
    // referred to by their parent).
    let systems: Vec<&closure::PathInfo> =
        closure.paths.iter().filter(|p| Path::new(&p.path).join("boot.json").is_file()).collect();
    let roots: Vec<&&closure::PathInfo> = systems
        .iter()
        .filter(|s| !systems.iter().any(|o| o.path != s.path && o.references.contains(&s.path)))
        .collect();
    match roots.as_slice() {
        [one] => Ok(PathBuf::from(&one.path)),
        [] => Err(Error::new("--closure-info: no NixOS system (a store path with boot.json) in the closure")
            .hint("make the closureInfo of config.system.build.toplevel, or pass --toplevel")),
        _ => {
            Err(Error::new("--closure-info: several NixOS systems in the closure").hint("pass --toplevel to pick one"))
        }
    }
}

fn find_systemd_boot(toplevel: &Path, closure: &closure::Closure, suffix: &str) -> Result<PathBuf> {
    let rel = format!("lib/systemd/boot/efi/systemd-boot{suffix}.efi");
    let via_link = toplevel.join("systemd").join(&rel);
    if via_link.is_file() {
        return Ok(via_link);
    }
    closure.paths.iter().map(|p| Path::new(&p.path).join(&rel)).find(|p| p.is_file()).ok_or_else(|| {
        Error::new(format!("no systemd-boot{suffix}.efi in the system's closure"))
            .hint("the system's systemd must be built with the boot loader (NixOS's default), or pass --systemd-boot")
    })
}

fn image_time() -> u64 {
    // Nix's own store timestamp; SOURCE_DATE_EPOCH when the caller fixes another.
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn tmp_name(out: &Path, what: &str) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    out.with_file_name(format!(".{name}.{what}.{}.tmp", std::process::id()))
}

fn run_tool(name: &str, package: &str, cmd: &mut Command) -> Result<()> {
    let out =
        cmd.output().map_err(|e| Error::new(format!("cannot run {name}: {e}")).hint(format!("install {package}")))?;
    if !out.status.success() {
        check_interrupted()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
        return Err(Error::new(format!("{name} failed: {msg}")));
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    catch_signals();
    let mut cleanup = Cleanup(Vec::new());
    // Temporary files go whatever happens; the finished output was taken off the list before.
    let res = build(a, &mut cleanup);
    drop(cleanup);
    res
}

/// What the system to put on disk is: its closure, boot.json, and the files the ESP needs.
struct System {
    closure: closure::Closure,
    toplevel: PathBuf,
    top: String,
    store_dir: PathBuf,
    spec: bootspec::Bootspec,
    arch: &'static arch::Arch,
    efi_suffix: &'static str,
    boot: Boot,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The steps, in order: check the arguments, read the system, plan the ESP, stage the root, lay out
/// and partition the disk, write the ESP (and BIOS boot), make the ext4 root, convert and rename.
fn build(a: Args, cleanup: &mut Cleanup) -> Result<()> {
    let mut progress = Progress { on: std::io::stderr().is_terminal(), steps: 6, n: 0 };
    let (esp_size, fixed_size) = sizes(&a)?;
    progress.step("reading the system and its closure");
    let sys = read_system(&a)?;
    let time = image_time();
    let esp_plan = plan_esp(&a, &sys, time)?;
    let seed = a.seed.clone().unwrap_or_else(|| {
        let mut parts =
            vec![sys.top.clone(), format!("{:?}", sys.boot), a.size.clone(), esp_size.to_string(), time.to_string()];
        parts.extend(sys.closure.paths.iter().map(|p| format!("{} {}", p.path, p.nar_hash)));
        ids::default_seed(&parts.iter().map(String::as_str).collect::<Vec<_>>())
    });
    let ids = ids::derive(&seed);
    let boot = sys.boot;
    let closure = &sys.closure;

    let total: u64 = closure.paths.iter().map(|p| p.nar_size).sum();
    progress.step(&format!("staging {} store paths ({})", closure.paths.len(), human(total)));
    let staging = cleanup.add(tempdir()?);
    let root = staging.join("root");
    let staged = stage_root(&root, &sys, time, total, &mut progress)?;

    let (need, inodes) = layout::root_estimate(staged.data, staged.inodes);
    let lay = match fixed_size {
        None => layout::layout(esp_size, need),
        Some(s) => layout::for_disk(s, esp_size, need).map_err(|e| Error::new(e).code(2))?,
    };
    let inodes = inodes.max(lay.root_size / 16384);
    progress.step(&format!(
        "partitioning a {} disk (ESP {}, root {})",
        human(lay.disk),
        human(lay.esp_size),
        human(lay.root_size)
    ));
    let raw = cleanup.add(tmp_name(&a.out, "raw"));
    let file =
        fs::OpenOptions::new().read(true).write(true).create_new(true).open(&raw).map_err(|e| Error::io(&raw, e))?;
    file.set_len(lay.disk).map_err(|e| Error::io(&raw, e))?;
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.args(["--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never"]).arg(&raw);
    pipe_run(
        "sfdisk",
        "fdisk (util-linux's sfdisk)",
        &mut sfdisk,
        &layout::sfdisk_script(&lay, &ids, boot != Boot::Uefi),
    )?;

    progress.step("writing the ESP (systemd-boot, kernel, initrd, loader entries)");
    esp::write(&file, lay.esp_offset, lay.esp_size, ids.esp_volume_id, &esp_plan)?;
    esp::set_hidden_sectors(&file, lay.esp_offset)?;
    if boot != Boot::Uefi {
        install_bios(&raw, closure, a.syslinux.as_deref(), time)?;
    }
    check_interrupted()?;

    progress.step(&format!("making the ext4 root ({} inodes)", staged.inodes));
    rootfs::mkfs(&rootfs::Mkfs {
        staging: &root,
        image: &raw,
        offset: lay.root_offset,
        size: lay.root_size,
        inodes,
        uuid: &ids.root_fs,
        hash_seed: &ids.root_hash_seed,
        time,
    })?;
    file.sync_all().map_err(|e| Error::io(&raw, e))?;
    drop(file);
    check_interrupted()?;

    progress.step(&format!("writing {}", a.out.display()));
    let done_file = convert(&raw, &a, cleanup)?;
    check_interrupted()?;
    fs::rename(&done_file, &a.out).map_err(|e| Error::io(&a.out, e))?;
    cleanup.0.retain(|p| p != &done_file);
    let size = fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: {:?} {} image of {} ({} disk), {} store paths, root {}",
        a.out.display(),
        boot,
        format!("{:?}", a.format).to_lowercase(),
        human(size),
        human(lay.disk),
        closure.paths.len(),
        ids.root_fs
    );
    Ok(())
}

/// The output directory exists; the ESP and disk sizes parse.
fn sizes(a: &Args) -> Result<(u64, Option<u64>)> {
    let out_dir = match a.out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        return Err(Error::new(format!("{}: no such directory for --out", out_dir.display())));
    }
    let esp_size = layout::parse_size(&a.esp_size)
        .filter(|&s| s >= 64 * MIB)
        .ok_or_else(|| Error::new(format!("--esp-size '{}' is not a size of at least 64M", a.esp_size)).code(2))?;
    let fixed_size = match a.size.as_str() {
        "auto" => None,
        s => Some(
            layout::parse_size(s)
                .ok_or_else(|| Error::new(format!("--size '{s}' is not a size like 8G or auto")).code(2))?,
        ),
    };

    Ok((esp_size, fixed_size))
}

/// The closure, the toplevel and its boot.json, each checked against the others.
fn read_system(a: &Args) -> Result<System> {
    // boot.json first: the cheapest check that --toplevel is a NixOS system at all.
    let given = a.toplevel.as_deref().map(resolve_store_link).transpose()?;
    let given_spec = given.as_deref().map(bootspec::read).transpose()?;
    let (closure, toplevel) = match (&a.closure_info, given) {
        (Some(dir), t) => {
            let c = closure::from_closure_info(dir)?;
            let t = match t {
                Some(t) => t,
                None => find_toplevel(&c)?,
            };
            (c, t)
        }
        (None, Some(t)) => (closure::from_nix_store(&t)?, t),
        (None, None) => return Err(Error::new("give --toplevel or --closure-info").code(2)),
    };
    let top = toplevel.to_string_lossy().into_owned();
    if !closure.contains(&top) {
        return Err(
            Error::new(format!("{top} is not in the closure")).hint("--closure-info must be the closure of --toplevel")
        );
    }
    let store_dir = toplevel.parent().ok_or_else(|| Error::new(format!("{top} is not a store path")))?.to_path_buf();
    let spec = match given_spec {
        Some(s) => s,
        None => bootspec::read(&toplevel)?,
    };
    let arch = arch::by_name(&spec.system)
        .ok_or_else(|| Error::new(format!("boot.json: system '{}' is not one nixqimg knows", spec.system)))?;
    let (_, efi_suffix) = esp::efi_names(arch.name).ok_or_else(|| {
        Error::new(format!("{}: nixqimg makes UEFI images for x86_64 and aarch64 only", arch.nix_system))
    })?;
    let boot = a.boot.unwrap_or(if arch.name == "x86_64" { Boot::Hybrid } else { Boot::Uefi });
    if boot != Boot::Uefi && arch.name != "x86_64" {
        return Err(Error::new(
            format!("--boot {boot:?}: legacy BIOS boot exists on x86_64 only, this is {}", arch.nix_system)
                .to_lowercase(),
        )
        .code(2));
    }
    let kernel = resolve_in_store(&store_dir, &spec.kernel)?;
    let initrd = resolve_in_store(&store_dir, &spec.initrd)?;
    for f in [&kernel, &initrd, &spec.init] {
        let sp = store_path_of(&store_dir, f).map(|p| p.to_string_lossy().into_owned());
        if !sp.as_deref().is_some_and(|p| closure.contains(p)) {
            return Err(Error::new(format!("boot.json names {}, which is not in the system's closure", f.display())));
        }
    }
    Ok(System { closure, toplevel, top, store_dir, spec, arch, efi_suffix, boot, kernel, initrd })
}

/// What goes on the ESP: systemd-boot, kernel, initrd, loader entries, and syslinux.cfg for BIOS.
fn plan_esp(a: &Args, sys: &System, time: u64) -> Result<esp::EspPlan> {
    let systemd_boot = match &a.systemd_boot {
        Some(f) => f.clone(),
        None => find_systemd_boot(&sys.toplevel, &sys.closure, sys.efi_suffix)?,
    };
    let mut esp_plan = esp::plan(&esp::PlanInput {
        spec: &sys.spec,
        store_dir: &sys.store_dir,
        kernel: &sys.kernel,
        initrd: &sys.initrd,
        systemd_boot: &systemd_boot,
        arch_name: sys.arch.name,
        timeout: a.timeout,
        build_time: time,
    })
    .map_err(Error::new)?;
    if sys.boot != Boot::Uefi {
        let cfg = syslinux_cfg(&esp_plan);
        esp_plan.files.push(("syslinux.cfg".into(), esp::Content::Text(cfg)));
    }
    Ok(esp_plan)
}

/// The root's tree in `root`: the store paths, the profile links and the Nix database.
fn stage_root(root: &Path, sys: &System, time: u64, total: u64, progress: &mut Progress) -> Result<rootfs::Staged> {
    rootfs::mkdir_root(root)?;
    let mut done = 0u64;
    let mut last = 0u64;
    let mut tick = |n: u64| {
        done += n;
        if done - last > total / 100 + 1 {
            last = done;
            progress.bytes(done, total);
        }
    };
    let staged = rootfs::stage(root, &sys.closure, &sys.store_dir, &sys.toplevel, &mut tick)?;
    check_interrupted()?;
    nixdb::write(&root.join("nix/var/nix/db"), &sys.closure, time)?;
    Ok(staged)
}

/// The finished raw disk in the output format, as a temporary file beside the output.
fn convert(raw: &Path, a: &Args, cleanup: &mut Cleanup) -> Result<PathBuf> {
    Ok(match a.format {
        Format::Raw => raw.to_path_buf(),
        Format::Qcow2 => {
            let q = cleanup.add(tmp_name(&a.out, "qcow2"));
            run_tool(
                "qemu-img",
                "qemu-utils",
                Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&q),
            )?;
            q
        }
        Format::RawZst => {
            let z = cleanup.add(tmp_name(&a.out, "zst"));
            // Multi-threaded zstd output does not depend on the number of threads (only on -T0 vs none).
            run_tool("zstd", "zstd", Command::new("zstd").args(["-q", "-f", "-T0", "-3"]).arg(raw).arg("-o").arg(&z))?;
            z
        }
    })
}

fn tempdir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let p = base.join(format!("nixqimg-image.{}.{i}", std::process::id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&p, e).hint("set TMPDIR to a writable directory with room for the closure")),
        }
    }
    Err(Error::new(format!("{}: cannot make a temporary directory", base.display())))
}

fn pipe_run(name: &str, package: &str, cmd: &mut Command, input: &str) -> Result<()> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(format!("cannot run {name}: {e}")).hint(format!("install {package}")))?;
    let fed = child.stdin.take().map(|mut i| i.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(|e| Error::new(format!("{name}: {e}")))?;
    if !out.status.success() || !matches!(fed, Some(Ok(()))) {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::new(format!("{name} failed: {}", err.trim())));
    }
    Ok(())
}

/// BIOS boot from the same ESP: SYSLINUX installed by nixqimg's own code (src/image/bios.rs) from the target's
/// x86_64 syslinux package: one in the closure, `--syslinux`, or the build machine's (Debian's) as a last resort.
fn install_bios(raw: &Path, closure: &closure::Closure, syslinux: Option<&Path>, time: u64) -> Result<()> {
    let root = match syslinux {
        Some(p) => p.to_path_buf(),
        None => closure
            .paths
            .iter()
            .map(|p| PathBuf::from(&p.path))
            .find(|p| p.join("share/syslinux/gptmbr.bin").is_file())
            .unwrap_or_else(|| PathBuf::from("/")),
    };
    let files = crate::image::bios::BiosFiles::from_syslinux(&root)?;
    let mut f = fs::OpenOptions::new().read(true).write(true).open(raw).map_err(|e| Error::io(raw, e))?;
    // mtools cannot stamp a FAT entry before 1980 (it wraps to 2098): clamp to FAT's first instant.
    crate::image::bios::install(&mut f, &files, Some(time.max(esp::FAT_EPOCH)))
}

/// syslinux.cfg from the same loader.conf and entry systemd-boot reads (`bootloader sync` keeps it so).
fn syslinux_cfg(plan: &esp::EspPlan) -> String {
    let text = |name: &str| {
        plan.files
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| match c {
                esp::Content::Text(t) => Some(t.clone()),
                esp::Content::Copy(_) => None,
            })
            .unwrap_or_default()
    };
    let conf = crate::image::bootloader::parse_loader_conf(&text("loader/loader.conf"));
    let entry =
        crate::image::bootloader::parse_entry("nixos-generation-1", &text("loader/entries/nixos-generation-1.conf"));
    crate::image::bootloader::render(&conf, &[entry])
}
