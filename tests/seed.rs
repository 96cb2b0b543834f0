//! `nixqimg seed`: a NoCloud volume (FAT, label CIDATA) checked by reading it back with mtools the way
//! any other FAT reader would. That a guest kernel reads it is shown by tests/boot.rs.

#[macro_use]
mod boot_support;

use boot_support::{need, nixqimg, run, Tmp};
use std::path::{Path, PathBuf};
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
    assert_eq!(
        mtype(&out, "user-data"),
        format!("#cloud-config\ndisable_root: false\nssh_authorized_keys:\n  - \"{KEY}\"\n")
    );
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
fn the_same_inputs_give_the_same_bytes() {
    let t = Tmp::new("seed-same");
    std::fs::write(t.join("id.pub"), format!("{KEY}\n")).unwrap();
    let make = |name: &str| {
        let out = t.join(name);
        let (code, _, err) = nixqimg(&args!["seed", "--ssh-key", t.join("id.pub"), "--hostname", "h", "--out", out]);
        assert_eq!(code, 0, "{err}");
        std::fs::read(out).unwrap()
    };
    let a = make("a.img");
    // FAT stamps have two-second steps: a later second must not show.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let b = make("b.img");
    assert!(a == b, "two seeds from the same inputs differ");
}

/// Debian trixie's cloud-init (25.1), unpacked once; its own code decides what the seed does.
fn cloud_init() -> PathBuf {
    need("apt-get", "apt");
    let cache = PathBuf::from("/var/cache/nixqimg-tests/cloudinit");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs");
    run(Command::new(script).arg("trixie").arg(&cache).arg("cloud-init:amd64"));
    cache.join("root/cloud-init_amd64")
}

/// What stock cloud-init (Debian's cloud.cfg: disable_root: true) does for root with this seed.
fn stock_cloud_init(seed: &Path) -> serde_json::Value {
    let t = Tmp::new("seed-ci");
    let ud = t.join("user-data");
    std::fs::write(&ud, mtype(seed, "user-data")).unwrap();
    let check = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/cloud-init-keys");
    let out = run(Command::new(check).arg(cloud_init()).arg(&ud)).stdout;
    serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
}

#[test]
fn stock_cloud_init_lets_root_in_with_the_seeds_key() {
    need("mtype", "mtools");
    let t = Tmp::new("seed-root");
    std::fs::write(t.join("id.pub"), format!("{KEY}\n")).unwrap();
    let out = t.join("seed.img");
    let (code, _, err) = nixqimg(&args!["seed", "--ssh-key", t.join("id.pub"), "--out", out]);
    assert_eq!(code, 0, "{err}");
    let v = stock_cloud_init(&out);
    // A non-empty options field is the "Please login as the user ..." forced command.
    assert_eq!(v["root"], serde_json::json!({"user": "root", "keys": [KEY], "options": ""}), "{v}");
}

#[test]
fn a_key_merges_with_the_users_own_cloud_config_or_script() {
    need("mtype", "mtools");
    let t = Tmp::new("seed-merge");
    std::fs::write(t.join("k.pub"), format!("{KEY}\n")).unwrap();
    let own = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwnKey own@desk";
    std::fs::write(
        t.join("config"),
        format!("#cloud-config\nhostname: db-1\nssh_authorized_keys:\n  - {own}\nruncmd:\n  - [touch, /x]\n"),
    )
    .unwrap();
    std::fs::write(t.join("script"), "#!/bin/sh\necho hi > /run/hi\n").unwrap();

    let out = t.join("a.img");
    let (code, _, err) =
        nixqimg(&args!["seed", "--user-data", t.join("config"), "--ssh-key", t.join("k.pub"), "--out", out]);
    assert_eq!(code, 0, "{err}");
    let v = stock_cloud_init(&out);
    assert_eq!(v["parts"], serde_json::json!(["text/cloud-config", "text/cloud-config"]), "{v}");
    assert_eq!(v["user_config"]["hostname"], "db-1", "{v}");
    assert_eq!(v["user_config"]["runcmd"], serde_json::json!([["touch", "/x"]]), "{v}");
    assert_eq!(v["user_config"]["ssh_authorized_keys"], serde_json::json!([own, KEY]), "{v}");
    assert_eq!(v["root"]["options"], "", "{v}");

    let out = t.join("b.img");
    let (code, _, err) =
        nixqimg(&args!["seed", "--user-data", t.join("script"), "--ssh-key", t.join("k.pub"), "--out", out]);
    assert_eq!(code, 0, "{err}");
    let v = stock_cloud_init(&out);
    assert_eq!(v["parts"], serde_json::json!(["text/x-shellscript", "text/cloud-config"]), "{v}");
    assert_eq!(v["root"], serde_json::json!({"user": "root", "keys": [KEY], "options": ""}), "{v}");
}

#[test]
fn a_key_is_not_merged_into_mime_or_compressed_user_data() {
    let t = Tmp::new("seed-conflict");
    std::fs::write(t.join("u"), "Content-Type: multipart/mixed; boundary=x\nMIME-Version: 1.0\n\n--x--\n").unwrap();
    std::fs::write(t.join("k.pub"), format!("{KEY}\n")).unwrap();
    let (code, _, err) =
        nixqimg(&args!["seed", "--user-data", t.join("u"), "--ssh-key", t.join("k.pub"), "--out", t.join("s")]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "nixqimg: --ssh-key cannot be merged into compressed or MIME user-data \
         (put the key under ssh_authorized_keys in your user-data, with disable_root: false for root)\n"
    );
    assert!(!t.join("s").exists());
}
