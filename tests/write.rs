//! `nixqimg write`: qcow2, raw and zstd streams onto a raw file and a real loop device (attached here and
//! always detached by a guard), and its refusals: a block device without --yes, a disk with a mounted
//! partition (mounted inside a private mount namespace), the disk holding `/`, a disk too small.

#[macro_use]
mod boot_support;

use boot_support::{need, run, Tmp, NIXQIMG};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: usize = 1 << 20;

/// An 8 MiB image: pseudo-random data with a zero run in the middle (a hole in a sparse copy).
fn image(t: &Tmp) -> (PathBuf, Vec<u8>) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut b: Vec<u8> = (0..8 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    b[3 * MIB..5 * MIB].fill(0);
    let p = t.join("image.raw");
    std::fs::write(&p, &b).unwrap();
    (p, b)
}

fn qcow2(t: &Tmp, raw: &Path) -> PathBuf {
    need("qemu-img", "qemu-utils");
    let q = t.join("image.qcow2");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(&q));
    q
}

fn zst(t: &Tmp, raw: &Path) -> PathBuf {
    need("zstd", "zstd");
    let z = t.join("image.raw.zst");
    run(Command::new("zstd").args(["-q", "-f", "-o"]).arg(&z).arg(raw));
    z
}

/// `nixqimg ARGS < stdin`; (status, stderr).
fn write(args: &[&OsStr], stdin: Option<&Path>) -> (i32, String) {
    let input = match stdin {
        Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
        None => Stdio::null(),
    };
    let out = Command::new(NIXQIMG).arg("write").args(args).stdin(input).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "write prints nothing on stdout");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A loop device over a file, detached when dropped, whatever the test did.
struct Loop(String);

impl Loop {
    fn new(backing: &Path, partitions: bool) -> Loop {
        need("losetup", "mount");
        let mut c = Command::new("losetup");
        c.args(["-f", "--show"]);
        if partitions {
            c.arg("-P");
        }
        let out = run(c.arg(backing));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn backing(t: &Tmp, name: &str, mib: usize) -> PathBuf {
    let p = t.join(name);
    std::fs::write(&p, vec![0xaau8; mib * MIB]).unwrap();
    p
}

#[test]
fn raw_qcow2_and_zstd_stream_into_a_file() {
    let t = Tmp::new("write-file");
    let (raw, bytes) = image(&t);
    let out = t.join("out.raw");
    for (args, stdin) in [
        (args![raw, out], None),
        (args![qcow2(&t, &raw), out], None),
        (args!["-", out], Some(zst(&t, &raw))),
        (args!["-", out], Some(raw.clone())),
    ] {
        let _ = std::fs::remove_file(&out);
        let (code, err) = write(&args, stdin.as_deref());
        assert_eq!((code, err), (0, format!("nixqimg: wrote 8.0 MiB to {} and verified it\n", out.display())));
        assert!(std::fs::read(&out).unwrap() == bytes, "{args:?} wrote different bytes");
    }
}

#[test]
fn a_broken_zstd_stream_fails() {
    let t = Tmp::new("write-badzst");
    let (raw, _) = image(&t);
    let z = zst(&t, &raw);
    let mut b = std::fs::read(&z).unwrap();
    b.truncate(b.len() / 2);
    std::fs::write(&z, b).unwrap();
    let (code, err) = write(&args!["-", t.join("out")], Some(&z));
    assert_eq!(code, 1);
    assert!(err.starts_with("nixqimg: zstd could not decode stdin (exit status: 1): "), "{err}");
    assert!(err.ends_with(" (is it a complete .zst file?)\n") && err.lines().count() == 1, "{err}");
}

#[test]
fn onto_a_loop_device_with_yes_only_and_the_rest_of_the_disk_untouched() {
    let t = Tmp::new("write-loop");
    let (raw, bytes) = image(&t);
    let disk = backing(&t, "disk", 16);
    let dev = Loop::new(&disk, false);
    let (code, err) = write(&args![qcow2(&t, &raw), dev.0], None);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "nixqimg: {} is a block device (16.0 MiB): everything on it will be lost (add --yes to overwrite it)\n",
            dev.0
        )
    );
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0xaa), "written without --yes");
    for (args, stdin) in
        [(args![qcow2(&t, &raw), dev.0, "--yes"], None), (args!["-", dev.0, "--yes"], Some(zst(&t, &raw)))]
    {
        std::fs::write(&disk, vec![0xaau8; 16 * MIB]).unwrap();
        let (code, err) = write(&args, stdin.as_deref());
        assert_eq!((code, err), (0, format!("nixqimg: wrote 8.0 MiB to {} and verified it\n", dev.0)));
        let back = std::fs::read(&disk).unwrap();
        assert!(back[..8 * MIB] == bytes[..], "{args:?}: the image did not arrive");
        assert!(back[8 * MIB..].iter().all(|&b| b == 0xaa), "{args:?}: wrote past the image");
    }
}

#[test]
fn a_disk_smaller_than_the_image_is_refused_before_writing() {
    let t = Tmp::new("write-small");
    let (raw, _) = image(&t);
    let disk = backing(&t, "disk", 4);
    let dev = Loop::new(&disk, false);
    let (code, err) = write(&args![qcow2(&t, &raw), dev.0, "--yes"], None);
    assert_eq!((code, err), (1, format!("nixqimg: {} (4.0 MiB) is smaller than the image (8.0 MiB)\n", dev.0)));
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0xaa));
}

#[test]
fn a_mounted_disk_is_refused() {
    need("mkfs.ext4", "e2fsprogs");
    need("unshare", "util-linux");
    let t = Tmp::new("write-mounted");
    let disk = backing(&t, "disk", 32);
    run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&disk));
    let dev = Loop::new(&disk, false);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The mount lives only in this private mount namespace and dies with it.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", r#"mount "$1" "$2" && exec "$3" write - "$1" --yes"#])
        .args(["sh", &dev.0])
        .arg(&mnt)
        .arg(NIXQIMG)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()),
        (
            Some(1),
            format!(
                "nixqimg: refusing to write {0}: {0} is mounted on {1} (unmount it first, or pick another disk)\n",
                dev.0,
                mnt.display()
            )
        )
    );
}

#[test]
fn the_disk_holding_root_is_refused() {
    // The device of `/` from mountinfo, and the whole disk it is on, found through sysfs like a user
    // would with lsblk. stdin is empty, so even a broken check could not write a byte.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dev = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .map(|f| f[2].to_string())
        .unwrap();
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{dev}"))
        .unwrap_or_else(|_| panic!("/ is not on a block device ({dev}); this test needs a machine whose / is a disk"));
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let disk = if sys.join("partition").exists() { name(sys.parent().unwrap()) } else { name(&sys) };
    let (code, err) = write(&args!["-", format!("/dev/{disk}"), "--yes"], None);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "nixqimg: refusing to write /dev/{disk}: it is the disk holding / (/dev/{} is mounted on /) \
             (pick another disk: this one runs the system)\n",
            name(&sys)
        )
    );
}
