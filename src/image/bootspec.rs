//! Reads a NixOS system's bootspec (`<toplevel>/boot.json`, `org.nixos.bootspec.v1`): the kernel, initrd,
//! init and parameters the boot loader entry is made from. Parsing is pure; only `read` touches files.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

const V1: &str = "org.nixos.bootspec.v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootspec {
    pub system: String,
    pub init: PathBuf,
    pub initrd: PathBuf,
    pub kernel: PathBuf,
    pub kernel_params: Vec<String>,
    pub label: String,
    pub toplevel: PathBuf,
    /// `org.nixos.systemd-boot.sortKey`, "nixos" when absent (as NixOS's builder defaults it).
    pub sort_key: String,
}

pub fn read(toplevel: &Path) -> Result<Bootspec> {
    let file = toplevel.join("boot.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::io(&file, e)
            .hint("--toplevel must be a NixOS system (system.build.toplevel) built with bootspec, NixOS >= 23.05")
    })?;
    parse(&text).map_err(|e| Error::new(format!("{}: {e}", file.display())))
}

/// Parses boot.json text; the error names the field that is wrong.
pub fn parse(text: &str) -> std::result::Result<Bootspec, String> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let v1 = doc.get(V1).ok_or_else(|| format!("no \"{V1}\" object (only bootspec v1 is understood)"))?;
    let string = |k: &str| -> std::result::Result<String, String> {
        match v1.get(k) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("\"{k}\" is not a non-empty string")),
            None => Err(format!("\"{k}\" is missing")),
        }
    };
    let path = |k: &str| -> std::result::Result<PathBuf, String> {
        let s = string(k)?;
        if !s.starts_with('/') {
            return Err(format!("\"{k}\" is not an absolute path: {s}"));
        }
        Ok(PathBuf::from(s))
    };
    let kernel_params = match v1.get("kernelParams") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_owned).ok_or_else(|| "\"kernelParams\" holds a non-string".to_owned()))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("\"kernelParams\" is not an array".into()),
        None => return Err("\"kernelParams\" is missing".into()),
    };
    let sort_key = doc
        .get("org.nixos.systemd-boot")
        .and_then(|e| e.get("sortKey"))
        .and_then(|k| k.as_str())
        .unwrap_or("nixos")
        .to_owned();
    Ok(Bootspec {
        system: string("system")?,
        init: path("init")?,
        initrd: path("initrd")?,
        kernel: path("kernel")?,
        kernel_params,
        label: string("label")?,
        toplevel: path("toplevel")?,
        sort_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIXOS: &str = r#"{
      "org.nixos.bootspec.v1": {
        "init": "/nix/store/aaaa-nixos-system-x/init",
        "initrd": "/nix/store/bbbb-initrd-linux-6.6/initrd",
        "initrdSecrets": "/nix/store/cccc-append-initrd-secrets/bin/append-initrd-secrets",
        "kernel": "/nix/store/dddd-linux-6.6/bzImage",
        "kernelParams": ["console=ttyS0", "loglevel=4"],
        "label": "NixOS 24.05 (Linux 6.6)",
        "system": "x86_64-linux",
        "toplevel": "/nix/store/aaaa-nixos-system-x"
      },
      "org.nixos.specialisation.v1": {}
    }"#;

    #[test]
    fn reads_what_nixos_writes() {
        let b = parse(NIXOS).unwrap();
        assert_eq!(b.system, "x86_64-linux");
        assert_eq!(b.kernel, Path::new("/nix/store/dddd-linux-6.6/bzImage"));
        assert_eq!(b.kernel_params, ["console=ttyS0", "loglevel=4"]);
        assert_eq!(b.sort_key, "nixos");
        assert_eq!(b.toplevel, Path::new("/nix/store/aaaa-nixos-system-x"));
    }

    #[test]
    fn sort_key_comes_from_the_systemd_boot_extension() {
        let t = NIXOS.replacen(
            "\"org.nixos.specialisation.v1\"",
            "\"org.nixos.systemd-boot\": {\"sortKey\": \"a\"}, \"x\"",
            1,
        );
        assert_eq!(parse(&t).unwrap().sort_key, "a");
    }

    #[test]
    fn names_the_missing_or_bad_field() {
        assert!(parse("{}").unwrap_err().contains("org.nixos.bootspec.v1"));
        assert!(parse("[").unwrap_err().starts_with("not JSON"));
        let no_kernel = NIXOS.replace("\"kernel\":", "\"kernel_\":");
        assert_eq!(parse(&no_kernel).unwrap_err(), "\"kernel\" is missing");
        let relative = NIXOS.replace("\"/nix/store/aaaa-nixos-system-x/init\"", "\"init\"");
        assert!(parse(&relative).unwrap_err().contains("not an absolute path"));
        let bad_params = NIXOS.replace("[\"console=ttyS0\", \"loglevel=4\"]", "\"console=ttyS0\"");
        assert_eq!(parse(&bad_params).unwrap_err(), "\"kernelParams\" is not an array");
    }
}
