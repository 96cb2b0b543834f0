//! `nixqimg bootloader sync --esp DIR` against systemd-boot entry sets, and the machine-side
//! `nixos-module/bios-sync.sh` held to writing the very same bytes and reporting the same problems.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One ESP directory, set up like NixOS's systemd-boot installer leaves it.
struct Esp {
    dir: PathBuf,
}

impl Esp {
    fn new(name: &str) -> Esp {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bootloader-sync").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("loader/entries")).unwrap();
        std::fs::create_dir_all(dir.join("EFI/nixos")).unwrap();
        Esp { dir }
    }
    fn file(&self, rel: &str, text: &str) -> &Self {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }
    fn rm(&self, rel: &str) -> &Self {
        std::fs::remove_file(self.dir.join(rel)).unwrap();
        self
    }
    /// A NixOS generation: its entry, kernel and initrd, as systemd-boot-builder.py writes them.
    fn generation(&self, n: u32, options: &str) -> &Self {
        self.file(&format!("EFI/nixos/k{n}-linux-6.1-bzImage.efi"), "kernel")
            .file(&format!("EFI/nixos/i{n}-initrd-linux-6.1-initrd.efi"), "initrd")
            .file(
                &format!("loader/entries/nixos-generation-{n}.conf"),
                &format!(
                    "title NixOS\nversion Generation {n} NixOS 24.05, Linux Kernel 6.1\n\
                     linux /EFI/nixos/k{n}-linux-6.1-bzImage.efi\ninitrd /EFI/nixos/i{n}-initrd-linux-6.1-initrd.efi\n\
                     options {options}\nmachine-id 0123456789abcdef0123456789abcdef\nsort-key nixos\n"
                ),
            )
    }
    fn loader_conf(&self, text: &str) -> &Self {
        self.file("loader/loader.conf", text)
    }

    /// Runs both implementations on copies of this ESP; asserts they agree; returns nixqimg's result.
    fn sync(&self) -> Outcome {
        let copy = |suffix: &str| {
            let d = self.dir.with_extension(suffix);
            let _ = std::fs::remove_dir_all(&d);
            let st = Command::new("cp").arg("-a").arg(&self.dir).arg(&d).status().unwrap();
            assert!(st.success());
            d
        };
        let a = copy("rust");
        let rust =
            Command::new(env!("CARGO_BIN_EXE_nixqimg")).args(["bootloader", "sync", "--esp"]).arg(&a).output().unwrap();
        let r = Outcome::of(&rust, &a);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/bios-sync.sh");
        // dash (Debian's sh) here; NixOS runs it with bash (pkgs.runtimeShell).
        for shell in ["sh", "bash"] {
            let b = copy(shell);
            let out = Command::new(shell).arg(&script).arg(&b).output().unwrap();
            let s = Outcome::of(&out, &b);
            assert_eq!(r.cfg, s.cfg, "syslinux.cfg differs between nixqimg and bios-sync.sh under {shell}");
            assert_eq!(
                r.code, s.code,
                "exit status differs under {shell}: nixqimg {:?}, script {:?}",
                r.stderr, s.stderr
            );
            assert_eq!(r.problems(), s.problems(), "reported problems differ under {shell}");
            assert_eq!(r.stderr.lines().count(), s.stderr.lines().count(), "{:?} vs {:?}", r.stderr, s.stderr);
        }
        // The result replaces this ESP's syslinux.cfg, so that the next step starts from it.
        match &r.cfg {
            Some(c) => std::fs::write(self.dir.join("syslinux.cfg"), c).unwrap(),
            None => assert!(!self.dir.join("syslinux.cfg").exists() || r.code != Some(0)),
        }
        r
    }
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stderr: String,
    cfg: Option<String>,
}

impl Outcome {
    fn of(out: &std::process::Output, esp: &Path) -> Outcome {
        assert!(out.stdout.is_empty(), "sync printed on stdout: {}", String::from_utf8_lossy(&out.stdout));
        assert!(!esp.join(".syslinux.cfg.tmp").exists(), "temp file left behind in {}", esp.display());
        Outcome {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            cfg: std::fs::read_to_string(esp.join("syslinux.cfg")).ok(),
        }
    }
    /// The per-entry lines, without the program's name.
    fn problems(&self) -> Vec<String> {
        self.stderr.lines().filter_map(|l| l.split_once(": loader/entries/").map(|(_, r)| r.to_string())).collect()
    }
    fn cfg(&self) -> &str {
        self.cfg.as_deref().expect("no syslinux.cfg written")
    }
}

fn labels(cfg: &str) -> Vec<&str> {
    cfg.lines().filter_map(|l| l.strip_prefix("LABEL ")).collect()
}

#[test]
fn first_generation_gives_a_complete_config() {
    let esp = Esp::new("first");
    esp.generation(1, "init=/nix/store/aaa-nixos-system/init console=ttyS0,115200 loglevel=4")
        .loader_conf("timeout 0\ndefault nixos-generation-1.conf\nconsole-mode keep\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert_eq!(
        r.cfg(),
        "# Written by nixqimg bootloader sync from loader/entries: changes here are overwritten.\n\
         SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT nixos-generation-1\n\n\
         LABEL nixos-generation-1\n  MENU LABEL NixOS (Generation 1 NixOS 24.05, Linux Kernel 6.1)\n\
         \x20 LINUX /EFI/nixos/k1-linux-6.1-bzImage.efi\n  INITRD /EFI/nixos/i1-initrd-linux-6.1-initrd.efi\n\
         \x20 APPEND init=/nix/store/aaa-nixos-system/init console=ttyS0,115200 loglevel=4\n"
    );
}

#[test]
fn generations_added_and_removed_follow_systemd_boot() {
    let esp = Esp::new("rebuilds");
    esp.generation(1, "init=/g1/init").loader_conf("timeout 5\ndefault nixos-generation-1.conf\n");
    assert_eq!(labels(esp.sync().cfg()), ["nixos-generation-1"]);

    // nixos-rebuild switch, nine times: generation 10 sorts before 9 only by number.
    for n in 2..=11 {
        esp.generation(n, &format!("init=/g{n}/init"))
            .loader_conf(&format!("timeout 5\ndefault nixos-generation-{n}.conf\n"));
    }
    let r = esp.sync();
    let want: Vec<String> = (1..=11).rev().map(|n| format!("nixos-generation-{n}")).collect();
    assert_eq!(labels(r.cfg()), want);
    assert!(r.cfg().contains("PROMPT 1\nTIMEOUT 50\nDEFAULT nixos-generation-11\n"), "{}", r.cfg());
    assert!(r.cfg().contains("  APPEND init=/g10/init\n"));

    // nix-collect-garbage -d + nixos-rebuild boot: old entries and their files are gone.
    for n in 1..=9 {
        esp.rm(&format!("loader/entries/nixos-generation-{n}.conf"))
            .rm(&format!("EFI/nixos/k{n}-linux-6.1-bzImage.efi"))
            .rm(&format!("EFI/nixos/i{n}-initrd-linux-6.1-initrd.efi"));
    }
    esp.generation(12, "init=/g12/init").loader_conf("timeout 5\ndefault nixos-generation-12.conf\n");
    let r = esp.sync();
    assert_eq!(labels(r.cfg()), ["nixos-generation-12", "nixos-generation-11", "nixos-generation-10"]);
    assert!(!r.cfg().contains("/g9/"), "{}", r.cfg());
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // nixos-rebuild --rollback: the default goes back, the entries stay.
    esp.loader_conf("timeout 5\ndefault nixos-generation-11.conf\n");
    assert!(esp.sync().cfg().contains("DEFAULT nixos-generation-11\n"));
}

#[test]
fn kernel_params_with_spaces_and_quotes_reach_append_verbatim() {
    let esp = Esp::new("quotes");
    esp.generation(1, r#"init=/nix/store/x/init "just quoted" a='b c' d="e f" back\slash $HOME ${X} `id` ;&|"#)
        .file(
            "loader/entries/nixos-generation-1.conf",
            &(std::fs::read_to_string(esp.dir.join("loader/entries/nixos-generation-1.conf")).unwrap()
                + "options   second=\"x y\"  \t\noptions \"whole value quoted\"\n"),
        )
        .loader_conf("default \"nixos-generation-1\"\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.cfg().contains(
            "  APPEND init=/nix/store/x/init \"just quoted\" a='b c' d=\"e f\" back\\slash $HOME ${X} `id` ;&| second=\"x y\" whole value quoted\n"
        ),
        "{}",
        r.cfg()
    );
    assert!(r.cfg().contains("DEFAULT nixos-generation-1\n"));
}

#[test]
fn missing_kernels_and_initrds_are_reported_and_left_out() {
    let esp = Esp::new("missing");
    esp.generation(1, "g=1").generation(2, "g=2").generation(3, "g=3").generation(4, "g=4");
    esp.rm("EFI/nixos/k2-linux-6.1-bzImage.efi").rm("EFI/nixos/i3-initrd-linux-6.1-initrd.efi");
    esp.loader_conf("default nixos-generation-3.conf\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.problems(),
        [
            "nixos-generation-3.conf: initrd /EFI/nixos/i3-initrd-linux-6.1-initrd.efi is missing from the ESP (entry left out of syslinux.cfg)",
            "nixos-generation-2.conf: kernel /EFI/nixos/k2-linux-6.1-bzImage.efi is missing from the ESP (entry left out of syslinux.cfg)",
        ]
    );
    assert!(r.stderr.lines().last().unwrap().contains("2 of 4 entries left out of"), "{}", r.stderr);
    // The broken default falls back to the newest bootable generation.
    assert_eq!(labels(r.cfg()), ["nixos-generation-4", "nixos-generation-1"]);
    assert!(r.cfg().contains("DEFAULT nixos-generation-4\n"));
}

#[test]
fn nothing_bootable_leaves_the_old_config_alone() {
    let esp = Esp::new("none");
    esp.file("syslinux.cfg", "old\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("no bootable entry, syslinux.cfg left as it was"), "{}", r.stderr);
    assert_eq!(r.cfg.as_deref(), Some("old\n"));

    esp.file("loader/entries/efi-shell.conf", "title Shell\nefi /shell.efi\n");
    let r = esp.sync();
    assert_eq!(
        r.problems(),
        ["efi-shell.conf: no linux line (SYSLINUX boots only Linux kernels) (entry left out of syslinux.cfg)"]
    );
    assert_eq!(r.cfg.as_deref(), Some("old\n"));
}

#[test]
fn odd_but_valid_entry_files() {
    let esp = Esp::new("odd");
    esp.file("EFI/Linux/vmlinuz", "k")
        .file("EFI/nixos/a.img", "i")
        .file("EFI/nixos/b.img", "i")
        .file(
            "loader/entries/custom.conf",
            "# hand written\r\n\t title \t My  Linux \r\n\r\nlinux \\EFI\\Linux\\vmlinuz\r\ninitrd EFI/nixos/a.img\r\ninitrd \\EFI\\nixos\\b.img\r\noptions\r\noptions root=LABEL=nixos\r\nunknown-key whatever\r\n",
        )
        .file("loader/entries/nixos-generation-007.conf", "linux /EFI/Linux/vmlinuz\n")
        .file("loader/entries/README", "not an entry\n")
        .loader_conf("timeout menu-force\ndefault cust*\ndefault custo?\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(labels(r.cfg()), ["nixos-generation-007", "custom"]);
    assert!(r.cfg().contains("PROMPT 1\nTIMEOUT 0\nDEFAULT custom\n"), "{}", r.cfg());
    assert!(
        r.cfg().contains(
            "LABEL custom\n  MENU LABEL My  Linux\n  LINUX /EFI/Linux/vmlinuz\n  INITRD /EFI/nixos/a.img,/EFI/nixos/b.img\n  APPEND  root=LABEL=nixos\n"
        ),
        "{}",
        r.cfg()
    );
    assert!(r
        .cfg()
        .contains("LABEL nixos-generation-007\n  MENU LABEL nixos-generation-007\n  LINUX /EFI/Linux/vmlinuz\n"));
}

#[test]
fn what_syslinux_cannot_express_is_refused_per_entry() {
    let esp = Esp::new("refused");
    esp.generation(1, "ok=1")
        .file("EFI/nixos/with space.efi", "k")
        .file("EFI/nixos/x,y.img", "i")
        .file("loader/entries/my entry.conf", "linux /EFI/nixos/k1-linux-6.1-bzImage.efi\n")
        .file("loader/entries/spaced.conf", "linux /EFI/nixos/with space.efi\n")
        .file("loader/entries/comma.conf", "linux /EFI/nixos/k1-linux-6.1-bzImage.efi\ninitrd /EFI/nixos/x,y.img\n")
        .loader_conf("default [x]*\ntimeout 99999999999999999999\n");
    let r = esp.sync();
    assert_eq!(r.code, Some(1));
    assert_eq!(r.problems().len(), 3, "{:?}", r.problems());
    assert!(r.stderr.contains("my entry.conf: the entry's name has a blank"), "{}", r.stderr);
    assert!(r.stderr.contains("spaced.conf: kernel /EFI/nixos/with space.efi has a blank"), "{}", r.stderr);
    assert!(r.stderr.contains("comma.conf: initrd /EFI/nixos/x,y.img has a comma"), "{}", r.stderr);
    assert_eq!(labels(r.cfg()), ["nixos-generation-1"]);
    assert!(r.cfg().contains("PROMPT 1\nTIMEOUT 35996\nDEFAULT nixos-generation-1\n"), "{}", r.cfg());
}

#[test]
fn timeouts_and_defaults_in_many_spellings_agree() {
    let esp = Esp::new("spellings");
    for n in [1, 2, 3, 20] {
        esp.generation(n, &format!("n={n}"));
    }
    for (conf, prompt_timeout, default) in [
        ("", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-20"),
        ("timeout 3\n", "PROMPT 1\nTIMEOUT 30\n", "nixos-generation-20"),
        ("timeout 0003\n", "PROMPT 1\nTIMEOUT 30\n", "nixos-generation-20"),
        ("timeout +3\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-20"),
        ("timeout menu-hidden\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-20"),
        ("timeout 4000\n", "PROMPT 1\nTIMEOUT 35996\n", "nixos-generation-20"),
        ("default nixos-generation-2\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-2"),
        ("default nixos-generation-?.conf\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-3"),
        ("default *-1\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-1"),
        ("default @saved\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-20"),
        ("default\n", "PROMPT 0\nTIMEOUT 0\n", "nixos-generation-20"),
    ] {
        esp.loader_conf(conf);
        let r = esp.sync();
        assert_eq!(r.code, Some(0), "{conf:?}: {}", r.stderr);
        assert!(r.cfg().contains(&format!("{prompt_timeout}DEFAULT {default}\n")), "{conf:?}:\n{}", r.cfg());
    }
}

#[test]
fn a_missing_entries_directory_is_one_line_with_a_hint() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bootloader-sync/not-an-esp");
    std::fs::create_dir_all(&dir).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_nixqimg")).args(["bootloader", "sync", "--esp"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("loader/entries") && err.contains("--esp must be the ESP"), "{err}");
}
