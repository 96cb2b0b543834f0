//! `seed`: a NoCloud seed volume for cloud-init: a FAT filesystem labelled CIDATA holding `user-data`
//! and `meta-data`, attached to the guest as a plain virtio disk.
//!
//! FAT rather than ISO9660: cloud-init accepts either, and Debian's cloud kernels build both vfat and isofs
//! as modules, so neither is free in the guest; but FAT is what the ESP already needs (every UEFI image
//! loads it), and the ESP's FAT writer serves both, while ISO needs genisoimage or xorriso. The volume is
//! written by the fatfs crate with every time stamp at the FAT epoch and the volume id taken from the
//! content, so the same inputs give the same bytes (mkfs.vfat and mcopy stamped the current time).
//! Composing the files is pure (`compose`); writing the volume is the edge.
//!
//! Keys are for root. Stock cloud-init (Debian's `disable_root: true`) would put them behind a "Please
//! login as the user ..." command, so the generated cloud-config says `disable_root: false`. With the
//! user's own user-data, the keys travel as a second MIME part that cloud-init merges into the user's
//! cloud-config (lists appended, the user's own settings kept), so a key and a cloud-config combine.

use crate::error::{Error, Result};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// cloud-init user-data, used as given (with --ssh-key: merged with the keys as a MIME multipart).
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// NoCloud meta-data, used as given (default: instance-id and local-hostname).
    #[arg(long)]
    meta_data: Option<PathBuf>,
    /// An SSH public key file (one key per line) to authorize for root (also under a stock cloud-init's
    /// `disable_root: true`); repeatable.
    #[arg(long)]
    ssh_key: Vec<PathBuf>,
    #[arg(long)]
    hostname: Option<String>,
    /// The seed volume to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Default)]
pub struct Inputs {
    pub user_data: Option<PathBuf>,
    pub meta_data: Option<PathBuf>,
    pub ssh_keys: Vec<PathBuf>,
    pub hostname: Option<String>,
}

/// The two files of the seed, as bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Files {
    pub user_data: Vec<u8>,
    pub meta_data: Vec<u8>,
}

/// Builds user-data and meta-data from what the user gave. Keys are read from their files by the caller.
pub fn compose(
    user_data: Option<Vec<u8>>,
    meta_data: Option<Vec<u8>>,
    keys: &[String],
    hostname: Option<&str>,
) -> Result<Files> {
    if let Some(h) = hostname {
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(Error::new(format!("'{h}' is not a valid hostname"))
                .hint("use letters, digits, '-' and '.'")
                .code(2));
        }
    }
    for k in keys {
        let kind = k.split_whitespace().next().unwrap_or("");
        let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        if !known || k.split_whitespace().count() < 2 {
            let shown: String = k.chars().take(40).collect();
            return Err(Error::new(format!("'{shown}' is not an SSH public key"))
                .hint("pass the .pub file, e.g. ~/.ssh/id_ed25519.pub")
                .code(2));
        }
    }
    let user_data = match user_data {
        Some(u) if keys.is_empty() => u,
        Some(u) => merge_keys(u, keys)?,
        None => keys_config(keys, false).into_bytes(),
    };
    let meta_data = match meta_data {
        Some(m) if hostname.is_none() => m,
        Some(_) => {
            return Err(Error::new("--hostname and --meta-data both given")
                .hint("put local-hostname into your meta-data")
                .code(2))
        }
        None => {
            let host = hostname.unwrap_or("nixos");
            // A stable instance-id per content: cloud-init reruns its per-instance modules only when it changes.
            let id = fnv64(&[user_data.as_slice(), host.as_bytes()].concat());
            format!("instance-id: iid-{id:016x}\nlocal-hostname: {host}\n").into_bytes()
        }
    };
    Ok(Files { user_data, meta_data })
}

/// The cloud-config that lets `keys` log in as root. `merging` adds the merge rule that appends our
/// lists to the user's and keeps every setting the user made (cloud-init's merge_how, read per part).
fn keys_config(keys: &[String], merging: bool) -> String {
    let mut u = String::from("#cloud-config\n");
    if merging {
        u.push_str("merge_how:\n  - name: list\n    settings: [append]\n  - name: dict\n    settings: [no_replace, recurse_list]\n");
    }
    if !keys.is_empty() {
        u.push_str("disable_root: false\nssh_authorized_keys:\n");
        for k in keys {
            u.push_str(&format!("  - {}\n", yaml_quote(k)));
        }
    }
    u
}

const BOUNDARY: &str = "==nixqimg-seed==";

/// The user's user-data and the keys as one MIME multipart, the user's part first. cloud-init types a
/// `text/plain` part by its first line (`#cloud-config`, `#!`, ...) as it does a whole user-data, and
/// base64 carries any bytes. Already-multipart and compressed user-data are refused: nesting them is
/// where cloud-init versions differ.
fn merge_keys(user: Vec<u8>, keys: &[String]) -> Result<Vec<u8>> {
    let head = String::from_utf8_lossy(&user[..user.len().min(512)]).to_ascii_lowercase();
    if user.starts_with(&[0x1f, 0x8b]) || head.starts_with("content-type:") || head.starts_with("mime-version:") {
        return Err(Error::new("--ssh-key cannot be merged into compressed or MIME user-data")
            .hint("put the key under ssh_authorized_keys in your user-data, with disable_root: false for root")
            .code(2));
    }
    let mut m = format!(
        "Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\nMIME-Version: 1.0\n\n\
         --{BOUNDARY}\nContent-Type: text/plain; charset=\"utf-8\"\nContent-Transfer-Encoding: base64\n\
         Content-Disposition: attachment; filename=\"user-data\"\n\n"
    );
    let b64 = base64(&user);
    for chunk in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        m.push('\n');
    }
    m.push_str(&format!(
        "--{BOUNDARY}\nContent-Type: text/cloud-config; charset=\"utf-8\"\n\
         Content-Disposition: attachment; filename=\"nixqimg-ssh-keys\"\n\n{}--{BOUNDARY}--\n",
        keys_config(keys, true)
    ));
    Ok(m.into_bytes())
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn fnv64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3))
}

/// Size of the FAT volume in KiB: the files plus room for FAT12's tables, at least 1 MiB.
pub fn volume_kib(files: &Files) -> u64 {
    let data = (files.user_data.len() + files.meta_data.len()) as u64;
    (data / 1024 * 2 + 1024).next_multiple_of(1024)
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Error::io(p, e))
}

/// Writes the seed volume to `out` (atomically: a temporary file beside it, renamed when complete).
pub fn make(inp: &Inputs, out: &Path) -> Result<()> {
    let mut keys = Vec::new();
    for f in &inp.ssh_keys {
        let text = String::from_utf8(read(f)?).map_err(|_| Error::new(format!("{}: not text", f.display())))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    if !inp.ssh_keys.is_empty() && keys.is_empty() {
        return Err(Error::new("the --ssh-key files hold no key").hint("pass the .pub file").code(2));
    }
    let user = inp.user_data.as_deref().map(read).transpose()?;
    let meta = inp.meta_data.as_deref().map(read).transpose()?;
    let files = compose(user, meta, &keys, inp.hostname.as_deref())?;

    let name = out.file_name().ok_or_else(|| Error::new(format!("{}: not a file name", out.display())).code(2))?;
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let res = write_volume(&tmp, &files).and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A FAT12 volume labelled CIDATA holding the two files, every byte a function of `files`.
fn write_volume(path: &Path, files: &Files) -> Result<()> {
    let fail = |e: std::io::Error| Error::new(format!("cannot write the seed volume {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(volume_kib(files) * 1024).map_err(fail)?;
    // The volume id follows the content, so the same inputs give the same volume.
    let id = fnv64(&[files.user_data.as_slice(), &files.meta_data].concat()) as u32;
    let opts = fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat12).volume_id(id).volume_label(LABEL);
    fatfs::format_volume(&mut f, opts).map_err(fail)?;
    label_entry(&mut f).map_err(fail)?;
    f.seek(SeekFrom::Start(0)).map_err(fail)?;
    {
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new().time_provider(&crate::image::esp::EPOCH_1980))
            .map_err(fail)?;
        let root = fs.root_dir();
        for (n, body) in [("user-data", &files.user_data), ("meta-data", &files.meta_data)] {
            let mut w = root.create_file(n).map_err(fail)?;
            w.write_all(body).map_err(fail)?;
            w.flush().map_err(fail)?;
        }
        drop(root);
        fs.unmount().map_err(fail)?;
    }
    f.sync_all().map_err(fail)
}

const LABEL: [u8; 11] = *b"CIDATA     ";

/// fatfs puts the label only into the boot sector; mkfs.vfat also writes it as the root directory's
/// first entry (attribute VOLUME_ID), which is where blkid and most readers look first.
fn label_entry(f: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::Read;
    let mut bpb = [0u8; 24];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut bpb)?;
    let bytes_per_sector = u64::from(u16::from_le_bytes([bpb[11], bpb[12]]));
    let reserved = u64::from(u16::from_le_bytes([bpb[14], bpb[15]]));
    let fats = u64::from(bpb[16]);
    let fat_sectors = u64::from(u16::from_le_bytes([bpb[22], bpb[23]]));
    let root = (reserved + fats * fat_sectors) * bytes_per_sector;
    let mut entry = [0u8; 32];
    entry[..11].copy_from_slice(&LABEL);
    entry[11] = 0x08;
    // The FAT epoch (1980-01-01 00:00) as the modification date, like every other entry here.
    entry[24..26].copy_from_slice(&0x0021u16.to_le_bytes());
    f.seek(SeekFrom::Start(root))?;
    f.write_all(&entry)
}

pub fn run(a: Args) -> Result<()> {
    make(&Inputs { user_data: a.user_data, meta_data: a.meta_data, ssh_keys: a.ssh_key, hostname: a.hostname }, &a.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOq me@laptop";

    #[test]
    fn keys_become_cloud_config_and_the_hostname_meta_data() {
        let f = compose(None, None, &[KEY.to_string()], Some("web-1")).unwrap();
        assert_eq!(
            String::from_utf8(f.user_data).unwrap(),
            format!("#cloud-config\ndisable_root: false\nssh_authorized_keys:\n  - \"{KEY}\"\n")
        );
        let m = String::from_utf8(f.meta_data).unwrap();
        assert!(m.starts_with("instance-id: iid-") && m.ends_with("\nlocal-hostname: web-1\n"), "{m}");
    }

    #[test]
    fn the_instance_id_follows_the_content() {
        let a = compose(None, None, &[], Some("a")).unwrap();
        assert_eq!(a, compose(None, None, &[], Some("a")).unwrap());
        assert_ne!(a.meta_data, compose(None, None, &[], Some("b")).unwrap().meta_data);
    }

    #[test]
    fn given_files_are_used_as_they_are() {
        let f = compose(Some(b"#!/bin/sh\necho hi\n".to_vec()), Some(b"instance-id: x\n".to_vec()), &[], None).unwrap();
        assert_eq!(f.user_data, b"#!/bin/sh\necho hi\n");
        assert_eq!(f.meta_data, b"instance-id: x\n");
    }

    #[test]
    fn conflicting_and_bad_inputs_are_usage_errors() {
        let e = compose(Some(b"\x1f\x8b\x08".to_vec()), None, &[KEY.into()], None).unwrap_err();
        assert_eq!((e.code, e.what.as_str()), (2, "--ssh-key cannot be merged into compressed or MIME user-data"));
        assert_eq!(compose(None, Some(vec![]), &[], Some("h")).unwrap_err().code, 2);
        assert!(compose(None, None, &["-----BEGIN OPENSSH PRIVATE KEY-----".into()], None)
            .unwrap_err()
            .what
            .contains("is not an SSH public key"));
        for h in ["", "-a", "a_b", "a..b", "a b"] {
            assert!(compose(None, None, &[], Some(h)).is_err(), "{h:?} accepted");
        }
    }

    #[test]
    fn user_data_and_keys_become_two_parts_the_users_first_and_byte_exact() {
        let user = b"#!/bin/sh\n\xff echo\n".to_vec();
        let f = compose(Some(user.clone()), None, &[KEY.into()], None).unwrap();
        let m = String::from_utf8(f.user_data).unwrap();
        assert!(m.starts_with("Content-Type: multipart/mixed; boundary=\"==nixqimg-seed==\"\n"), "{m}");
        let b64: String =
            m.split("filename=\"user-data\"\n\n").nth(1).unwrap().split("--").next().unwrap().replace('\n', "");
        assert_eq!(b64, "IyEvYmluL3NoCv8gZWNobwo=");
        assert!(m.contains("merge_how:\n  - name: list\n    settings: [append]\n"), "{m}");
        assert!(
            m.ends_with(&format!("disable_root: false\nssh_authorized_keys:\n  - \"{KEY}\"\n--==nixqimg-seed==--\n"))
        );
    }

    #[test]
    fn base64_pads_like_rfc4648() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn quotes_in_key_comments_stay_yaml() {
        let f = compose(None, None, &["ssh-rsa AAAA \"x\\y\"".into()], None).unwrap();
        assert!(String::from_utf8(f.user_data).unwrap().contains(r#"  - "ssh-rsa AAAA \"x\\y\"""#));
    }

    #[test]
    fn volume_is_at_least_a_mebibyte_and_grows_with_the_data() {
        let small = Files { user_data: vec![0; 10], meta_data: vec![] };
        assert_eq!(volume_kib(&small), 1024);
        let big = Files { user_data: vec![0; 3 << 20], meta_data: vec![] };
        assert!(volume_kib(&big) >= 6 * 1024);
    }
}
