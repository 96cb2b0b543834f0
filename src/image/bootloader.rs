//! `bootloader`: keeps the BIOS loader (SYSLINUX, see `bios`) in step with systemd-boot.
//!
//! `sync --esp DIR` regenerates `DIR/syslinux.cfg` from systemd-boot's `loader/loader.conf` and
//! `loader/entries/*.conf`, so every generation `nixos-rebuild` gives systemd-boot is bootable under
//! BIOS too. `nixos-module/bios-sync.sh` does the same in POSIX sh on the machine itself and must
//! write the same bytes (tests/bootloader_sync.rs holds them to it): any change to the rules here
//! goes into the script in the same commit.
//!
//! The rules, shared with the script:
//! - lines split on `\n`, a trailing `\r` dropped; leading blanks (space, tab) skipped; empty and `#`
//!   lines ignored; the key is the first word, the value the rest with outer blanks trimmed and one
//!   pair of surrounding double quotes removed (as systemd-boot does);
//! - entries: `title`, `version`, `linux` (last wins), `initrd` (each adds one), `options` (joined
//!   by one space); other keys ignored. Paths take `/` for `\` and get a leading `/`;
//! - order: newest first: by the last run of digits in the entry's id (numerically), then by id;
//! - default: loader.conf's `default` (id with or without `.conf`, `*` and `?` globs), else the first;
//! - timeout: loader.conf's `timeout` (digits only) seconds × 10 for SYSLINUX, capped at 35996;
//!   `menu-force` waits forever; absent, 0, anything else boots the default at once.
//!
//! Kernel parameters go to `APPEND` verbatim: SYSLINUX hands the rest of that line to the kernel
//! unchanged, so quotes mean to the kernel what they meant in systemd-boot's `options`. What SYSLINUX
//! cannot express is refused per entry instead of being mangled: blanks or commas in paths, blanks in
//! ids, a missing kernel or initrd. Such an entry is left out and reported on one line; the rest is
//! still written, and the exit status is 1.

use crate::error::{Error, Result};
use std::cmp::Ordering;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Regenerate the ESP's syslinux.cfg from systemd-boot's loader/entries/*.conf and loader.conf.
    Sync {
        /// The mounted ESP (or a copy of its files).
        #[arg(long)]
        esp: PathBuf,
    },
    /// Make a GPT disk image BIOS-bootable: SYSLINUX into its ESP, gptmbr.bin into its MBR.
    Install {
        /// The disk image (raw).
        #[arg(long)]
        disk: PathBuf,
        /// The x86_64 syslinux package root (nixpkgs' syslinux; `/` for Debian's syslinux + syslinux-common).
        #[arg(long)]
        syslinux: PathBuf,
        /// Timestamp for the files written into the FAT (default: $SOURCE_DATE_EPOCH, else now).
        #[arg(long)]
        source_date_epoch: Option<u64>,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Sub::Sync { esp } => sync(&esp),
        Sub::Install { disk, syslinux, source_date_epoch } => {
            let files = crate::image::bios::BiosFiles::from_syslinux(&syslinux)?;
            let mut f =
                std::fs::OpenOptions::new().read(true).write(true).open(&disk).map_err(|e| Error::io(&disk, e))?;
            let epoch = source_date_epoch.or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok()?.parse().ok());
            crate::image::bios::install(&mut f, &files, epoch)
                .map_err(|e| Error { what: format!("{}: {}", disk.display(), e.what), ..e })
        }
    }
}

/// One systemd-boot entry, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub title: Option<String>,
    pub version: Option<String>,
    pub linux: Option<String>,
    pub initrd: Vec<String>,
    pub options: Vec<String>,
}

/// loader.conf, the parts that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderConf {
    pub default: Option<String>,
    pub timeout: Option<String>,
}

/// `key value` lines the way systemd-boot reads them.
fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split('\n').filter_map(|line| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.trim_start_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (k, v) = match line.find([' ', '\t']) {
            Some(i) => (&line[..i], line[i..].trim_matches([' ', '\t'])),
            None => (line, ""),
        };
        let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') { &v[1..v.len() - 1] } else { v };
        Some((k, v))
    })
}

pub fn parse_entry(id: &str, text: &str) -> Entry {
    let mut e = Entry { id: id.to_string(), ..Entry::default() };
    for (k, v) in key_values(text) {
        match k {
            "title" => e.title = Some(v.to_string()),
            "version" => e.version = Some(v.to_string()),
            "linux" => e.linux = Some(v.to_string()),
            "initrd" => e.initrd.push(v.to_string()),
            "options" => e.options.push(v.to_string()),
            _ => {}
        }
    }
    e
}

pub fn parse_loader_conf(text: &str) -> LoaderConf {
    let mut c = LoaderConf::default();
    for (k, v) in key_values(text) {
        match k {
            "default" => c.default = Some(v.to_string()),
            "timeout" => c.timeout = Some(v.to_string()),
            _ => {}
        }
    }
    c
}

/// The last run of digits in an id, without leading zeros ("" if none): compared by length, then
/// bytes, it orders any size of number the way the sh script's `sort` does.
fn generation_key(id: &str) -> String {
    let b = id.as_bytes();
    let Some(end) = b.iter().rposition(u8::is_ascii_digit) else { return String::new() };
    let start = b[..end].iter().rposition(|c| !c.is_ascii_digit()).map_or(0, |i| i + 1);
    id[start..=end].trim_start_matches('0').to_string()
}

/// Newest first.
pub fn order(a: &Entry, b: &Entry) -> Ordering {
    let (ka, kb) = (generation_key(&a.id), generation_key(&b.id));
    kb.len().cmp(&ka.len()).then_with(|| kb.cmp(&ka)).then_with(|| a.id.as_bytes().cmp(b.id.as_bytes()))
}

/// `*` and `?` globs, as sh's `case` matches them.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

fn esp_path(p: &str) -> String {
    let p = p.replace('\\', "/");
    if p.starts_with('/') {
        p
    } else {
        format!("/{p}")
    }
}

/// Why an entry cannot go into syslinux.cfg, given which ESP paths exist.
pub fn check(e: &Entry, exists: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut why = Vec::new();
    let at = format!("loader/entries/{}.conf", e.id);
    if e.id.contains([' ', '\t']) {
        why.push(format!("{at}: the entry's name has a blank, which a SYSLINUX label cannot have"));
    }
    match &e.linux {
        None => why.push(format!("{at}: no linux line (SYSLINUX boots only Linux kernels)")),
        Some(l) => why.extend(check_path(&at, "kernel", l, exists)),
    }
    for i in &e.initrd {
        why.extend(check_path(&at, "initrd", i, exists));
        if i.contains(',') {
            why.push(format!("{at}: initrd {} has a comma, which SYSLINUX's INITRD list cannot hold", esp_path(i)));
        }
    }
    why
}

fn check_path(at: &str, what: &str, p: &str, exists: &dyn Fn(&str) -> bool) -> Vec<String> {
    let p = esp_path(p);
    if p.contains([' ', '\t']) {
        vec![format!("{at}: {what} {p} has a blank, which SYSLINUX paths cannot have")]
    } else if !exists(&p) {
        vec![format!("{at}: {what} {p} is missing from the ESP")]
    } else {
        Vec::new()
    }
}

/// SYSLINUX's longest TIMEOUT, in tenths of a second (just under an hour).
const MAX_TIMEOUT: u64 = 35996;

/// syslinux.cfg for the entries that passed `check`, in `order`.
pub fn render(conf: &LoaderConf, entries: &[Entry]) -> String {
    let default = conf
        .default
        .as_deref()
        .and_then(|d| {
            let d = d.strip_suffix(".conf").unwrap_or(d);
            entries.iter().find(|e| glob(d.as_bytes(), e.id.as_bytes()))
        })
        .or(entries.first());
    let (prompt, timeout) = match conf.timeout.as_deref() {
        Some("menu-force") => (1, 0),
        Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => match t.trim_start_matches('0') {
            "" => (0, 0),
            n if n.len() > 5 => (1, MAX_TIMEOUT),
            n => (1, n.parse::<u64>().map_or(MAX_TIMEOUT, |n| (n * 10).min(MAX_TIMEOUT))),
        },
        _ => (0, 0),
    };
    let mut s =
        String::from("# Written by nixqimg bootloader sync from loader/entries: changes here are overwritten.\n");
    s.push_str(&format!("SERIAL 0 115200\nPROMPT {prompt}\nTIMEOUT {timeout}\n"));
    if let Some(d) = default {
        s.push_str(&format!("DEFAULT {}\n", d.id));
    }
    for e in entries {
        let title = e.title.as_deref().filter(|t| !t.is_empty()).unwrap_or(&e.id);
        s.push_str(&format!("\nLABEL {}\n  MENU LABEL {title}", e.id));
        if let Some(v) = e.version.as_deref().filter(|v| !v.is_empty()) {
            s.push_str(&format!(" ({v})"));
        }
        s.push('\n');
        s.push_str(&format!("  LINUX {}\n", esp_path(e.linux.as_deref().unwrap_or_default())));
        if !e.initrd.is_empty() {
            let list: Vec<String> = e.initrd.iter().map(|i| esp_path(i)).collect();
            s.push_str(&format!("  INITRD {}\n", list.join(",")));
        }
        let append = e.options.join(" ");
        if !append.is_empty() {
            s.push_str(&format!("  APPEND {append}\n"));
        }
    }
    s
}

fn sync(esp: &Path) -> Result<()> {
    let dir = esp.join("loader/entries");
    let rd = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e).hint("--esp must be the ESP holding systemd-boot's loader/entries"))?;
    let mut entries = Vec::new();
    for d in rd {
        let d = d.map_err(|e| Error::io(&dir, e))?;
        let name = d.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".conf")) else { continue };
        let path = d.path();
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        entries.push(parse_entry(id, &String::from_utf8_lossy(&text)));
    }
    let conf_path = esp.join("loader/loader.conf");
    let conf = match std::fs::read(&conf_path) {
        Ok(t) => parse_loader_conf(&String::from_utf8_lossy(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => LoaderConf::default(),
        Err(e) => return Err(Error::io(&conf_path, e)),
    };
    entries.sort_by(order);
    let exists = |p: &str| esp.join(p.trim_start_matches('/')).is_file();
    let mut problems = Vec::new();
    let before = entries.len();
    entries.retain(|e| {
        let why = check(e, &exists);
        let ok = why.is_empty();
        problems.extend(why);
        ok
    });
    let dropped = before - entries.len();
    let mut err = std::io::stderr();
    for p in &problems {
        let _ = writeln!(err, "nixqimg: {p} (entry left out of syslinux.cfg)");
    }
    if entries.is_empty() {
        return Err(Error::new(format!("{}: no bootable entry, syslinux.cfg left as it was", dir.display()))
            .hint("run it after systemd-boot has written its entries"));
    }
    let out = esp.join("syslinux.cfg");
    let tmp = esp.join(".syslinux.cfg.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(render(&conf, &entries).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&out, e)
    })?;
    if !problems.is_empty() {
        return Err(Error::new(format!("{dropped} of {before} entries left out of {}", out.display()))
            .hint("see the lines above; BIOS boots only what syslinux.cfg lists"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_trimmed_and_unquoted_like_systemd_boot() {
        let e = parse_entry(
            "g",
            "# c\r\n  title  NixOS \t\r\noptions \"a b\"\noptions x=\"y z\"\nlinux \\EFI\\k\ninitrd a\ninitrd /b\nbogus 1\n",
        );
        assert_eq!(e.title.as_deref(), Some("NixOS"));
        assert_eq!(e.options, vec!["a b", "x=\"y z\""]);
        assert_eq!(esp_path(e.linux.as_deref().unwrap()), "/EFI/k");
        assert_eq!(e.initrd, vec!["a", "/b"]);
    }

    #[test]
    fn newest_generation_first_whatever_the_digits() {
        let mut v: Vec<Entry> = ["nixos-generation-9", "nixos-generation-10", "other", "nixos-generation-010x"]
            .iter()
            .map(|i| Entry { id: i.to_string(), ..Entry::default() })
            .collect();
        v.sort_by(order);
        let ids: Vec<&str> = v.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["nixos-generation-010x", "nixos-generation-10", "nixos-generation-9", "other"]);
    }

    #[test]
    fn default_matches_id_with_or_without_conf_and_globs() {
        let es: Vec<Entry> = ["nixos-generation-3", "nixos-generation-2"]
            .iter()
            .map(|i| Entry { id: i.to_string(), linux: Some("/k".into()), ..Entry::default() })
            .collect();
        let d = |s: &str| render(&LoaderConf { default: Some(s.into()), timeout: None }, &es);
        assert!(d("nixos-generation-2.conf").contains("DEFAULT nixos-generation-2\n"));
        assert!(d("nixos-generation-2").contains("DEFAULT nixos-generation-2\n"));
        assert!(d("nixos-*").contains("DEFAULT nixos-generation-3\n"));
        assert!(d("nope").contains("DEFAULT nixos-generation-3\n"));
    }

    #[test]
    fn timeouts_map_to_tenths_and_prompt() {
        let t = |s: Option<&str>| render(&LoaderConf { default: None, timeout: s.map(String::from) }, &[]);
        assert!(t(None).contains("PROMPT 0\nTIMEOUT 0\n"));
        assert!(t(Some("0")).contains("PROMPT 0\nTIMEOUT 0\n"));
        assert!(t(Some("5")).contains("PROMPT 1\nTIMEOUT 50\n"));
        assert!(t(Some("99999")).contains("PROMPT 1\nTIMEOUT 35996\n"));
        assert!(t(Some("menu-force")).contains("PROMPT 1\nTIMEOUT 0\n"));
        assert!(t(Some("menu-hidden")).contains("PROMPT 0\nTIMEOUT 0\n"));
        assert!(t(Some("+5")).contains("PROMPT 0\nTIMEOUT 0\n"));
        assert!(t(Some("0003")).contains("PROMPT 1\nTIMEOUT 30\n"));
        assert!(t(Some("123456789012345678901234")).contains("PROMPT 1\nTIMEOUT 35996\n"));
    }

    #[test]
    fn unbootable_entries_are_named() {
        let e = parse_entry("g 1", "linux /EFI/a b\ninitrd /x,y\n");
        let why = check(&e, &|_| true);
        assert_eq!(why.len(), 3, "{why:?}");
        let e = parse_entry("g", "initrd /i\n");
        let why = check(&e, &|p| p != "/i");
        assert!(why[0].contains("no linux line") && why[1].contains("initrd /i is missing"), "{why:?}");
    }
}
