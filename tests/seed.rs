//! `nixqimg seed`: a NoCloud volume (FAT, label CIDATA) checked by reading it back with mtools the way
//! any other FAT reader would. That a guest kernel reads it is shown by tests/boot.rs.

#[macro_use]
mod boot_support;

use boot_support::{need, nixqimg, run, Tmp};
use std::process::Command;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISeedTest me@laptop";

fn mtype(img: &std::path::Path, file: &str) -> String {
    String::from_utf8(run(Command::new("mtype").arg("-i").arg(img).arg(format!("::/{file}"))).stdout).unwrap()
}

#[test]
fn a_key_and_a_hostname_make_a_cidata_volume_with_cloud_config() {
    need("mtype", "mtools");
    let t = Tmp::new("seed-key");
    std::fs::write(t.join("id.pub"), format!("{KEY}\n\n# a comment\n")).unwrap();
    let out = t.join("seed.img");
    let (code, stdout, stderr) =
        nixqimg(&args!["seed", "--ssh-key", t.join("id.pub"), "--hostname", "web-1", "--out", out]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
    let label = run(Command::new("mlabel").arg("-s").arg("-i").arg(&out).arg("::")).stdout;
    assert_eq!(String::from_utf8_lossy(&label).trim(), "Volume label is CIDATA");
    assert_eq!(mtype(&out, "user-data"), format!("#cloud-config\nssh_authorized_keys:\n  - \"{KEY}\"\n"));
    let meta = mtype(&out, "meta-data");
    assert!(meta.starts_with("instance-id: iid-") && meta.ends_with("\nlocal-hostname: web-1\n"), "{meta}");
    // Nothing is left beside the output.
    let left: Vec<_> = std::fs::read_dir(&t.0).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn given_user_data_and_meta_data_are_copied_byte_for_byte() {
    need("mtype", "mtools");
    let t = Tmp::new("seed-files");
    let user = "#!/bin/sh\necho 'hello from user-data'\n";
    let meta = "instance-id: i-0123\nlocal-hostname: db\n";
    std::fs::write(t.join("u"), user).unwrap();
    std::fs::write(t.join("m"), meta).unwrap();
    let out = t.join("seed.img");
    let (code, _, err) = nixqimg(&args!["seed", "--user-data", t.join("u"), "--meta-data", t.join("m"), "--out", out]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mtype(&out, "user-data"), user);
    assert_eq!(mtype(&out, "meta-data"), meta);
}

#[test]
fn a_private_key_is_refused_and_nothing_is_written() {
    let t = Tmp::new("seed-bad");
    std::fs::write(t.join("id"), "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n").unwrap();
    let out = t.join("seed.img");
    let (code, _, err) = nixqimg(&args!["seed", "--ssh-key", t.join("id"), "--out", out]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "nixqimg: '-----BEGIN OPENSSH PRIVATE KEY-----' is not an SSH public key \
         (pass the .pub file, e.g. ~/.ssh/id_ed25519.pub)\n"
    );
    assert!(!out.exists());
}

#[test]
fn conflicting_options_are_usage_errors() {
    let t = Tmp::new("seed-conflict");
    std::fs::write(t.join("u"), "#cloud-config\n").unwrap();
    std::fs::write(t.join("k.pub"), format!("{KEY}\n")).unwrap();
    let (code, _, err) =
        nixqimg(&args!["seed", "--user-data", t.join("u"), "--ssh-key", t.join("k.pub"), "--out", t.join("s")]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "nixqimg: --ssh-key and --user-data both given (put the key under ssh_authorized_keys in your user-data)\n"
    );
}
