//! Nix's distributed builds with a real second Nix behind a real sshd (tests/nix_support/remote.rs):
//! the local side has no aarch64-linux entry and no extra-platforms for it; the builder runs its
//! aarch64 builds through its own private nixqimg registration. First plain `nix-build --builders`
//! (Nix's distribution itself), then `nixqimg build` choosing the builder, falling back, refusing.

mod nix_support;

use nix_support::remote::*;
use nix_support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

each_nix!(
    plain_nix_build_sends_the_aarch64_derivation_to_the_builder,
    build_sends_aarch64_to_the_builder_and_makes_x86_64_here,
    build_with_the_builder_unreachable_at_start,
    build_with_the_builder_killed_mid_build,
);

fn hello_args(tag: &str) -> Vec<String> {
    let i = inputs();
    [
        "nix-build",
        repo().join("tests/fixtures/nix/chain.nix").to_str().unwrap(),
        "-A",
        "hello",
        "--no-out-link",
        "--arg",
        "busybox",
        i.busybox.to_str().unwrap(),
        "--arg",
        "tools",
        i.tools.to_str().unwrap(),
        "--argstr",
        "tag",
        tag,
    ]
    .map(String::from)
    .to_vec()
}

fn plain_nix_build_sends_the_aarch64_derivation_to_the_builder(which: Nix) {
    let local = Store::new("plain-remote", which);
    let net = Net::new();
    let mut builder = Builder::new(&local, "plain-remote");
    let args = hello_args("");

    // No builder: the local Nix refuses aarch64-linux outright (nothing here could run it).
    let r = net.cmd(&local, &args[0]).args(&args[1..]).output().unwrap();
    assert!(!r.status.success());
    assert!(text(&r.stderr).contains("a 'aarch64-linux' with features {} is required"), "{}", text(&r.stderr));

    builder.start(&net);
    let r = net
        .cmd(&local, &args[0])
        .args(&args[1..])
        .args(["--builders", &builder.machine()])
        .env("NIX_SSHOPTS", builder.sshopts())
        .output()
        .unwrap();
    let e = text(&r.stderr);
    assert!(r.status.success(), "{e}\nsshd: {}", builder.log());
    assert!(e.contains("on 'ssh-ng://root@127.0.0.1"), "{e}");
    let out = PathBuf::from(text(&r.stdout).trim());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello from aarch64\n");
    // Built there (the builder's own store holds it), copied back here.
    assert!(builder.has(&out), "{} is not in the builder's store", out.display());
}

fn tag(which: Nix) -> &'static str {
    match which {
        Nix::Bookworm => "2.8",
        Nix::Trixie => "2.26",
    }
}

/// The fixture flake with the host's static busybox as busybox-x86_64 (for the x86_64 image).
fn image_flake(name: &str) -> TempDir {
    need("busybox", "busybox-static");
    let guard = flake_dir(name);
    std::fs::create_dir_all(guard.0.join("busybox-x86_64/bin")).unwrap();
    std::fs::copy("/bin/busybox", guard.0.join("busybox-x86_64/bin/busybox")).unwrap();
    guard
}

/// `nixqimg build FLAKE ARGS... --out OUT` run here (inside `net`) with the builder's ssh options.
fn build(net: &Net, local: &Store, builder: &Builder, flake: &Path, args: &[&str], out: &Path) -> Command {
    let mut c = net.cmd(local, NIXQIMG);
    c.arg("build").arg(format!("path:{}", flake.display())).args(args).arg("--out").arg(out);
    c.args(["--builders", &builder.machine()]).env("NIX_SSHOPTS", builder.sshopts());
    c
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn ext4_hello(img: &Path) -> String {
    let cat = Command::new("debugfs").args(["-R", "cat /etc/hello"]).arg(img).output().unwrap();
    text(&cat.stdout)
}

/// The builder's store holds a `*-nixos-image` made there.
fn builder_made_an_image(builder: &Builder) -> bool {
    std::fs::read_dir(builder.store.dir.join("store"))
        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with("-nixos-image")))
        .unwrap_or(false)
}

fn build_sends_aarch64_to_the_builder_and_makes_x86_64_here(which: Nix) {
    need("debugfs", "e2fsprogs");
    let local = Store::new("multi", which);
    let net = Net::new();
    let mut builder = Builder::new(&local, "multi");
    builder.start(&net);
    let flake = image_flake(&format!("multi-{}", tag(which)));
    let out = flake.0.join("out");

    // No --ns and no binfmt entry here: only the builder can run aarch64-linux programs.
    let r =
        build(&net, &local, &builder, &flake.0, &["--system", "aarch64-linux,x86_64-linux"], &out).output().unwrap();
    let e = text(&r.stderr);
    assert!(r.status.success(), "{e}\nsshd: {}", builder.log());
    assert!(e.contains("nixqimg: aarch64-linux: on builder ssh-ng://root@127.0.0.1 (it answers)\n"), "{e}");
    assert!(e.contains("nixqimg: x86_64-linux: native here\n"), "{e}");
    assert_eq!(files_in(&out), ["nixos-aarch64-linux.img", "nixos-x86_64-linux.img"]);
    assert_eq!(ext4_hello(&out.join("nixos-aarch64-linux.img")), "built by aarch64 mke2fs\n");
    assert_eq!(std::fs::read_to_string(out.join("nixos-x86_64-linux.img")).unwrap(), "image on x86_64\n");
    assert!(builder_made_an_image(&builder), "the aarch64 image was not built on the builder");
    let stdout = text(&r.stdout);
    assert!(stdout.contains("  built  on ssh-ng://root@127.0.0.1\n"), "{stdout}");
    assert!(stdout.contains("  built  here (native)\n"), "{stdout}");
}

fn build_with_the_builder_unreachable_at_start(which: Nix) {
    need("debugfs", "e2fsprogs");
    let local = Store::new("unreachable", which);
    let net = Net::new();
    // Made but never started: nothing listens in the network.
    let builder = Builder::new(&local, "unreachable");
    let flake = image_flake(&format!("unreachable-{}", tag(which)));
    let out = flake.0.join("out");

    let r =
        build(&net, &local, &builder, &flake.0, &["--system", "aarch64-linux", "--no-emulate"], &out).output().unwrap();
    let e = text(&r.stderr);
    eprintln!("unreachable, --no-emulate:\n{e}");
    assert_eq!(r.status.code(), Some(1), "{e}");
    let last = e.lines().last().unwrap_or("");
    assert!(
        last.starts_with("nixqimg: aarch64-linux: builder ssh-ng://root@127.0.0.1 does not answer: ")
            && last.contains(", and --no-emulate forbids emulating it here (start the builder"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(files_in(&out), Vec::<String>::new());

    // Without --no-emulate it is emulated here through nixqimg (--ns: a private registration).
    let interp = static_nixqimg().to_str().unwrap();
    let r =
        build(&net, &local, &builder, &flake.0, &["--system", "aarch64-linux", "--ns", "--interpreter", interp], &out)
            .output()
            .unwrap();
    let e = text(&r.stderr);
    eprintln!("unreachable, emulation allowed:\n{e}");
    assert!(r.status.success(), "{e}");
    assert!(
        e.contains(
            "nixqimg: aarch64-linux: emulated here through nixqimg (builder ssh-ng://root@127.0.0.1 does not answer: "
        ),
        "{e}"
    );
    assert_eq!(files_in(&out), ["nixos-aarch64-linux.img"]);
    assert_eq!(ext4_hello(&out.join("nixos-aarch64-linux.img")), "built by aarch64 mke2fs\n");
    assert!(!builder_made_an_image(&builder));
}

/// Starts `cmd`, kills the builder once its build runs, and returns what `cmd` printed.
fn kill_mid_build(builder: &mut Builder, mut cmd: Command) -> Output {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !builder.building() {
        assert!(Instant::now() < deadline, "the builder never started building: {}", builder.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    builder.kill();
    child.wait_with_output().unwrap()
}

fn build_with_the_builder_killed_mid_build(which: Nix) {
    let attr = ["--attr", "packages.aarch64-linux.slowImage"];
    // --no-emulate: one line naming the builder and what Nix saw, nothing under --out.
    {
        let local = Store::new("killed-strict", which);
        let net = Net::new();
        let mut builder = Builder::new(&local, "killed-strict");
        builder.start(&net);
        let flake = image_flake(&format!("killed-strict-{}", tag(which)));
        let out = flake.0.join("out");
        let mut args = attr.to_vec();
        args.push("--no-emulate");
        let cmd = build(&net, &local, &builder, &flake.0, &args, &out);
        let r = kill_mid_build(&mut builder, cmd);
        let e = text(&r.stderr);
        eprintln!("killed, --no-emulate:\n{e}");
        assert_eq!(r.status.code(), Some(1), "{e}");
        let last = e.lines().last().unwrap_or("");
        assert!(
            last.starts_with("nixqimg: aarch64-linux: lost builder ssh-ng://root@127.0.0.1 during the build (error: "),
            "{e}"
        );
        assert_eq!(files_in(&out), Vec::<String>::new(), "{e}");
    }
    // Otherwise (--ns here): emulated here instead, and the image is whole.
    let local = Store::new("killed", which);
    let net = Net::new();
    let mut builder = Builder::new(&local, "killed");
    builder.start(&net);
    let flake = image_flake(&format!("killed-{}", tag(which)));
    let out = flake.0.join("out");
    let mut args = attr.to_vec();
    args.extend(["--ns", "--interpreter", static_nixqimg().to_str().unwrap()]);
    let cmd = build(&net, &local, &builder, &flake.0, &args, &out);
    let r = kill_mid_build(&mut builder, cmd);
    let e = text(&r.stderr);
    eprintln!("killed, emulation allowed:\n{e}");
    assert!(r.status.success(), "{e}");
    assert!(
        e.contains("nixqimg: aarch64-linux: lost builder ssh-ng://root@127.0.0.1 during the build (error: "),
        "{e}"
    );
    assert!(e.contains("); emulating it here through nixqimg instead\n"), "{e}");
    assert_eq!(files_in(&out), ["nixos-aarch64-linux.img"]);
    assert_eq!(std::fs::read(out.join("nixos-aarch64-linux.img")).unwrap(), vec![0u8; 1 << 20]);
}
