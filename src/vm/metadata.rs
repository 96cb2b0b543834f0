//! `run --metadata hetzner:DIR`: a stand-in for Hetzner Cloud's metadata service, so an image can meet
//! cloud-init's real DataSourceHetzner before it is uploaded. The guest sees what a Hetzner server sees:
//! SMBIOS manufacturer `Hetzner` with the instance id as serial number (the datasource checks that they
//! match), and HTTP at 169.254.169.254:80 serving `/hetzner/v1/metadata` (DIR/metadata, YAML),
//! `/hetzner/v1/userdata` (DIR/userdata) and `/hetzner/v1/metadata/KEY` (one top-level value of the
//! metadata, e.g. the `instance-id` cloud-init probes for connectivity).
//!
//! QEMU's user network forwards the guest's connections to that address (`guestfwd`), each one to a
//! fresh `nixqimg __metadata hetzner:DIR LOG` with the connection on stdin, stdout and stderr (so it
//! must never print): nothing listens on the host, and nothing outlives QEMU. Each request is appended
//! to LOG, which `run` prints when QEMU has stopped. QEMU accepts a guestfwd address only inside its user network, so the
//! network is 169.254.0.0/16 (QEMU 7.2: "Conflicting/invalid host:port in guest forwarding rule"
//! otherwise); the guest still gets its address by DHCP, as on Hetzner.

use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The address cloud-init's Hetzner datasource reads (cloudinit/sources/DataSourceHetzner.py).
pub const ADDRESS: &str = "169.254.169.254";
/// The user network that holds it: QEMU's host is 169.254.0.2, its DHCP range starts at .15.
pub const NETWORK: &str = "169.254.0.0/16";

/// A metadata service to stand in for, from `--metadata KIND:DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub dir: PathBuf,
    pub instance_id: String,
}

/// Reads `hetzner:DIR`: DIR/metadata must be there and name an `instance-id` (the SMBIOS serial).
pub fn parse(spec: &str) -> Result<Metadata> {
    let dir = match spec.split_once(':') {
        Some(("hetzner", d)) if !d.is_empty() => PathBuf::from(d),
        _ => {
            return Err(Error::new(format!("--metadata {spec}: unknown kind"))
                .hint("use --metadata hetzner:DIR, a directory with metadata and userdata")
                .code(2))
        }
    };
    let file = dir.join("metadata");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::new(format!("{}: {e}", file.display())).hint("put Hetzner's metadata YAML there").code(2)
    })?;
    let instance_id = value(&text, "instance-id").ok_or_else(|| {
        Error::new(format!("{}: no instance-id", file.display()))
            .hint("add a line `instance-id: 12345` (it becomes the SMBIOS serial, as on Hetzner)")
            .code(2)
    })?;
    if instance_id.contains(',') || instance_id.chars().any(char::is_control) {
        return Err(Error::new(format!("{}: instance-id '{instance_id}' holds a comma", file.display())).code(2));
    }
    Ok(Metadata { dir, instance_id })
}

/// One top-level scalar of a YAML mapping (`key: value`, quotes removed); nested values are not scalars.
pub fn value(yaml: &str, key: &str) -> Option<String> {
    yaml.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?.trim();
        let v = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v);
        let v = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')).unwrap_or(v);
        (!v.is_empty()).then(|| v.to_string())
    })
}

impl Metadata {
    /// The SMBIOS type 1 fields a Hetzner Cloud server has (dmidecode there: Hetzner / vServer).
    pub fn smbios(&self) -> String {
        format!("type=1,manufacturer=Hetzner,product=vServer,serial={}", self.instance_id)
    }

    /// The `-netdev user` options that route the guest's 169.254.169.254:80 to `exe __metadata`.
    pub fn netdev(&self, exe: &Path, log: &Path) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let cmd = format!(
            "{} __metadata {} {}",
            quote(&exe.to_string_lossy()),
            quote(&format!("hetzner:{}", self.dir.to_string_lossy())),
            quote(&log.to_string_lossy())
        );
        // -netdev takes comma-separated options: a comma in the command must be doubled.
        format!(",net={NETWORK},guestfwd=tcp:{ADDRESS}:80-cmd:{}", cmd.replace(',', ",,"))
    }
}

/// A response: status code and body.
pub fn respond(dir: &Path, method: &str, path: &str) -> (u16, Vec<u8>) {
    if method != "GET" && method != "HEAD" {
        return (405, b"only GET\n".to_vec());
    }
    let path = path.split('?').next().unwrap_or("");
    let read = |name: &str| std::fs::read(dir.join(name));
    match path.trim_end_matches('/') {
        "/hetzner/v1/metadata" => read("metadata").map(|b| (200, b)).unwrap_or((404, b"no metadata\n".to_vec())),
        // Hetzner answers an empty body when the server has no user data.
        "/hetzner/v1/userdata" => (200, read("userdata").unwrap_or_default()),
        p => match p.strip_prefix("/hetzner/v1/metadata/") {
            Some(key) if !key.contains('/') => {
                let md = String::from_utf8_lossy(&read("metadata").unwrap_or_default()).into_owned();
                match value(&md, key) {
                    Some(v) => (200, v.into_bytes()),
                    None => (404, format!("no {key}\n").into_bytes()),
                }
            }
            _ => (404, b"not found\n".to_vec()),
        },
    }
}

/// Serves one HTTP connection on `input`/`output` (QEMU's guestfwd gives each its own process), then
/// returns: reads at most 16 KiB of request head, answers once with `Connection: close`, appends
/// `METHOD PATH STATUS` to `log`.
pub fn serve(spec: &str, log: Option<&Path>, input: impl Read, mut output: impl Write) -> Result<()> {
    let dir = match spec.split_once(':') {
        Some(("hetzner", d)) => PathBuf::from(d),
        _ => return Err(Error::new(format!("__metadata {spec}: unknown kind")).code(2)),
    };
    let mut r = BufReader::new(input.take(16 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let (code, body) = respond(&dir, method, path);
    if let Some(log) = log {
        let line = format!("{method} {path} {code}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    write!(
        output,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        output.write_all(&body)?;
    }
    output.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(md: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nixqimg-md-{}-{}", std::process::id(), md.len()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("metadata"), md).unwrap();
        d
    }

    #[test]
    fn the_instance_id_becomes_the_smbios_serial_and_the_vendor_is_hetzner() {
        let d = dir("hostname: web-1\ninstance-id: 4711\npublic-keys: []\n");
        let m = parse(&format!("hetzner:{}", d.display())).unwrap();
        assert_eq!(m.smbios(), "type=1,manufacturer=Hetzner,product=vServer,serial=4711");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn unknown_kinds_and_metadata_without_an_instance_id_are_refused() {
        assert_eq!(
            parse("aws:/x").unwrap_err().to_string(),
            "--metadata aws:/x: unknown kind (use --metadata hetzner:DIR, a directory with metadata and userdata)"
        );
        let d = dir("hostname: web-1\n");
        let e = parse(&format!("hetzner:{}", d.display())).unwrap_err().to_string();
        assert!(e.contains("no instance-id"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn guestfwd_goes_to_nixqimg_itself_inside_a_link_local_user_network() {
        let m = Metadata { dir: "/srv/md,1".into(), instance_id: "1".into() };
        assert_eq!(
            m.netdev(Path::new("/usr/bin/nixqimg"), Path::new("/tmp/r/md.log")),
            ",net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-cmd:'/usr/bin/nixqimg' __metadata 'hetzner:/srv/md,,1' \
             '/tmp/r/md.log'"
        );
    }

    #[test]
    fn serves_metadata_userdata_and_single_keys_over_http() {
        let d = dir("instance-id: 4711\nhostname: \"web-1\"\nnetwork-config:\n  version: 1\n");
        std::fs::write(d.join("userdata"), "#cloud-config\n").unwrap();
        let get = |p: &str| {
            let mut out = Vec::new();
            serve(
                &format!("hetzner:{}", d.display()),
                None,
                format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(get("/hetzner/v1/metadata")
            .ends_with("\r\n\r\ninstance-id: 4711\nhostname: \"web-1\"\nnetwork-config:\n  version: 1\n"));
        assert!(get("/hetzner/v1/userdata").ends_with("Content-Length: 14\r\nConnection: close\r\n\r\n#cloud-config\n"));
        assert!(get("/hetzner/v1/metadata/instance-id").ends_with("\r\n\r\n4711"));
        assert!(get("/hetzner/v1/metadata/hostname").ends_with("\r\n\r\nweb-1"));
        assert!(get("/hetzner/v1/metadata/network-config").starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(get("/latest/meta-data").starts_with("HTTP/1.1 404 Not Found\r\n"));
        let _ = std::fs::remove_dir_all(d);
    }
}
