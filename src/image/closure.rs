//! The system's closure with what the Nix database records for each path (NAR hash and size, deriver,
//! references), from nixpkgs' closureInfo (`store-paths` + `registration`) or from `nix-store`.
//! Parsing and hash conversion are pure; `from_closure_info`/`from_nix_store` are the edges.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    /// `sha256:<base16>`, the form Nix keeps in its database whatever form it was given in.
    pub nar_hash: String,
    pub nar_size: u64,
    pub deriver: Option<String>,
    pub references: Vec<String>,
}

/// Sorted by path, so that nothing downstream depends on the order the closure was listed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    pub paths: Vec<PathInfo>,
}

impl Closure {
    pub fn contains(&self, path: &str) -> bool {
        self.paths.binary_search_by(|p| p.path.as_str().cmp(path)).is_ok()
    }
}

/// Parses the `nix-store --load-db` / `--dump-db` format: per path, its lines `path`, `narHash`,
/// `narSize`, `deriver` (may be empty), the number of references, then the references.
pub fn parse_registration(text: &str) -> std::result::Result<Closure, String> {
    let mut lines = text.lines();
    let mut map = BTreeMap::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let mut next = |what: &str| lines.next().ok_or_else(|| format!("{path}: the record ends before its {what}"));
        let hash = next("NAR hash")?;
        let size = next("NAR size")?;
        let deriver = next("deriver")?;
        let count = next("reference count")?;
        let nar_size = size.parse().map_err(|_| format!("{path}: NAR size '{size}' is not a number"))?;
        let count: usize = count.parse().map_err(|_| format!("{path}: reference count '{count}' is not a number"))?;
        let mut references = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            references.push(next("references")?.to_owned());
        }
        references.sort();
        let nar_hash = normalize_hash(hash).map_err(|e| format!("{path}: {e}"))?;
        let deriver = (!deriver.is_empty()).then(|| deriver.to_owned());
        map.insert(path.to_owned(), PathInfo { path: path.to_owned(), nar_hash, nar_size, deriver, references });
    }
    if map.is_empty() {
        return Err("no store paths in it".into());
    }
    let closure = Closure { paths: map.into_values().collect() };
    for p in &closure.paths {
        if let Some(r) = p.references.iter().find(|r| !closure.contains(r)) {
            return Err(format!("{} refers to {r}, which is not in the closure", p.path));
        }
    }
    Ok(closure)
}

/// Turns `sha256:<hex>`, `sha256:<nix base32>`, `sha256-<base64>` or a bare hex/base32 digest (Nix 2.8's
/// `--dump-db` prints bare hex) into `sha256:<hex>`.
pub fn normalize_hash(h: &str) -> std::result::Result<String, String> {
    let bare = !h.contains(':') && !h.contains('-');
    let bytes = if let Some(rest) = h.strip_prefix("sha256:").or(bare.then_some(h)) {
        match rest.len() {
            64 => decode_hex(rest),
            52 => decode_nix32(rest),
            _ => None,
        }
    } else if let Some(rest) = h.strip_prefix("sha256-") {
        decode_base64(rest)
    } else {
        None
    };
    match bytes {
        Some(b) if b.len() == 32 => Ok(format!("sha256:{}", hex(&b))),
        _ => Err(format!("'{h}' is not a SHA-256 NAR hash")),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Nix's base32: its own alphabet, least significant 5-bit group last in the string.
fn decode_nix32(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = s.len() * 5 / 8;
    let mut out = vec![0u8; len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        if i < len {
            out[i] |= (digit << j) as u8;
        }
        let carry = digit >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// closureInfo's directory: `registration` has everything (`store-paths` is the same list).
pub fn from_closure_info(dir: &Path) -> Result<Closure> {
    let file = dir.join("registration");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::io(&file, e)
            .hint("--closure-info takes the output of nixpkgs' closureInfo { rootPaths = [ toplevel ]; }")
    })?;
    parse_registration(&text).map_err(|e| Error::new(format!("{}: {e}", file.display())))
}

/// Asks the Nix store that holds `toplevel` (nix-store honours NIX_STORE_DIR etc. from the environment).
pub fn from_nix_store(toplevel: &Path) -> Result<Closure> {
    let out = nix_store(&[std::ffi::OsStr::new("-qR"), toplevel.as_os_str()])?;
    let paths: Vec<PathBuf> = out.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    let mut args = vec![std::ffi::OsStr::new("--dump-db")];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let reg = nix_store(&args)?;
    parse_registration(&reg).map_err(|e| Error::new(format!("nix-store --dump-db: {e}")))
}

fn nix_store(args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new("nix-store").args(args).output().map_err(|e| {
        Error::new(format!("cannot run nix-store: {e}"))
            .hint("install Nix (Debian: nix-bin), or pass --closure-info from nixpkgs' closureInfo")
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(Error::new(format!("nix-store {} failed: {first}", args[0].to_string_lossy()))
            .hint("is --toplevel a path in this machine's Nix store (NIX_STORE_DIR)?"));
    }
    String::from_utf8(out.stdout).map_err(|_| Error::new("nix-store printed a path that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello") as Nix prints it: `nix-hash --type sha256 --flat [--base32]`, and `openssl dgst | base64`.
    const NIX32: &str = "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic";
    const HEX: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    const SRI: &str = "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=";

    #[test]
    fn hash_forms_agree() {
        assert_eq!(normalize_hash(NIX32).unwrap(), HEX);
        assert_eq!(normalize_hash(HEX).unwrap(), HEX);
        assert_eq!(normalize_hash(SRI).unwrap(), HEX);
        assert_eq!(normalize_hash(&HEX[7..]).unwrap(), HEX);
        assert_eq!(normalize_hash(&NIX32[7..]).unwrap(), HEX);
        assert!(normalize_hash("md5:abc").is_err());
        assert!(normalize_hash("sha256:xyz").is_err());
        assert!(normalize_hash(&NIX32.replace('0', "e")).is_err());
    }

    #[test]
    fn registration_is_sorted_whatever_the_input_order() {
        let a = format!("/s/bbb-b\n{HEX}\n10\n\n1\n/s/aaa-a\n/s/aaa-a\n{HEX}\n20\n/s/x.drv\n1\n/s/aaa-a\n");
        let c = parse_registration(&a).unwrap();
        assert_eq!(c.paths[0].path, "/s/aaa-a");
        assert_eq!(c.paths[0].deriver.as_deref(), Some("/s/x.drv"));
        assert_eq!(c.paths[1].deriver, None);
        assert_eq!(c.paths[1].references, ["/s/aaa-a"]);
        assert!(c.contains("/s/bbb-b") && !c.contains("/s/ccc"));
    }

    #[test]
    fn registration_errors_name_the_path() {
        assert_eq!(parse_registration("").unwrap_err(), "no store paths in it");
        let short = format!("/s/a\n{HEX}\n10\n\n2\n/s/a\n");
        assert!(parse_registration(&short).unwrap_err().contains("/s/a: the record ends"));
        let dangling = format!("/s/a\n{HEX}\n10\n\n1\n/s/zzz\n");
        assert!(parse_registration(&dangling).unwrap_err().contains("not in the closure"));
    }
}
