//! Nix's distributed builds with a real second Nix behind a real sshd (tests/nix_support/remote.rs):
//! the local side has no aarch64-linux entry and no extra-platforms for it; the builder runs its
//! aarch64 builds through its own private nixqimg registration. First plain `nix-build --builders`
//! (Nix's distribution itself), then `nixqimg build` choosing the builder, falling back, refusing.

mod nix_support;

use nix_support::remote::*;
use nix_support::*;
use std::path::PathBuf;

each_nix!(plain_nix_build_sends_the_aarch64_derivation_to_the_builder);

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
