//! The Nix side, checked with the real Nix of this machine (Debian's nix-bin) and without nixpkgs:
//! every .nix file parses, every path a .nix file names exists, the flake's inputs and the outputs
//! that need no nixpkgs evaluate, the cloud image's pure decisions (nixos-module/cloud-lib.nix)
//! evaluate to what the module promises, and the exact argv the image derivation hands to
//! `nixqimg image` is accepted by the real binary. What needs nixpkgs is in the flake's `checks`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory removed on drop: the temp store, state and config Nix may touch, so nothing is
/// written under /nix (nix-instantiate as root otherwise creates /nix/var/nix/db).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nixqimg-nixfiles-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion under a deadline; a hung child is killed and the test fails.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nix-instantiate ARGS` with a private store and configuration; fails the test, naming the
/// package, when Nix is not installed.
fn nix_instantiate(args: &[&str]) -> Output {
    let probe = Command::new("nix-instantiate").arg("--version").output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "nix-instantiate is missing: install the Debian package nix-bin (listed in .ci/packages)"
    );
    let t = TempDir::new("nix");
    let conf = t.0.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("nix.conf"), "build-users-group =\nsubstituters =\n").unwrap();
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(args)
        .current_dir(repo())
        .env("NIX_STORE_DIR", t.0.join("store"))
        .env("NIX_STATE_DIR", t.0.join("state"))
        .env("NIX_LOG_DIR", t.0.join("log"))
        .env("NIX_CONF_DIR", &conf)
        .env("XDG_CACHE_HOME", t.0.join("cache"))
        .env("HOME", &t.0)
        .env_remove("NIX_PATH");
    run_with_timeout(cmd, Duration::from_secs(120))
}

/// Evaluates a Nix expression (relative paths from the repository root) strictly, as JSON.
fn eval_json(expr: &str) -> String {
    let out = nix_instantiate(&["--eval", "--strict", "--json", "-E", expr]);
    assert!(
        out.status.success(),
        "nix-instantiate --eval failed for\n{expr}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The error of an evaluation that must fail.
fn eval_error(expr: &str) -> String {
    let out = nix_instantiate(&["--eval", "--strict", "--json", "-E", expr]);
    assert!(
        !out.status.success(),
        "evaluation unexpectedly succeeded:\n{expr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `[["a","b"],["c"]]` of plain strings (no escapes: the paths here have none) into vectors.
fn split_json_string_lists(json: &str) -> Vec<Vec<String>> {
    assert!(!json.contains('\\'), "unexpected escape in {json}");
    let inner = json.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")).unwrap_or_else(|| panic!("{json}"));
    inner.split("],[").map(|list| list.split(',').map(|s| s.trim_matches('"').to_string()).collect()).collect()
}

/// Every .nix file of the repository, skipping build output, VCS data and fetched caches.
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') && !name.starts_with("target") && name != "result" {
                    walk(&p, out);
                }
            } else if ft.is_file() && name.ends_with(".nix") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&repo(), &mut v);
    v.sort();
    v
}

/// Parses one file; Err(message) when Nix rejects it.
fn parse(file: &Path) -> Result<String, String> {
    let out = nix_instantiate(&["--parse", file.to_str().unwrap()]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_nix_file_in_the_repository_parses() {
    let files = nix_files();
    for must in ["flake.nix", "nixos-module/cloud-image.nix", "nixos-module/image.nix", "nixos-module/cloud-lib.nix"] {
        assert!(files.contains(&repo().join(must)), "{must} is missing");
    }
    let bad: Vec<String> =
        files.iter().filter_map(|f| parse(f).err().map(|e| format!("{}: {}", f.display(), e.trim()))).collect();
    assert!(bad.is_empty(), "these .nix files do not parse:\n{}", bad.join("\n"));
}

#[test]
fn a_file_with_a_syntax_error_is_reported_with_its_line() {
    let t = TempDir::new("bad");
    let f = t.0.join("broken.nix");
    std::fs::write(&f, "{ a = 1;\n  b = ; }\n").unwrap();
    let err = parse(&f).expect_err("a broken file parsed");
    assert!(err.contains("syntax error") && err.contains(":2:"), "{err}");
}

/// Paths in Nix source (`./image.nix`, `${./bios-sync.sh}`) resolve at parse time to absolute ones:
/// collect those inside the repository from the parser's output.
fn repo_paths_named_in(parsed: &str) -> Vec<String> {
    let root = repo().display().to_string();
    let mut found = Vec::new();
    let mut rest = parsed;
    while let Some(i) = rest.find(root.as_str()) {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || "/._-+".contains(c))).unwrap_or(tail.len());
        found.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

/// Only what ships (the flake and nixos-module/): test fixtures may name files their tests put in
/// place at run time.
#[test]
fn every_path_a_shipped_nix_file_names_exists() {
    let mut missing = Vec::new();
    let shipped = nix_files()
        .into_iter()
        .filter(|f| f == &repo().join("flake.nix") || f.starts_with(repo().join("nixos-module")));
    for f in shipped {
        let Ok(parsed) = parse(&f) else { continue };
        for p in repo_paths_named_in(&parsed) {
            if !Path::new(&p).exists() {
                missing.push(format!("{} names {p}", f.display()));
            }
        }
    }
    assert!(missing.is_empty(), "missing files:\n{}", missing.join("\n"));
}

#[test]
fn the_path_scan_sees_a_missing_file() {
    let parsed = format!("{{ a = {}/nixos-module/not-there.nix; }}", repo().display());
    let found = repo_paths_named_in(&parsed);
    assert_eq!(found, [format!("{}/nixos-module/not-there.nix", repo().display())]);
    assert!(!Path::new(&found[0]).exists());
}

#[test]
fn the_flake_takes_upstream_nixpkgs_and_nothing_else() {
    let got = eval_json(
        r#"let f = import ./flake.nix; in {
             inputs = builtins.attrNames f.inputs;
             url = f.inputs.nixpkgs.url;
             args = builtins.functionArgs f.outputs;
           }"#,
    );
    assert_eq!(
        got,
        r#"{"args":{"nixpkgs":false,"self":false},"inputs":["nixpkgs"],"url":"github:NixOS/nixpkgs/nixos-26.05"}"#
    );
}

/// The flake's outputs evaluated for real with a nixpkgs that fails when touched: what does not
/// need nixpkgs (the output names, the module set) must evaluate, and does.
#[test]
fn the_flake_outputs_and_modules_evaluate_without_nixpkgs() {
    let got = eval_json(
        r#"let
             f = import ./flake.nix;
             o = f.outputs { self = o; nixpkgs = throw "this output needs nixpkgs"; };
             describe = m: if builtins.isPath m
               then { file = toString m; args = builtins.attrNames (builtins.functionArgs (import m)); }
               else { imports = map toString m.imports; };
           in {
             outputs = builtins.attrNames o;
             modules = builtins.mapAttrs (_: describe) o.nixosModules;
           }"#,
    );
    let root = repo().display().to_string();
    let want = format!(
        concat!(
            r#"{{"modules":{{"binfmt":{{"args":{BA},"file":"{r}/nixos-module/binfmt.nix"}},"#,
            r#""cloud-image":{{"args":["config","lib","modulesPath","pkgs"],"file":"{r}/nixos-module/cloud-image.nix"}},"#,
            r#""default":{{"args":{BA},"file":"{r}/nixos-module/binfmt.nix"}}}},"#,
            r#""outputs":["apps","checks","formatter","legacyPackages","lib","nixosConfigurations","nixosModules","overlays","packages"]}}"#
        ),
        r = root,
        BA = binfmt_module_args(),
    );
    assert_eq!(got, want);
}

/// The binfmt module belongs to another part of the project; here only that it is a NixOS module
/// function, whatever arguments it asks for (its own tests pin those).
fn binfmt_module_args() -> String {
    eval_json("builtins.attrNames (builtins.functionArgs (import ./nixos-module/binfmt.nix))")
}

#[test]
fn serial_console_follows_the_target() {
    let lib = "import ./nixos-module/cloud-lib.nix";
    assert_eq!(
        eval_json(&format!(r#"map ({lib}).serialConsole [ "x86_64-linux" "aarch64-linux" ]"#)),
        r#"["ttyS0","ttyAMA0"]"#
    );
    let err = eval_error(&format!(r#"({lib}).serialConsole "riscv64-linux""#));
    assert!(err.contains("no serial console known for riscv64-linux"), "{err}");
    assert_eq!(eval_json(&format!(r#"map ({lib}).biosDefault [ "x86_64-linux" "aarch64-linux" ]"#)), "[true,false]");
}

#[test]
fn esp_holds_every_kept_generation() {
    for system in ["x86_64-linux", "aarch64-linux"] {
        let per: u64 = eval_json(&format!(r#"(import ./nixos-module/cloud-lib.nix).perGenerationMiB "{system}""#))
            .parse()
            .unwrap();
        let mut last = 0;
        for limit in [1u64, 2, 5, 10, 30] {
            let size: u64 = eval_json(&format!(
                r#"(import ./nixos-module/cloud-lib.nix).espSizeMiB {{ system = "{system}"; configurationLimit = {limit}; }}"#
            ))
            .parse()
            .unwrap();
            // Room for the kept generations plus the one being installed, aligned, and growing
            // with the limit.
            assert!(size >= (limit + 1) * per, "{system} limit {limit}: {size} MiB");
            assert_eq!(size % 64, 0, "{system} limit {limit}: {size} MiB is not 64 MiB aligned");
            assert!(size > last, "{system}: ESP does not grow with the limit");
            // FAT32 needs at least 32 MiB and a cloud disk should not spend a tenth of 20 GiB on it.
            assert!((32..=4096).contains(&size), "{system} limit {limit}: {size} MiB");
            last = size;
        }
    }
    let err = eval_error(
        r#"(import ./nixos-module/cloud-lib.nix).espSizeMiB { system = "x86_64-linux"; configurationLimit = null; }"#,
    );
    assert!(err.contains("configurationLimit must be a positive integer"), "{err}");
}

/// The channel comes from an explicit name or URL, never from the version suffix: a flake sets
/// `.YYYYMMDD.shortRev` for a release branch and unstable alike, so the old guess gave an unstable
/// image `nixos-26.11`, a channel that does not exist yet.
#[test]
fn channel_is_a_name_or_url_given_never_a_guess_from_the_version() {
    let got = eval_json(
        r#"let l = import ./nixos-module/cloud-lib.nix; in map l.channelUrl [
             "nixos-26.05" "nixos-26.05-small" "nixos-unstable" "nixpkgs-unstable"
             "https://example.org/channels/mine"
           ]"#,
    );
    assert_eq!(
        got,
        concat!(
            r#"["https://nixos.org/channels/nixos-26.05","https://nixos.org/channels/nixos-26.05-small","#,
            r#""https://nixos.org/channels/nixos-unstable","https://nixos.org/channels/nixpkgs-unstable","#,
            r#""https://example.org/channels/mine"]"#
        )
    );
    for bad in [r#""26.05""#, r#"".20261130.abcdef0""#, "null"] {
        let err = eval_error(&format!("(import ./nixos-module/cloud-lib.nix).channelUrl {bad}"));
        assert!(err.contains("nixqimg cloud image:") && err.contains("channel"), "{bad}: {err}");
    }
}

/// A flake's channel is its nixpkgs input's branch, checked against the release that was locked:
/// a release input (26.05), an unstable input (whose lib says 26.11: no such channel yet), a
/// pre-release branch (nixos-26.11 in its beta), and an input declared as 26.05 that in fact
/// follows unstable (caught: the user must say).
#[test]
fn the_flake_channel_is_the_input_branch_checked_against_the_locked_release() {
    let ok = eval_json(
        r#"let f = (import ./nixos-module/cloud-lib.nix).flakeInputChannel; in [
             (f { url = "github:NixOS/nixpkgs/nixos-26.05"; release = "26.05"; })
             (f { url = "github:NixOS/nixpkgs/nixos-unstable"; release = "26.11"; })
             (f { url = "github:nixos/nixpkgs?ref=nixos-26.05-small"; release = "26.05"; })
             (f { url = "github:NixOS/nixpkgs/nixpkgs-unstable"; release = "26.11"; })
             (f { url = "github:NixOS/nixpkgs/nixos-26.11"; release = "26.11"; })
           ]"#,
    );
    // The last is a pre-release: the 26.11 branch during its beta, whose channel exists.
    assert_eq!(ok, r#"["nixos-26.05","nixos-unstable","nixos-26.05-small","nixpkgs-unstable","nixos-26.11"]"#);
    for (url, release, why) in [
        ("github:NixOS/nixpkgs/nixos-26.05", "26.11", "the locked nixpkgs is release 26.11"),
        ("github:NixOS/nixpkgs", "26.11", "names no branch"),
        ("github:NixOS/nixpkgs/master", "26.11", "is not a NixOS channel"),
    ] {
        let err = eval_error(&format!(
            r#"(import ./nixos-module/cloud-lib.nix).flakeInputChannel {{ url = "{url}"; release = "{release}"; }}"#
        ));
        assert!(err.contains(why) && err.contains("pass `channel` to mkCloudImage"), "{url} {release}: {err}");
    }
}

/// The flake's mkCloudImage hands the cloud image module that channel (as a default the
/// configuration may override), or the one it is given; evaluated with a stand-in nixpkgs whose
/// lib has only what the flake calls and whose nixosSystem returns its modules.
#[test]
fn mk_cloud_image_sets_the_channel_from_the_input_or_its_argument() {
    let channel = |release: &str, args: &str| {
        let expr = format!(
            r#"let
                 lib = {{
                   genAttrs = names: f: builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) names);
                   optionalAttrs = c: a: if c then a else {{ }};
                   mkDefault = v: {{ _type = "override"; priority = 1000; content = v; }};
                   trivial.release = "{release}";
                   nixosSystem = a: {{ inherit (a) modules; config = throw "no config here"; }};
                 }};
                 f = import ./flake.nix;
                 o = f.outputs {{ self = o; nixpkgs = {{ inherit lib; }}; }};
                 img = o.lib.mkCloudImage ({{ system = "aarch64-linux"; }} // {args});
                 sets = builtins.filter (m: builtins.isAttrs m && m ? nixqimg) img.modules;
               in map (m: m.nixqimg.cloudImage.channel) sets"#
        );
        expr
    };
    assert_eq!(
        eval_json(&channel("26.05", "{ }")),
        r#"[{"_type":"override","content":"nixos-26.05","priority":1000}]"#
    );
    assert_eq!(
        eval_json(&channel("26.11", r#"{ channel = "nixos-unstable"; }"#)),
        r#"[{"_type":"override","content":"nixos-unstable","priority":1000}]"#
    );
    let err = eval_error(&channel("26.11", "{ }"));
    assert!(err.contains("declared as nixos-26.05 but the locked nixpkgs is release 26.11"), "{err}");
}

/// The configuration.nix the image writes on first boot is a module that imports the copy of
/// nixos-module/ beside it and pins what the image was built with.
#[test]
fn the_written_configuration_reproduces_the_image() {
    let t = TempDir::new("etc-nixos");
    let text = eval_json(
        r#"(import ./nixos-module/cloud-lib.nix).configurationNix {
             bios = true; configurationLimit = 7; stateVersion = "26.05";
             channel = "https://nixos.org/channels/nixos-26.05";
           }"#,
    );
    let text: String = text.trim_matches('"').replace("\\n", "\n").replace("\\\"", "\"").replace("\\$", "$");
    std::fs::write(t.0.join("configuration.nix"), &text).unwrap();
    parse(&t.0.join("configuration.nix")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let m = eval_json(&format!(
        r#"let m = import {}/configuration.nix {{ }}; in m // {{ imports = map toString m.imports; }}"#,
        t.0.display()
    ));
    assert_eq!(
        m,
        format!(
            concat!(
                r#"{{"boot":{{"loader":{{"systemd-boot":{{"configurationLimit":7}}}}}},"imports":["{}/nixqimg/cloud-image.nix"],"#,
                r#""nixqimg":{{"cloudImage":{{"bios":{{"enable":true}},"channel":"https://nixos.org/channels/nixos-26.05"}}}},"#,
                r#""system":{{"installer":{{"channel":{{"enable":false}}}},"stateVersion":"26.05"}}}}"#
            ),
            t.0.display()
        )
    );
    assert!(text.contains("nix-channel --add https://nixos.org/channels/nixos-26.05 nixos"), "{text}");
}

/// A systemd-boot ESP as NixOS's installer leaves it: two generations, the newer one the default.
fn esp_tree(esp: &Path) {
    for d in ["loader/entries", "EFI/nixos"] {
        std::fs::create_dir_all(esp.join(d)).unwrap();
    }
    for g in [1, 2] {
        std::fs::write(esp.join(format!("EFI/nixos/kernel-{g}.efi")), b"k").unwrap();
        std::fs::write(esp.join(format!("EFI/nixos/initrd-{g}.efi")), b"i").unwrap();
        std::fs::write(
            esp.join(format!("loader/entries/nixos-generation-{g}.conf")),
            format!(
                "title NixOS\nversion Generation {g} NixOS 26.05\nlinux /EFI/nixos/kernel-{g}.efi\n\
                 initrd /EFI/nixos/initrd-{g}.efi\noptions init=/nix/store/x-nixos-system-{g}/init console=ttyS0,115200 \
                 msg=\"a b\"\nmachine-id 0123\nsort-key nixos\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(esp.join("loader/loader.conf"), "timeout 0\ndefault nixos-generation-2.conf\n").unwrap();
}

/// The exact command extraInstallCommands runs (cloud-lib's biosSyncCommand, with bash as NixOS's
/// runtimeShell) regenerates the BIOS menu on a real ESP tree, byte for byte what
/// `nixqimg bootloader sync` writes.
#[test]
fn the_module_runs_bios_sync_on_the_esp_as_nixqimg_would() {
    let t = TempDir::new("esp");
    let (a, b) = (t.0.join("a"), t.0.join("b"));
    esp_tree(&a);
    esp_tree(&b);
    let argv = eval_json(&format!(
        r#"(import ./nixos-module/cloud-lib.nix).biosSyncCommand {{
             shell = "bash"; script = "{}/nixos-module/bios-sync.sh"; esp = "{}"; }}"#,
        repo().display(),
        a.display()
    ));
    let argv: Vec<String> = split_json_string_lists(&format!("[{argv}]")).remove(0);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = Command::new(NIXQIMG);
    cmd.args(["bootloader", "sync", "--esp"]).arg(&b);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "nixqimg bootloader sync: {}", String::from_utf8_lossy(&out.stderr));
    let script = std::fs::read_to_string(a.join("syslinux.cfg")).expect("bios-sync.sh wrote no syslinux.cfg");
    let nixqimg = std::fs::read_to_string(b.join("syslinux.cfg")).unwrap();
    assert_eq!(script, nixqimg);
    // Both generations, the newer one the default, with its init= and quoted parameter.
    assert!(script.contains("/EFI/nixos/kernel-1.efi") && script.contains("/EFI/nixos/kernel-2.efi"), "{script}");
    assert!(script.contains("init=/nix/store/x-nixos-system-2/init console=ttyS0,115200 msg=\"a b\""), "{script}");
}

#[path = "image_support/mod.rs"]
mod image_support;

/// Debian's builds of the nixpkgs packages image.nix puts on PATH (same upstream programs).
fn debian_counterparts(nixpkgs_name: &str) -> &'static [&'static str] {
    match nixpkgs_name {
        // Debian 12 ships sfdisk in `fdisk`, apart from the rest of util-linux.
        "util-linux" => &["util-linux", "fdisk"],
        "e2fsprogs" => &["e2fsprogs"],
        "sqlite" => &["sqlite3"],
        "qemu-utils" => &["qemu-utils"],
        "mtools" => &["mtools"],
        other => panic!("image.nix runs nixpkgs' {other}: name its Debian counterpart here"),
    }
}

/// What a nixpkgs `runCommand` has on PATH before any nativeBuildInputs (stdenv's initial path).
const STDENV: &[&str] =
    &["coreutils", "findutils", "diffutils", "sed", "grep", "tar", "gzip", "bzip2", "xz-utils", "bash"];

/// A directory of links to every program the given Debian packages install, and nixqimg.
fn tool_dir(dir: &Path, debs: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(NIXQIMG, bin.join("nixqimg")).unwrap();
    for deb in debs {
        let out = Command::new("dpkg").args(["-L", deb]).output().expect("dpkg");
        assert!(out.status.success(), "the Debian package {deb} is not installed (listed in .ci/packages)");
        for f in String::from_utf8_lossy(&out.stdout).lines() {
            let p = Path::new(f);
            let in_bin = p.parent().is_some_and(|d| d.ends_with("bin") || d.ends_with("sbin"));
            if in_bin && !p.is_dir() && p.exists() {
                let _ = std::os::unix::fs::symlink(p, bin.join(p.file_name().unwrap()));
            }
        }
    }
    bin
}

/// What every image test here needs: the image tests' small NixOS-shaped system built by real Nix,
/// its closureInfo, and the argv image.nix hands to `nixqimg image` for a format and BIOS choice.
struct ImageCase {
    t: TempDir,
    ci: PathBuf,
    toplevel: PathBuf,
}

impl ImageCase {
    fn new(tag: &str) -> ImageCase {
        let store = image_support::store();
        let toplevel = image_support::system(&store, "cloud-tools", 0);
        let t = TempDir::new(tag);
        let ci = t.0.join("closure-info");
        image_support::closure_info(&store, &toplevel, &ci, false);
        std::fs::create_dir_all(t.0.join("out")).unwrap();
        ImageCase { t, ci, toplevel }
    }

    fn argv(&self, format: &str, bios: bool) -> Vec<String> {
        let json = eval_json(&format!(
            r#"(import ./nixos-module/cloud-lib.nix).imageArgs {{
                 closureInfo = "{}"; toplevel = "{}"; out = "{}/out/nixos.{format}";
                 format = "{format}"; bios = {bios}; espSizeMiB = 64; timeout = 0; }}"#,
            self.ci.display(),
            self.toplevel.display(),
            self.t.0.display()
        ));
        split_json_string_lists(&format!("[{json}]")).remove(0)
    }

    /// Runs the argv with only stdenv's tools, nixqimg and Debian's builds of `tools` on PATH, in an
    /// empty environment like Nix's sandbox.
    fn build(&self, argv: &[String], tools: &[&str]) -> Output {
        let mut debs: Vec<&str> = STDENV.to_vec();
        for tool in tools {
            debs.extend_from_slice(debian_counterparts(tool));
        }
        let bin = tool_dir(&self.t.0, &debs);
        let mut cmd = Command::new(bin.join("nixqimg"));
        // In the Nix build the BIOS loader's files come from the closure (system.extraDependencies);
        // this closure has none, so they come from Debian's syslinux.
        cmd.args(argv)
            .args(["--syslinux", "/"])
            .env_clear()
            .env("PATH", &bin)
            .env("HOME", &self.t.0)
            .env("TMPDIR", &self.t.0);
        run_with_timeout(cmd, Duration::from_secs(300))
    }
}

fn image_tools() -> Vec<String> {
    split_json_string_lists(&format!("[{}]", eval_json("(import ./nixos-module/cloud-lib.nix).imageTools"))).remove(0)
}

/// Every variant the module can ask for (qcow2 or raw, UEFI or hybrid) builds from the exact argv
/// image.nix passes, with image.nix's tools, and is the format it claims.
#[test]
fn nixqimg_image_builds_every_variant_the_derivation_asks_for() {
    let case = ImageCase::new("variants");
    let tools = image_tools();
    let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
    for format in ["qcow2", "raw"] {
        for bios in [true, false] {
            let argv = case.argv(format, bios);
            assert_eq!(argv[0], "image", "{argv:?}");
            let out = case.build(&argv, &tools);
            assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
            let file = case.t.0.join(format!("out/nixos.{format}"));
            let info = Command::new("qemu-img").arg("info").arg(&file).output().expect("qemu-img (qemu-utils)");
            let info = String::from_utf8_lossy(&info.stdout);
            assert!(info.contains(&format!("file format: {format}")), "{argv:?}:\n{info}");
            std::fs::remove_file(&file).unwrap();
        }
    }
}

/// Without each of image.nix's tools the build fails on that tool: the list has nothing dead in it
/// (and the test above shows it lacks nothing).
#[test]
fn every_tool_image_nix_names_is_needed() {
    let case = ImageCase::new("tools");
    let tools = image_tools();
    let argv = case.argv("qcow2", true);
    for without in &tools {
        let rest: Vec<&str> = tools.iter().filter(|t| *t != without).map(String::as_str).collect();
        let out = case.build(&argv, &rest);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nixqimg image did not need {without}: drop it from imageTools");
        assert!(err.contains("cannot run"), "without {without}, nixqimg image failed for another reason: {err}");
        assert!(!case.t.0.join("out/nixos.qcow2").exists(), "without {without}: an image was written anyway");
    }
}

/// A stand-in for the few parts of nixpkgs that package.nix and image.nix call, for evaluating the
/// real files here (CI has Nix but no nixpkgs). `qemu-user` carries the configureFlags and
/// buildInputs nixpkgs' pkgs/applications/virtualization/qemu/default.nix (qemu 10.1.2) gives a
/// static userOnly build, and `overrideAttrs` returns a new package (a new store path) with the
/// function applied to the old attributes, as stdenv's does. `buildRustPackage` and `runCommand`
/// return their arguments, so a test reads what the files asked for.
const NIXPKGS_STAND_IN: &str = r#"
system:
let
  lib = {
    elem = builtins.elem;
    importTOML = f: builtins.fromTOML (builtins.readFile f);
    importJSON = f: builtins.fromJSON (builtins.readFile f);
    fileset = { unions = l: l; toSource = _: "stand-in-source"; };
    optionalAttrs = c: a: if c then a else { };
    optionalString = c: s: if c then s else "";
    licenses.mit = "mit";
    platforms.linux = [ ];
    systems.elaborate = p: if builtins.isString p then { system = p; } else p;
    getBin = p: p;
    escapeShellArgs = map (a: "'${a}'");
  };
  drv = name: attrs: attrs // { inherit name; outPath = "/nix/store/${builtins.hashString "md5" name}-${name}"; };
  mkQemu = n: attrs: drv "qemu-user-10.1.2${n}" attrs // {
    overrideAttrs = f: mkQemu "${n}-overridden" (attrs // f attrs);
  };
  qemu-user = mkQemu "" {
    pname = "qemu-user";
    configureFlags = [ "--disable-strip" "--enable-gnutls" "--disable-docs" "--disable-tools"
      "--localstatedir=/var" "--sysconfdir=/etc" "--cross-prefix=" "--disable-guest-agent"
      "--disable-plugins" "--disable-install-blobs" "--disable-system" "--static" ];
    buildInputs = map (p: drv p { pname = p; }) [ "glib" "gnutls" "zlib" ];
  };
  pkgsStatic = {
    inherit lib qemu-user;
    stdenv.hostPlatform.system = system;
    rustPlatform.buildRustPackage = attrs: drv "nixqimg" attrs;
  };
  pkgs = pkgsStatic // {
    inherit pkgsStatic;
    callPackage = fn: args: let f = import fn; in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    closureInfo = a: drv "closure-info" a;
    runCommand = name: env: script: drv name (env // { inherit script; });
  } // builtins.listToAttrs (map (n: { name = n; value = drv n { pname = n; }; })
         [ "util-linux" "e2fsprogs" "sqlite" "qemu-utils" "mtools" ]);
in { inherit pkgs qemu-user; }
"#;

/// What package.nix's default qemu is on each build machine: nixpkgs' pkgsStatic.qemu-user
/// unchanged on x86_64; on aarch64 the same with both upstream fixes (no gnutls/nettle:
/// NixOS/nixpkgs#464805; --disable-pie: #366902, #500039), everything else of qemu's kept in order.
#[test]
fn the_static_qemu_per_build_machine_carries_the_aarch64_fixes() {
    let q = |system: &str, what: &str| {
        eval_json(&format!(
            r#"let s = ({NIXPKGS_STAND_IN}) "{system}";
                   n = s.pkgs.callPackage ./nixos-module/package.nix {{ }};
                   q = n.passthru.qemu;
               in {what}"#
        ))
    };
    // x86_64: the very package nixpkgs has (the same store path), qemu's own flags.
    assert_eq!(q("x86_64-linux", "q.outPath == s.qemu-user.outPath"), "true");
    assert_eq!(q("x86_64-linux", "n.env.NIXQIMG_QEMU_DIR == \"${s.qemu-user}/bin\""), "true");
    // aarch64: a new package, qemu's flags without --enable-gnutls, then the three fixes.
    assert_eq!(q("aarch64-linux", "q.outPath != s.qemu-user.outPath"), "true");
    assert_eq!(
        q("aarch64-linux", "q.configureFlags"),
        concat!(
            r#"["--disable-strip","--disable-docs","--disable-tools","--localstatedir=/var","--sysconfdir=/etc","#,
            r#""--cross-prefix=","--disable-guest-agent","--disable-plugins","--disable-install-blobs","--disable-system","#,
            r#""--static","--disable-gnutls","--disable-nettle","--disable-pie"]"#
        )
    );
    assert_eq!(q("aarch64-linux", "map (p: p.pname) q.buildInputs"), r#"["glib","zlib"]"#);
    // The binary is built against the fixed qemu, not nixpkgs' one.
    assert_eq!(q("aarch64-linux", "n.env.NIXQIMG_QEMU_DIR == \"${q}/bin\""), "true");
    // What the decision names, per system (binfmt-lib.nix): only aarch64 gets fixes.
    assert_eq!(
        eval_json(
            r#"let l = import ./nixos-module/binfmt-lib.nix; in
               map (s: l.staticQemuFixes s != null) [ "x86_64-linux" "aarch64-linux" ]"#
        ),
        "[false,true]"
    );
}

/// The image outputs depend on no qemu-user at all: `nixqimg image` runs nothing foreign, and an
/// aarch64 build machine cannot build nixpkgs' static one. Its only qemu is qemu-img (qemu-utils,
/// for the qcow2 conversion), which the test above of imageTools shows it needs.
#[test]
fn the_image_derivation_uses_a_nixqimg_without_qemu_user() {
    for system in ["x86_64-linux", "aarch64-linux"] {
        let got = eval_json(&format!(
            r#"let s = ({NIXPKGS_STAND_IN}) "{system}";
                   config = {{
                     nixqimg.cloudImage = {{ format = "qcow2"; espSizeMiB = 448; bios.enable = false; }};
                     system.build.toplevel = "/nix/store/00000000000000000000000000000000-nixos-system";
                     system.nixos.label = "26.05";
                     nixpkgs.hostPlatform = "{system}";
                     boot.loader.timeout = 0;
                   }};
                   img = import ./nixos-module/image.nix {{ inherit (s) pkgs; inherit config; }};
                   names = map (p: p.name) img.nativeBuildInputs;
                   nixqimg = builtins.head img.nativeBuildInputs;
               in {{
                 inherit names;
                 qemuDir = nixqimg.env ? NIXQIMG_QEMU_DIR;
                 qemu = nixqimg.passthru.qemu;
               }}"#
        ));
        assert_eq!(
            got,
            r#"{"names":["nixqimg","util-linux","e2fsprogs","sqlite","qemu-utils","mtools"],"qemu":null,"qemuDir":false}"#,
            "{system}"
        );
    }
}

/// A Nix string from `--eval --json` as its text (the escapes Nix's JSON printer uses).
fn json_string(json: &str) -> String {
    let inner = json.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or_else(|| panic!("{json}"));
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => panic!("dangling escape in {json}"),
        }
    }
    out
}

/// nixpkgs' install-systemd-boot.sh (nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix,
/// commit 01e499cec163a442f5edeffa7e618171002cc01e) is `#!runtimeShell`, `systemd-boot "$@"`, then
/// extraInstallCommands, no `set -e`. The same script here, under bash, with a first step and a
/// BIOS sync that exit as told and a later module's extra command after the cloud image's: a
/// failure of either step is the script's exit status, and a failed install skips the sync.
#[test]
fn the_install_script_fails_when_systemd_boot_or_the_bios_sync_fails() {
    let t = TempDir::new("install");
    let marker = t.0.join("synced");
    let sync = t.0.join("bios-sync");
    let commands = json_string(&eval_json(&format!(
        r#"(import ./nixos-module/cloud-lib.nix).installCommands {{ biosSync = "{}"; }}"#,
        sync.display()
    )));
    for (first, synced, want, want_synced) in [(0, 0, 0, true), (1, 0, 1, false), (0, 3, 3, true), (2, 5, 2, false)] {
        let _ = std::fs::remove_file(&marker);
        std::fs::write(&sync, format!("#!/bin/sh\ntouch '{}'\nexit {synced}\n", marker.display())).unwrap();
        let step = t.0.join("systemd-boot");
        std::fs::write(&step, format!("#!/bin/sh\nexit {first}\n")).unwrap();
        let script = t.0.join("install-systemd-boot.sh");
        std::fs::write(&script, format!("#!/bin/bash\n{} \"$@\"\n{commands}\ntrue\n", step.display())).unwrap();
        for f in [&sync, &step, &script] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg("/nix/var/nix/profiles/system");
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(want),
            "systemd-boot exit {first}, bios sync exit {synced}:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&script).unwrap()
        );
        assert_eq!(marker.exists(), want_synced, "systemd-boot exit {first}: did the sync run?");
        if first != 0 {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("the systemd-boot install failed (exit"), "{err}");
        }
    }
}

/// nixpkgs' qemu-backed binfmt systems (nixos/lib/binfmt-magics.nix, commit
/// 8bccf164c099d99f7d4e1729f618ebb1001d464e) and the qemuArch nixpkgs' lib/systems/default.nix
/// gives each: binfmt.nix calls `wrapQemuBinfmtP "qemu-${qemuArch}-binfmt-P"` for them.
const NIXPKGS_QEMU_ARCH: &[(&str, &str)] = &[
    ("armv6l-linux", "arm"),
    ("armv7l-linux", "arm"),
    ("aarch64-linux", "aarch64"),
    ("aarch64_be-linux", "aarch64"),
    ("i386-linux", "i386"),
    ("i486-linux", "i386"),
    ("i586-linux", "i386"),
    ("i686-linux", "i386"),
    ("x86_64-linux", "x86_64"),
    ("alpha-linux", "alpha"),
    ("sparc64-linux", "sparc64"),
    ("sparc-linux", "sparc"),
    ("powerpc-linux", "ppc"),
    ("powerpc64-linux", "ppc64"),
    ("powerpc64le-linux", "ppc64le"),
    ("mips-linux", "mips"),
    ("mipsel-linux", "mipsel"),
    ("mips64-linux", "mips64"),
    ("mips64el-linux", "mips64el"),
    ("mips64-linuxabin32", "mipsn32"),
    ("mips64el-linuxabin32", "mipsn32el"),
    ("riscv32-linux", "riscv32"),
    ("riscv64-linux", "riscv64"),
    ("loongarch64-linux", "loongarch64"),
    ("s390x-linux", "s390x"),
];

/// The overlay (binfmt.nix, overlay = true) answers nixpkgs' wrapQemuBinfmtP only for the qemus in
/// nixqimg's arch table and hands every other call to nixpkgs' own wrapper: the real overlay
/// function, called as nixpkgs' binfmt.nix calls it, with stand-ins for final and prev.
#[test]
fn the_overlay_replaces_wrappers_only_for_qemus_in_the_arch_table() {
    let facts: Vec<String> = NIXPKGS_QEMU_ARCH.iter().map(|(s, a)| format!(r#"{{ s = "{s}"; a = "{a}"; }}"#)).collect();
    let got = eval_json(&format!(
        r#"let
             l = import ./nixos-module/binfmt-lib.nix;
             final = {{ runCommand = name: env: script: {{ by = "nixqimg"; inherit name script; }}; }};
             prev = {{ wrapQemuBinfmtP = name: emulator: {{ by = "nixpkgs"; inherit name emulator; }}; }};
             w = (l.wrapQemuBinfmtPOverlay "/nix/store/00000000000000000000000000000000-nixqimg/bin/nixqimg" final prev).wrapQemuBinfmtP;
             call = f: w "qemu-${{f.a}}-binfmt-P" "/nix/store/00000000000000000000000000000000-qemu-user/bin/qemu-${{f.a}}";
             facts = [ {} ];
             results = map (f: {{ inherit (f) s; r = call f; }}) facts;
             served = map (x: x.s) (builtins.filter (x: x.r.by == "nixqimg") results);
             kept = map (x: x.s) (builtins.filter (x: x.r.by == "nixpkgs") results);
             tableSystems = map (e: e.system) l.table.systems;
             # Every system of the table is served under the name nixpkgs uses for it.
             tableServed = builtins.all (s: builtins.elem s served) tableSystems;
             # A served wrapper is nixqimg under the wrapper's name; a kept one got nixpkgs' arguments.
             one = call {{ a = "aarch64"; }};
             other = call {{ a = "riscv32"; }};
           in {{
             inherit kept tableServed;
             link = builtins.match ".*ln -s /nix/store/[^ ]*-nixqimg/bin/nixqimg [$]out/bin/qemu-aarch64-binfmt-P.*" one.script != null;
             otherArgs = [ other.name other.emulator ];
           }}"#,
        facts.join(" ")
    ));
    assert_eq!(
        got,
        concat!(
            r#"{"kept":["alpha-linux","sparc64-linux","sparc-linux","powerpc-linux","powerpc64-linux","mips-linux","#,
            r#""mipsel-linux","mips64-linux","mips64-linuxabin32","mips64el-linuxabin32","riscv32-linux"],"link":true,"#,
            r#""otherArgs":["qemu-riscv32-binfmt-P","/nix/store/00000000000000000000000000000000-qemu-user/bin/qemu-riscv32"],"#,
            r#""tableServed":true}"#
        )
    );
}

/// Under read-only pkgs (nixos/modules/misc/nixpkgs/read-only.nix, commit
/// 196f6a812b310e3179afcf48bf2907853246dcad: options pkgs, config, overlays, hostPlatform,
/// buildPlatform) the module must not define nixpkgs.overlays; the ordinary module
/// (nixos/modules/misc/nixpkgs.nix, commit 026ffb9e7abfb4626926cc252fa69bcba85960ef) also declares
/// localSystem, crossSystem and system, which is how binfmt.nix tells them apart.
#[test]
fn the_overlay_is_only_offered_to_writable_pkgs() {
    let got = eval_json(
        r#"let l = import ./nixos-module/binfmt-lib.nix; o = n: builtins.listToAttrs (map (x: { name = x; value = { }; }) n); in [
             (l.pkgsAreWritable { nixpkgs = o [ "pkgs" "config" "overlays" "hostPlatform" "buildPlatform" "localSystem" "crossSystem" "system" ]; })
             (l.pkgsAreWritable { nixpkgs = o [ "pkgs" "config" "overlays" "hostPlatform" "buildPlatform" ]; })
           ]"#,
    );
    assert_eq!(got, "[true,false]");
}

/// Whether a binfmt_misc magic/mask pair (the `\xNN` text of a registration) matches a file's
/// first bytes, as the kernel compares them.
fn binfmt_matches(magic: &str, mask: &str, file: &Path) -> bool {
    let bytes = |s: &str| -> Vec<u8> {
        s.split("\\x")
            .filter(|p| !p.is_empty())
            .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{s}")))
            .collect()
    };
    let (magic, mask) = (bytes(magic), bytes(mask));
    assert_eq!(magic.len(), mask.len());
    let head = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    head.len() >= magic.len() && magic.iter().zip(&mask).zip(&head).all(|((m, k), h)| h & k == m & k)
}

/// A taken-over nixpkgs registration matches what nixqimg's table matches, checked against real
/// ELF files: i686 from Debian's libc6-i386 (its loader, e_machine EM_386 as every i686 toolchain
/// writes it), x86_64 from this machine's coreutils. nixpkgs' own i686-linux magic
/// (nixos/lib/binfmt-magics.nix, commit 8bccf164c099d99f7d4e1729f618ebb1001d464e) says e_machine
/// 0x06 (EM_486) and matches neither: an entry that kept it served no real i686 program.
#[test]
fn a_taken_over_entry_matches_real_i686_and_x86_64_programs() {
    let i686 = Path::new("/usr/lib32/ld-linux.so.2");
    assert!(
        i686.exists(),
        "{} is missing: install the Debian package libc6-i386 (listed in .ci/packages)",
        i686.display()
    );
    let x86_64 = std::fs::canonicalize("/bin/true").unwrap();
    let m = |system: &str| -> (String, String) {
        let field = |f: &str| {
            json_string(&eval_json(&format!(
                r#"((import ./nixos-module/binfmt-lib.nix).takeOverMatch "{system}").{f}"#
            )))
        };
        (field("magicOrExtension"), field("mask"))
    };
    let (i_magic, i_mask) = m("i686-linux");
    let (x_magic, x_mask) = m("x86_64-linux");
    assert!(binfmt_matches(&i_magic, &i_mask, i686), "i686 take-over {i_magic} misses a real i686 ELF");
    assert!(!binfmt_matches(&i_magic, &i_mask, &x86_64), "i686 take-over matches an x86_64 ELF");
    assert!(binfmt_matches(&x_magic, &x_mask, &x86_64), "x86_64 take-over {x_magic} misses a real x86_64 ELF");
    assert!(!binfmt_matches(&x_magic, &x_mask, i686), "x86_64 take-over matches an i686 ELF");
    // The magic nixpkgs' entry had before the take-over replaced it.
    let nixpkgs_i686 = (
        r"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x06\x00".replace("ELF", r"\x45\x4c\x46"),
        r"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    );
    assert!(!binfmt_matches(&nixpkgs_i686.0, nixpkgs_i686.1, i686));
    assert!(!binfmt_matches(&nixpkgs_i686.0, nixpkgs_i686.1, &x86_64));
}
