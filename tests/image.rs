//! `nixqimg image` on small NixOS-shaped systems built by real Nix in a temporary store: the disk's GPT,
//! the ESP as NixOS's systemd-boot installer lays it out, the root's ownership and Nix database (checked
//! by `nix-store --verify --check-contents` on the extracted root), determinism, atomic output, errors.

mod image_support;

use image_support::*;
use std::path::Path;
use std::process::Command;

fn image(s: &Store, args: &[&str], out: &Path) -> std::process::Output {
    nixqimg(s).arg("image").args(args).arg("--out").arg(out).output().unwrap()
}

#[test]
fn uefi_image_has_nixos_esp_layout_root_owned_store_and_a_verifying_nix_db() {
    let s = store();
    let top = system(&s, "a", 0);
    let t = top.display().to_string();
    let hash_name = |p: &str| Path::new(p).parent().unwrap().file_name().unwrap().to_str().unwrap().to_owned();
    let dir = tempdir("layout");
    let img = dir.join("disk.raw");
    let o = image(&s, &["--toplevel", &t, "--format", "raw", "--boot", "uefi", "--seed", "one"], &img);
    let stdout = ok(&o);
    assert!(stdout.contains("disk.raw"), "{stdout}");

    // $ sfdisk --dump disk.raw
    let (starts, dump) = partitions(&img);
    assert!(dump.contains("label: gpt"), "{dump}");
    assert!(dump.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B") && dump.contains("name=\"ESP\""), "{dump}");
    assert!(dump.contains("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4") && dump.contains("name=\"nixos\""), "{dump}");
    assert!(!dump.contains("LegacyBIOSBootable"), "uefi only: {dump}");
    assert_eq!(starts[0], 1 << 20);

    // $ blkid -p: the labels NixOS configurations mount by
    let esp = sh(&format!("blkid -p -O {} -o export {}", starts[0], img.display()));
    assert!(esp.contains("LABEL=ESP") && esp.contains("TYPE=vfat") && esp.contains("VERSION=FAT32"), "{esp}");
    let root = sh(&format!("blkid -p -O {} -o export {}", starts[1], img.display()));
    assert!(root.contains("LABEL=nixos") && root.contains("TYPE=ext4"), "{root}");

    // $ mcopy -i disk.raw@@1M ::... : systemd-boot, kernel and initrd named as NixOS names them
    let sd = std::fs::read(top.join("systemd/lib/systemd/boot/efi/systemd-bootx64.efi")).unwrap();
    assert_eq!(esp_file(&img, starts[0], "/EFI/BOOT/BOOTX64.EFI"), sd);
    assert_eq!(esp_file(&img, starts[0], "/EFI/systemd/systemd-bootx64.efi"), sd);
    let spec = std::fs::read_to_string(top.join("boot.json")).unwrap();
    let field = |k: &str| spec.split(&format!("\"{k}\": \"")).nth(1).unwrap().split('"').next().unwrap().to_owned();
    let (kernel, initrd) = (field("kernel"), field("initrd"));
    let kname = format!("/EFI/nixos/{}-bzImage.efi", hash_name(&kernel));
    let iname = format!("/EFI/nixos/{}-initrd.efi", hash_name(&initrd));
    assert_eq!(esp_file(&img, starts[0], &kname), std::fs::read(&kernel).unwrap());
    assert_eq!(esp_file(&img, starts[0], &iname), std::fs::read(&initrd).unwrap());
    let entry = String::from_utf8(esp_file(&img, starts[0], "/loader/entries/nixos-generation-1.conf")).unwrap();
    assert_eq!(
        entry,
        format!(
            "title NixOS\nsort-key nixos\nversion Generation 1 NixOS test a, built on 1970-01-01\nlinux {kname}\n\
             initrd {iname}\noptions init={t}/init console=ttyS0 panic=1\n"
        )
    );
    let loader = String::from_utf8(esp_file(&img, starts[0], "/loader/loader.conf")).unwrap();
    assert_eq!(loader, "timeout 5\ndefault nixos-generation-1.conf\nconsole-mode keep\n");
    let listing = sh(&format!("MTOOLS_SKIP_CHECK=1 mdir -/ -b -i {}@@{} ::/", img.display(), starts[0]));
    assert!(!listing.to_lowercase().contains("random-seed"), "machine-specific state on the ESP: {listing}");

    // $ debugfs -R 'rdump / root' disk.raw?offset=...: the store, the profile links, the database
    let root = dir.join("root");
    extract_root(&img, starts[1], &root);
    let bad = not_root_owned(&root);
    assert!(bad.is_empty(), "not owned by root: {bad:?}");
    let profiles = root.join("nix/var/nix/profiles");
    assert_eq!(std::fs::read_link(profiles.join("system")).unwrap(), Path::new("system-1-link"));
    assert_eq!(std::fs::read_link(profiles.join("system-1-link")).unwrap(), top);
    assert!(root.join("etc/NIXOS").is_file());
    for machine_specific in ["etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "var/lib/systemd/random-seed"] {
        assert!(!root.join(machine_specific).exists(), "{machine_specific} in the image");
    }
    let store_in_image = root.join(s.store_dir().strip_prefix("/").unwrap());
    let closure = ok(&s.cmd("nix-store").arg("-qR").arg(&top).output().unwrap());
    for p in closure.lines() {
        let name = Path::new(p).file_name().unwrap();
        assert!(store_in_image.join(name).symlink_metadata().is_ok(), "{p} missing from the image");
    }
    let hello = store_in_image.join(format!(
        "{}/bin/hello",
        hash_name(&format!("{}/x", std::fs::read_link(top.join("sw")).unwrap().display()))
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&hello).unwrap().permissions().mode() & 0o7777, 0o555);

    // $ nix-store --store 'local?root=ROOT&state=ROOT/nix/var/nix&real=ROOT/STORE' --verify --check-contents
    let url = format!("local?root={0}&state={0}/nix/var/nix&real={1}", root.display(), store_in_image.display());
    let verify =
        || s.cmd("nix-store").arg("--store").arg(&url).args(["--verify", "--check-contents"]).output().unwrap();
    let valid = ok(&s.cmd("nix-store").arg("--store").arg(&url).arg("-qR").arg(&top).output().unwrap());
    let sorted = |t: &str| {
        let mut v: Vec<String> = t.lines().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&valid), sorted(&closure), "the image's database has the whole closure with its references");
    let v = verify();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(v.status.success() && !err.contains("disappeared") && !err.contains("modified"), "verify: {err}");
    // The same check sees a changed file, so it is really reading the image's store.
    sh(&format!("chmod u+w {0} && echo changed >> {0}", hello.display()));
    let v = verify();
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(!v.status.success() && err.contains("was modified"), "a modified store path verified: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_inputs_give_the_same_bytes_whatever_tmpdir_umask_order_or_user() {
    let s = store();
    let top = system(&s, "a", 0);
    let dir = tempdir("determinism");
    let (ci1, ci2) = (dir.join("ci-forward"), dir.join("ci-reverse"));
    closure_info(&s, &top, &ci1, false);
    closure_info(&s, &top, &ci2, true);
    let (tmp1, tmp2) = (dir.join("tmp1"), dir.join("tmp2"));
    std::fs::create_dir_all(&tmp1).unwrap();
    std::fs::create_dir_all(&tmp2).unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // World-writable, so the second build can run as nobody (a builder whose files are not root's).
    for d in [&tmp2, &out_dir] {
        sh(&format!("chmod 1777 {}", d.display()));
    }
    let run = |ci: &Path, tmp: &Path, umask: &str, out: &Path, seed: &str, user: bool| {
        let mut c = Command::new("sh");
        s.env(&mut c);
        let setpriv = if user { "setpriv --reuid=65534 --regid=65534 --clear-groups " } else { "" };
        c.arg("-c")
            .arg(format!(
                "umask {umask}; exec {setpriv}{NIXQIMG} image --closure-info {} --format qcow2 --boot uefi --seed {seed} --out {}",
                ci.display(),
                out.display()
            ))
            .env("TMPDIR", tmp);
        ok(&c.output().unwrap());
    };
    let (a, b, c) = (out_dir.join("a.qcow2"), out_dir.join("b.qcow2"), out_dir.join("c.qcow2"));
    run(&ci1, &tmp1, "022", &a, "s1", false);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    run(&ci2, &tmp2, "077", &b, "s1", true);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "two builds of the same system differ");
    // The build as nobody still has a root-owned store.
    let raw = dir.join("b.raw");
    ok(&Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&b).arg(&raw).output().unwrap());
    let (starts, dump_b) = partitions(&raw);
    let root = dir.join("root");
    extract_root(&raw, starts[1], &root);
    let bad = not_root_owned(&root);
    assert!(bad.is_empty(), "built as uid 65534, the image has: {bad:?}");

    run(&ci1, &tmp1, "022", &c, "s2", false);
    assert!(std::fs::read(&a).unwrap() != std::fs::read(&c).unwrap(), "another --seed gave the same image");
    let raw_c = dir.join("c.raw");
    ok(&Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&c).arg(&raw_c).output().unwrap());
    let (_, dump_c) = partitions(&raw_c);
    let label_id = |d: &str| d.lines().find(|l| l.starts_with("label-id")).unwrap().to_owned();
    assert_ne!(label_id(&dump_b), label_id(&dump_c));
    let uuid = |img: &Path| sh(&format!("blkid -p -O {} -s UUID -o value {}", starts[1], img.display()));
    assert_ne!(uuid(&raw), uuid(&raw_c));
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "temporary files left next to the outputs: {left:?}");
    for t in [&tmp1, &tmp2] {
        assert_eq!(std::fs::read_dir(t).unwrap().count(), 0, "{} not cleaned", t.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raw_zst_decompresses_to_the_raw_image_and_no_seed_derives_from_the_inputs() {
    need("zstd", "zstd");
    let s = store();
    let top = system(&s, "a", 0);
    let other = system(&s, "b", 0);
    let dir = tempdir("zst");
    let (raw, zst, raw2, rawb) = (dir.join("d.raw"), dir.join("d.raw.zst"), dir.join("d2.raw"), dir.join("b.raw"));
    let t = top.display().to_string();
    ok(&image(&s, &["--toplevel", &t, "--format", "raw", "--boot", "uefi"], &raw));
    ok(&image(&s, &["--toplevel", &t, "--format", "raw.zst", "--boot", "uefi"], &zst));
    ok(&image(&s, &["--toplevel", &t, "--format", "raw", "--boot", "uefi"], &raw2));
    ok(&image(&s, &["--toplevel", &other.display().to_string(), "--format", "raw", "--boot", "uefi"], &rawb));
    let unz = dir.join("unz.raw");
    ok(&Command::new("zstd").args(["-q", "-d"]).arg(&zst).arg("-o").arg(&unz).output().unwrap());
    assert!(std::fs::read(&unz).unwrap() == std::fs::read(&raw).unwrap(), "raw.zst is not the raw image");
    assert!(std::fs::read(&raw2).unwrap() == std::fs::read(&raw).unwrap());
    let (_, da) = partitions(&raw);
    let (_, db) = partitions(&rawb);
    let label_id = |d: &str| d.lines().find(|l| l.starts_with("label-id")).unwrap().to_owned();
    assert_ne!(label_id(&da), label_id(&db), "two systems got the same disk GUID without --seed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_build_leaves_the_old_output_and_no_temporary_files() {
    let s = store();
    // An 80 MB kernel does not fit a 64 MiB ESP: the failure comes after the disk file exists.
    let big = system(&s, "big", 80_000_000);
    let dir = tempdir("atomic");
    let out = dir.join("disk.qcow2");
    std::fs::write(&out, b"previous image").unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let o = nixqimg(&s)
        .env("TMPDIR", &tmp)
        .args(["image", "--boot", "uefi", "--esp-size", "64M", "--toplevel"])
        .arg(&big)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("nixqimg: ESP ") && err.contains("--esp-size"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous image");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "left behind: {left:?}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_name_the_problem_and_the_fix() {
    let s = store();
    let top = system(&s, "a", 0);
    let dir = tempdir("errors");
    let out = dir.join("x.qcow2");
    let data = std::fs::read_link(top.join("sw")).unwrap();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec!["--toplevel".into(), data.display().to_string()], 1, "boot.json: No such file or directory"),
        (vec!["--toplevel".into(), "/nonexistent/system".into()], 1, "/nonexistent/system"),
        (
            vec!["--toplevel".into(), top.display().to_string(), "--size".into(), "10M".into()],
            2,
            "--size 10 MiB is too small",
        ),
        (vec!["--toplevel".into(), top.display().to_string(), "--size".into(), "big".into()], 2, "--size 'big'"),
        (
            vec![
                "--toplevel".into(),
                top.display().to_string(),
                "--boot".into(),
                "bios".into(),
                "--syslinux".into(),
                "/nonexistent".into(),
            ],
            1,
            "/nonexistent: no syslinux installer",
        ),
        (vec!["--closure-info".into(), dir.display().to_string()], 1, "registration"),
        (vec![], 2, "--toplevel"),
    ];
    for (args, code, want) in cases {
        let o = nixqimg(&s).arg("image").args(&args).arg("--out").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert!(!out.exists());
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hybrid_is_the_x86_64_default_and_boots_bios_from_the_same_esp() {
    let s = store();
    let top = system(&s, "a", 0);
    let dir = tempdir("hybrid");
    let img = dir.join("disk.raw");
    // Debian's syslinux (the build machine's) when the closure has none.
    let stdout = ok(&image(&s, &["--toplevel", &top.display().to_string(), "--format", "raw"], &img));
    assert!(stdout.contains("Hybrid"), "{stdout}");
    let (starts, dump) = partitions(&img);
    assert!(dump.lines().any(|l| l.contains("name=\"ESP\"") && l.contains("LegacyBIOSBootable")), "{dump}");
    let mbr = std::fs::read(&img).unwrap()[..440].to_vec();
    assert_eq!(mbr, std::fs::read("/usr/lib/syslinux/mbr/gptmbr.bin").expect("syslinux-common")[..440]);
    let cfg = String::from_utf8(esp_file(&img, starts[0], "/syslinux.cfg")).unwrap();
    let entry = String::from_utf8(esp_file(&img, starts[0], "/loader/entries/nixos-generation-1.conf")).unwrap();
    let linux = entry.lines().find_map(|l| l.strip_prefix("linux ")).unwrap();
    assert!(cfg.contains(&format!("LINUX {linux}")), "{cfg}");
    assert!(!esp_file(&img, starts[0], "/ldlinux.sys").is_empty());
    let listing = sh(&format!("MTOOLS_SKIP_CHECK=1 mdir -a -i {}@@{} ::/", img.display(), starts[0]));
    assert!(!listing.contains("1980-00-00") && !listing.contains("2098"), "invalid FAT dates: {listing}");
    let _ = std::fs::remove_dir_all(&dir);
}
