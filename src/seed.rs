//! `seed`: a NoCloud seed volume for cloud-init: a FAT filesystem labelled CIDATA holding `user-data`
//! and `meta-data`, attached to the guest as a plain virtio disk.
//!
//! FAT rather than ISO9660: cloud-init accepts either, and Debian's cloud kernels build both vfat and isofs
//! as modules, so neither is free in the guest; but FAT is what the ESP already needs (every UEFI image
//! loads it), and mkfs.vfat/mtools are tools nixqimg already uses, while ISO needs genisoimage or xorriso.
//! Composing the files is pure (`compose`); mkfs.vfat and mcopy are the edge.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// cloud-init user-data, used as given.
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// NoCloud meta-data, used as given (default: instance-id and local-hostname).
    #[arg(long)]
    meta_data: Option<PathBuf>,
    /// An SSH public key file (one key per line) to authorize for root; repeatable.
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
        Some(_) => {
            return Err(Error::new("--ssh-key and --user-data both given")
                .hint("put the key under ssh_authorized_keys in your user-data")
                .code(2))
        }
        None => {
            let mut u = String::from("#cloud-config\n");
            if !keys.is_empty() {
                u.push_str("ssh_authorized_keys:\n");
                for k in keys {
                    u.push_str(&format!("  - {}\n", yaml_quote(k)));
                }
            }
            u.into_bytes()
        }
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

fn tool(cmd: &mut Command, name: &str) -> Result<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| {
        let pkg = if name == "mkfs.vfat" { "dosfstools" } else { "mtools" };
        Error::new(format!("cannot run {name}: {e}")).hint(format!("install the Debian package {pkg}")).code(127)
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::new(format!("{name} failed: {}", err.lines().next().unwrap_or("").trim())));
    }
    Ok(())
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
    let staged = crate::qemu::TempDir::new("seed")?;
    let res = (|| {
        let _ = std::fs::remove_file(&tmp);
        // The volume id follows the content, so the same inputs give the same volume.
        let id = format!("{:08x}", fnv64(&[files.user_data.as_slice(), &files.meta_data].concat()) as u32);
        tool(
            Command::new("mkfs.vfat")
                .args(["-n", "CIDATA", "-i", &id, "-C"])
                .arg(&tmp)
                .arg(volume_kib(&files).to_string()),
            "mkfs.vfat",
        )?;
        for (n, body) in [("user-data", &files.user_data), ("meta-data", &files.meta_data)] {
            let p = staged.0.join(n);
            std::fs::write(&p, body).map_err(|e| Error::io(&p, e))?;
            tool(Command::new("mcopy").arg("-i").arg(&tmp).arg(&p).arg(format!("::/{n}")), "mcopy")?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
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
            format!("#cloud-config\nssh_authorized_keys:\n  - \"{KEY}\"\n")
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
        let e = compose(Some(vec![]), None, &[KEY.into()], None).unwrap_err();
        assert_eq!((e.code, e.what.as_str()), (2, "--ssh-key and --user-data both given"));
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
