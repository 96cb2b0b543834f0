//! Real Nix (Debian's nix-bin, single-user, temp store, sandbox on without fallback) building
//! aarch64-linux derivations whose every program is foreign: a bootstrap chain shaped like nixpkgs'
//! (tests/fixtures/nix/chain.nix), the same through a flake with no inputs, and `nixqimg build --ns`.
//! Each is shown failing without nixqimg and passing with it, nixqimg registered only in a private
//! binfmt_misc by `nixqimg ns`, with the settings `nixqimg nix-config` prints.

mod nix_support;

each_nix!(
    bootstrap_chain_with_forced_rpath_fails_without_an_entry_and_builds_through_nixqimg,
    bootstrap_chain_without_rpath_fails_under_plain_qemu_and_builds_through_nixqimg,
    flake_without_inputs_fails_without_an_entry_and_builds_through_nixqimg,
    build_ns_makes_the_image_with_emulated_mke2fs_and_copies_it_per_system,
    build_refuses_what_cannot_work_with_one_line_fixes,
    nix_config_lines_add_to_nixs_own_platforms_instead_of_replacing_them,
);

use nix_support::*;
use std::path::PathBuf;
use std::process::Command;

/// What stage1 must have written, computed here rather than by anything emulated.
fn expected_report() -> String {
    let mut pipe: Vec<String> =
        (1..=20).map(|i| i.to_string()).filter(|s| s.contains('1')).map(|s| s.replace('1', "X")).collect();
    pipe.sort_by(|a, b| b.cmp(a));
    format!(
        "uname: aarch64\nhello-nopie: [one] [two three] [wrapped]\nrev: desserts\nbasename: c\napplet: via-busybox\npipe: {} \nargv0: custom-name: [x]\n",
        pipe.join(" ")
    )
}

fn expected_data() -> String {
    (1..=64).map(|i| format!("row {i:03}\n")).collect()
}

fn chain_args<'a>(inputs: &'a Inputs, attr: &'a str, rpath: bool) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "nix-build".into(),
        repo().join("tests/fixtures/nix/chain.nix").display().to_string(),
        "-A".into(),
        attr.into(),
        "--no-out-link".into(),
        "--arg".into(),
        "busybox".into(),
        inputs.busybox.display().to_string(),
        "--arg".into(),
        "tools".into(),
        inputs.tools.display().to_string(),
    ];
    if !rpath {
        v.extend(["--arg".into(), "rpath".into(), "false".into()]);
    }
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn check_stage2(out: &std::process::Output) -> PathBuf {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "nix-build failed: {}\n{}", out.status, text(&out.stderr));
    let p = PathBuf::from(stdout.trim().lines().last().unwrap_or(""));
    assert_eq!(std::fs::read_to_string(p.join("status")).unwrap(), "ok\n");
    assert_eq!(std::fs::read_to_string(p.join("report")).unwrap(), expected_report());
    assert_eq!(std::fs::read_to_string(p.join("data")).unwrap(), expected_data());
    p
}

fn bootstrap_chain_with_forced_rpath_fails_without_an_entry_and_builds_through_nixqimg(which: Nix) {
    let inputs = inputs();
    let store = Store::new("chain-rpath", which);
    let args = chain_args(inputs, "stage2", true);

    let without = nix(&store, Via::Nothing, &strs(&args));
    assert!(!without.status.success());
    assert!(text(&without.stderr).contains("Exec format error"), "{}", text(&without.stderr));

    let with = nix(&store, Via::Nixqimg, &strs(&args));
    check_stage2(&with);
    // stage0 really is bootstrap-tools-like: PT_INTERP into its own store path, forced RPATH.
    let tools = std::fs::read_dir(store.dir.join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.to_string_lossy().ends_with("-bootstrap-tools"))
        .expect("a bootstrap-tools store path");
    for (prog, ty) in [("bash", "DYN"), ("hello-nopie", "EXEC")] {
        let f = tools.join("bin").join(prog);
        let interp = Command::new("patchelf").arg("--print-interpreter").arg(&f).output().unwrap();
        assert_eq!(text(&interp.stdout).trim(), tools.join("lib/ld-linux-aarch64.so.1").display().to_string());
        let rpath = Command::new("patchelf").arg("--print-rpath").arg(&f).output().unwrap();
        assert_eq!(text(&rpath.stdout).trim(), tools.join("lib").display().to_string());
        let header = Command::new("file").arg(&f).output().unwrap();
        let want = if ty == "EXEC" { "LSB executable" } else { "LSB pie executable" };
        assert!(text(&header.stdout).contains(want), "{prog}: {}", text(&header.stdout));
    }
}

/// Without RPATH the libraries lie only beside the relocated loader: a plain qemu entry runs the
/// loader, which never looks there.
fn bootstrap_chain_without_rpath_fails_under_plain_qemu_and_builds_through_nixqimg(which: Nix) {
    let inputs = inputs();
    let store = Store::new("chain-norpath", which);
    let args = chain_args(inputs, "stage2", false);

    let plain = nix(&store, Via::PlainQemu, &strs(&args));
    assert!(!plain.status.success());
    assert!(
        text(&plain.stderr).contains("error while loading shared libraries: libtinfo.so.6"),
        "{}",
        text(&plain.stderr)
    );

    check_stage2(&nix(&store, Via::Nixqimg, &strs(&args)));
}

fn flake_without_inputs_fails_without_an_entry_and_builds_through_nixqimg(which: Nix) {
    let store = Store::new("flake", which);
    let guard = flake_dir("chain");
    let dir = &guard.0;
    let installable = format!("path:{}#packages.aarch64-linux.stage2", dir.display());
    let args = ["nix", "build", "--json", "--no-link", installable.as_str()];

    let without = nix(&store, Via::Nothing, &args);
    assert!(!without.status.success());
    assert!(text(&without.stderr).contains("Exec format error"), "{}", text(&without.stderr));

    let with = nix(&store, Via::Nixqimg, &args);
    assert!(with.status.success(), "{}", text(&with.stderr));
    let v: serde_json::Value = serde_json::from_slice(&with.stdout).unwrap();
    let out = PathBuf::from(v[0]["outputs"]["out"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(out.join("report")).unwrap(), expected_report());
    assert_eq!(std::fs::read_to_string(out.join("data")).unwrap(), expected_data());
}

fn build_ns_makes_the_image_with_emulated_mke2fs_and_copies_it_per_system(which: Nix) {
    need("debugfs", "e2fsprogs");
    need("sha256sum", "coreutils");
    let store = Store::new("build", which);
    let guard = flake_dir("image");
    let dir = &guard.0;
    let out = dir.join("out");

    // The flake has no packages.<build>.qcow-<system>: the default is nixosConfigurations.<system>.qcow.
    let r = store
        .cmd(NIXQIMG)
        .args(["build", &format!("path:{}", dir.display()), "--system", "aarch64-linux", "--ns", "--out"])
        .arg(&out)
        .arg("--interpreter")
        .arg(static_nixqimg())
        .output()
        .unwrap();
    let stderr = text(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("#nixosConfigurations.aarch64-linux.qcow"), "{stderr}");
    let img = out.join("nixos-aarch64-linux.img");
    let sum = Command::new("sha256sum").arg(&img).output().unwrap();
    let sum = text(&sum.stdout).split_whitespace().next().unwrap_or("").to_string();
    let size = std::fs::metadata(&img).unwrap().len();
    assert_eq!(size, 4 << 20);
    assert_eq!(
        text(&r.stdout),
        format!(
            "{}\n  size   {size} bytes\n  sha256 {sum}\n  built  here (emulated through nixqimg)\n  run    nixqimg run {} --arch aarch64\n",
            img.display(),
            img.display()
        )
    );
    // The copied file is an ext4 filesystem holding what the emulated build wrote.
    let cat = Command::new("debugfs").args(["-R", "cat /etc/hello"]).arg(&img).output().unwrap();
    assert_eq!(text(&cat.stdout), "built by aarch64 mke2fs\n", "{}", text(&cat.stderr));

    // Without --ns nothing serves aarch64 here: the check says so before Nix runs.
    let r = store
        .cmd(NIXQIMG)
        .args(["build", &format!("path:{}", dir.display()), "--system", "aarch64-linux", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let e = text(&r.stderr);
    assert!(e.starts_with("nixqimg: Nix will refuse aarch64-linux builds: not in extra-platforms (append `extra-extra-platforms = aarch64-linux`"), "{e}");

    // A dynamically linked nixqimg is registered (F pins the file, not its loader and libraries):
    // inside the sandbox the kernel cannot start it, and the build fails with that diagnosis.
    let r = store
        .cmd(NIXQIMG)
        .args(["build", &format!("path:{}", dir.display()), "--ns", "--attr", "packages.aarch64-linux.hello", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let e = text(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{e}");
    assert!(e.contains("is dynamically linked"), "{e}");
    assert!(
        e.lines().last().unwrap_or("").starts_with(
            "nixqimg: the binfmt interpreter for aarch64-linux is missing inside the Nix sandbox (register nixqimg with F"
        ),
        "{e}"
    );

    // A missing attribute is one line with the fix.
    let r = store
        .cmd(NIXQIMG)
        .args(["build", &format!("path:{}", dir.display()), "--ns", "--attr", "nope.{system}", "--out"])
        .arg(&out)
        .arg("--interpreter")
        .arg(static_nixqimg())
        .output()
        .unwrap();
    let e = text(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{e}");
    assert!(
        e.lines()
            .last()
            .unwrap_or("")
            .starts_with("nixqimg: the flake has no attribute nope.aarch64-linux (pass --attr"),
        "{e}"
    );
}

fn build_refuses_what_cannot_work_with_one_line_fixes(which: Nix) {
    // No nix on PATH.
    let r = Command::new(NIXQIMG).args(["build", "path:/nonexistent"]).env("PATH", "/nonexistent").output().unwrap();
    assert_eq!(r.status.code(), Some(127));
    assert_eq!(
        text(&r.stderr),
        "nixqimg: nix not found in PATH (install Nix (Debian: apt install nix-bin; elsewhere https://nixos.org/download))\n"
    );
    // A daemon-based Nix does not see a private namespace: --ns is refused before anything runs.
    let store = Store::new("daemon", which);
    let r = store
        .cmd(NIXQIMG)
        .env("NIX_REMOTE", "daemon")
        .args(["build", "path:/nonexistent", "--ns", "--interpreter"])
        .arg(static_nixqimg())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert_eq!(
        text(&r.stderr),
        "nixqimg: this Nix builds through nix-daemon, which does not see a private namespace (use the NixOS module (nixqimg.binfmt.enable) or `nixqimg register` instead of --ns)\n"
    );
}

fn nix_config_lines_add_to_nixs_own_platforms_instead_of_replacing_them(which: Nix) {
    let store = Store::new("platforms", which);
    let show = |store: &Store| {
        let r = store.cmd("nix").args(["show-config", "--json"]).output().unwrap();
        assert!(r.status.success(), "{}", text(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        let list = v["extra-platforms"]["value"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string());
        list.collect::<Vec<_>>()
    };
    let defaults = show(&store);
    assert!(defaults.iter().any(|p| p == "i686-linux"), "Nix's own list: {defaults:?}");
    // The lines go to the end of the user's nix.conf, as the README says.
    let r = Command::new(NIXQIMG)
        .args(["nix-config", "--systems", "aarch64-linux", "--interpreter"])
        .arg(static_nixqimg())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r.stderr));
    let conf = store.dir.join("etc/nix.conf");
    let mut c = std::fs::read_to_string(&conf).unwrap();
    c.push_str(&text(&r.stdout));
    std::fs::write(&conf, c).unwrap();
    let after = show(&store);
    let mut want = defaults.clone();
    want.push("aarch64-linux".into());
    want.sort();
    let mut got = after.clone();
    got.sort();
    assert_eq!(got, want, "nix-config printed:\n{}", text(&r.stdout));
}
