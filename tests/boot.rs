//! Real boots: NixOS-shaped systems built by Nix from Debian parts, made into disk images by
//! `nixqimg image`, booted by `nixqimg run --accel tcg` under OVMF, SeaBIOS (the same hybrid image) and
//! AAVMF. The guest's own init checks what NixOS's first boot relies on and prints one marker line.

#[macro_use]
mod boot_support;

use boot_support::{marker, need, nixqimg, system, Tmp};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One VM at a time: the machine has two cores shared by everyone.
static VM: Mutex<()> = Mutex::new(());

struct Image {
    _dir: Tmp,
    path: PathBuf,
}

fn image(arch: &str, boot: &str) -> Image {
    need("qemu-img", "qemu-utils");
    let toplevel = system(arch);
    let dir = Tmp::new(&format!("boot-image-{arch}"));
    let path = dir.join("nixos.qcow2");
    let (code, out, err) =
        nixqimg(&args!["image", "--toplevel", toplevel, "--out", path, "--boot", boot, "--timeout", "0",]);
    assert_eq!(code, 0, "nixqimg image failed:\n{out}{err}");
    Image { _dir: dir, path }
}

/// `nixqimg run IMAGE --snapshot --until NIXQIMG-BOOT- --timeout 240 EXTRA...` (with `--accel tcg` unless
/// EXTRA names one); returns the marker line and stderr.
fn boot(image: &Path, extra: &[&OsStr]) -> (String, String) {
    let _one = VM.lock().unwrap_or_else(|e| e.into_inner());
    let mut args: Vec<&OsStr> =
        args!["run", image, "--snapshot", "--until", "NIXQIMG-BOOT-", "--timeout", "240"].to_vec();
    if !extra.contains(&OsStr::new("--accel")) {
        args.extend(args!["--accel", "tcg"]);
    }
    args.extend_from_slice(extra);
    let start = std::time::Instant::now();
    let (code, out, err) = nixqimg(&args);
    eprintln!("boot took {:.1}s", start.elapsed().as_secs_f64());
    assert_eq!(code, 0, "nixqimg run failed:\n{out}\n{err}");
    let m = marker(&out);
    eprintln!("{m}");
    (m, err)
}

fn seed(dir: &Tmp, hostname: &str) -> (PathBuf, String) {
    let key = dir.join("id.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootTestKeyOnlyForNixqimgTests test@nixqimg\n").unwrap();
    let out = dir.join("seed.img");
    let (code, o, e) = nixqimg(&args!["seed", "--ssh-key", key, "--hostname", hostname, "--out", out,]);
    assert_eq!(code, 0, "nixqimg seed failed: {o}{e}");
    let meta = boot_support::run(std::process::Command::new("mtype").arg("-i").arg(&out).arg("::/meta-data")).stdout;
    let id = String::from_utf8_lossy(&meta)
        .lines()
        .find_map(|l| l.strip_prefix("instance-id: ").map(String::from))
        .expect("the seed's meta-data has an instance-id");
    (out, id)
}

/// One hybrid image, booted under OVMF (with a seed) and under SeaBIOS; then a run that never sees its
/// marker. One test, so the image (a few hundred MiB) is removed when it ends.
#[test]
fn x86_64_hybrid_image_boots_under_ovmf_with_a_seed_and_under_seabios() {
    let img = image("x86_64", "hybrid");
    let dir = Tmp::new("boot-seed-uefi");
    let (seed, id) = seed(&dir, "web-1");
    let (m, _) = boot(&img.path, &args!["--seed", seed]);
    assert_eq!(
        m,
        format!(
            "NIXQIMG-BOOT-OK arch=x86_64 firmware=uefi serial=ds=nocloud \
             seed=instance-id={id},hostname=web-1,user-data=#cloud-config,ssh-keys=1"
        )
    );

    let (m, _) = boot(&img.path, &args!["--firmware", "bios"]);
    assert_eq!(m, "NIXQIMG-BOOT-OK arch=x86_64 firmware=bios serial=ds=nocloud-net seed=none");

    // --timeout alone still shows the console (it used to be taken for a marker that was never given,
    // and QEMU's writes failed with EPIPE): the guest powers off after its marker, and run exits 0.
    let _one = VM.lock().unwrap_or_else(|e| e.into_inner());
    let (code, out, err) =
        nixqimg(&args!["run", img.path, "--accel", "tcg", "--snapshot", "--firmware", "bios", "--timeout", "240"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(marker(&out), "NIXQIMG-BOOT-OK arch=x86_64 firmware=bios serial=ds=nocloud-net seed=none");
    assert!(out.contains("SYSLINUX"), "the console before the marker is missing:\n{out}");

    let (code, _out, err) =
        nixqimg(&args!["run", img.path, "--accel", "tcg", "--snapshot", "--until", "NEVER-PRINTED", "--timeout", "3",]);
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("the guest ran 3s without printing 'NEVER-PRINTED'; stopped it"), "{err}");
}

#[test]
fn aarch64_image_boots_under_aavmf_and_its_arch_is_read_from_the_esp() {
    let img = image("aarch64", "uefi");
    let dir = Tmp::new("boot-key-aarch64");
    let key = dir.join("id.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIArmTestKey test@nixqimg\n").unwrap();
    let (code, out, err) = nixqimg(&args!["run", img.path, "--dry-run", "--ssh-port", "2222"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.starts_with("qemu-system-aarch64 -machine virt -cpu max,pauth-impdef=on -accel tcg "), "{out}");
    assert!(
        out.contains(" -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd "),
        "{out}"
    );
    assert!(out.contains(&format!(
        " -drive cache=writeback,format=qcow2,id=drive1,if=none,index=1,werror=report,file={} ",
        img.path.display()
    )));
    assert!(out.contains(" -smbios type=1,serial=ds=nocloud-net ") && out.contains("hostfwd=tcp:127.0.0.1:2222-:22"));
    // Telling the arch reads only the ESP bytes it needs: under a 128 MiB file-size limit for the qcow2
    // (room for the 64 MiB AAVMF_VARS copy; qemu-img dd used to copy the whole 256 MiB ESP into TMPDIR)
    // and a 64 MiB data limit for a raw copy (whose ESP used to be read into memory whole).
    let raw = dir.join("nixos.raw");
    boot_support::run(std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img.path).arg(&raw));
    for (image, limit, what) in [(&img.path, libc::RLIMIT_FSIZE, "qcow2"), (&raw, libc::RLIMIT_DATA, "raw")] {
        let (code, out, err) =
            limited(&args!["run", image, "--dry-run"], limit, if what == "raw" { 64 << 20 } else { 128 << 20 });
        assert_eq!((code, err.as_str()), (0, ""), "{what}");
        assert!(out.starts_with("qemu-system-aarch64 "), "{what}: {out}");
    }
    std::fs::remove_file(&raw).unwrap();
    // No --arch: `run` reads BOOTAA64.EFI from the image's ESP; --ssh-key makes a seed for this run.
    // --accel auto on an x86_64 build machine: KVM cannot run an aarch64 guest, and run says so on one line.
    let (m, err) = boot(&img.path, &args!["--ssh-key", key, "--accel", "auto"]);
    if cfg!(target_arch = "x86_64") {
        assert!(
            err.starts_with("nixqimg: KVM cannot run an aarch64 guest on this x86_64 host; using TCG (slower)\n"),
            "{err}"
        );
    }
    let prefix = "NIXQIMG-BOOT-OK arch=aarch64 firmware=uefi serial=ds=nocloud seed=instance-id=iid-";
    assert!(m.starts_with(prefix), "{m}");
    assert!(m.ends_with(",hostname=nixos,user-data=#cloud-config,ssh-keys=1"), "{m}");
}

/// `nixqimg ARGS` under one resource limit (it and what it runs).
fn limited(args: &[&OsStr], resource: libc::__rlimit_resource_t, limit: u64) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nixqimg"));
    boot_support::nix_env(&mut cmd).args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(resource, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn run_explains_what_it_cannot_boot() {
    let t = Tmp::new("boot-errors");
    let blank = t.join("blank.raw");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let missing = t.join("missing.img");
    for (args, code, msg) in [
        (
            args!["run", missing].to_vec(),
            1,
            format!("nixqimg: {}: no such image (make one with nixqimg image)\n", missing.display()),
        ),
        (
            args!["run", blank].to_vec(),
            1,
            format!(
                "nixqimg: {}: cannot tell the guest's architecture from the image \
                 (pass --arch x86_64 or --arch aarch64)\n",
                blank.display()
            ),
        ),
        (
            args!["run", blank, "--arch", "aarch64", "--firmware", "bios"].to_vec(),
            2,
            "nixqimg: aarch64 has no BIOS boot (use --firmware uefi)\n".to_string(),
        ),
        (
            args!["run", blank, "--arch", "riscv64"].to_vec(),
            2,
            "nixqimg: cannot boot 'riscv64' (use --arch x86_64 or --arch aarch64)\n".to_string(),
        ),
    ] {
        let (c, out, err) = nixqimg(&args);
        assert_eq!((c, out.as_str(), err), (code, "", msg));
    }
}
