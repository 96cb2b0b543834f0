//! `nixqimg doctor` and `build` against a real Nix's settings: the remote builders Nix will use
//! (listed with their systems and whether they answer, a real builder behind sshd and one that is
//! not there), and the sandbox-path listing that makes Nix empty a real file, shown happening with
//! this very Nix and reported by doctor and refused by build before Nix runs.

mod nix_support;

use nix_support::remote::*;
use nix_support::*;
use std::path::Path;

each_nix!(
    nested_sandbox_paths_empty_the_real_file_and_doctor_and_build_say_so_first,
    doctor_lists_each_builder_with_its_systems_and_whether_it_answers,
);

fn append_conf(store: &Store, line: &str) {
    let conf = store.dir.join("etc/nix.conf");
    let mut c = std::fs::read_to_string(&conf).unwrap();
    c.push_str(line);
    std::fs::write(conf, c).unwrap();
}

fn nested_sandbox_paths_empty_the_real_file_and_doctor_and_build_say_so_first(which: Nix) {
    let store = Store::new("nested", which);
    let dir = store.dir.join("listed");
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("qemu-aarch64-static");
    let d = dir.display();
    append_conf(&store, &format!("extra-sandbox-paths = {d} {d}/qemu-aarch64-static\n"));
    let want = format!(
        "problem: nix: the sandbox paths list {d}/qemu-aarch64-static inside {d}, which is listed too: Nix then empties the real {d}/qemu-aarch64-static (data loss, seen with Nix 2.8 and 2.26)\n  fix: list only {d} (or only {d}/qemu-aarch64-static) in extra-sandbox-paths, and reinstall {d}/qemu-aarch64-static if it is now empty\n"
    );

    std::fs::write(&victim, "precious\n").unwrap();
    let r = store.cmd(NIXQIMG).arg("doctor").output().unwrap();
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stdout));
    assert!(text(&r.stdout).contains(&want), "{}", text(&r.stdout));

    // build refuses before Nix runs (and so before the file is lost).
    let r = store
        .cmd(NIXQIMG)
        .args(["build", "path:/nonexistent", "--ns", "--interpreter"])
        .arg(static_nixqimg())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let e = text(&r.stderr);
    assert!(e.starts_with(&format!("nixqimg: the sandbox paths list {d}/qemu-aarch64-static inside {d}")), "{e}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    // What doctor warns of, done by this Nix: any sandboxed build empties the real file.
    let bb = inputs().busybox.display().to_string();
    let expr = format!(
        "derivation {{ name = \"x\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo > $out\" ]; b = builtins.path {{ path = {bb}; }}; }}"
    );
    let r = store.cmd("nix-build").args(["-E", &expr, "--no-out-link"]).output().unwrap();
    let _ = r.status; // the build itself may fail (2.8 has no /bin/sh here); the loss happens first.
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "",
        "{} did not empty it: {}",
        which.version(),
        text(&r.stderr)
    );
}

fn doctor_lists_each_builder_with_its_systems_and_whether_it_answers(which: Nix) {
    let store = Store::new("doctor-builders", which);
    let net = Net::new();
    let mut builder = Builder::new(&store, "doctor-builders");
    builder.start(&net);
    // A machines file, as nix.conf's default `builders = @/etc/nix/machines` names one; the
    // second machine is not there (nothing listens on 127.0.0.2).
    let machines = store.dir.join("etc/machines");
    std::fs::write(&machines, format!("{}\nssh://root@127.0.0.2 riscv64-linux,armv7l-linux - 2\n", builder.machine()))
        .unwrap();
    append_conf(&store, &format!("builders = @{}\n", machines.display()));
    let r = net.cmd(&store, NIXQIMG).args(["doctor"]).env("NIX_SSHOPTS", builder.sshopts()).output().unwrap();
    let out = text(&r.stdout);
    assert!(out.contains("\nbuilder ssh-ng://root@127.0.0.1: aarch64-linux (max-jobs 1), answers\n"), "{out}");
    assert!(
        out.contains("\nbuilder ssh://root@127.0.0.2: riscv64-linux,armv7l-linux (max-jobs 2), does not answer: "),
        "{out}"
    );
    assert!(
        out.contains("warning: ssh://root@127.0.0.2: builder for riscv64-linux, armv7l-linux does not answer: "),
        "{out}"
    );
    let r = net.cmd(&store, NIXQIMG).args(["doctor", "--json"]).env("NIX_SSHOPTS", builder.sshopts()).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let b = &j["host"]["nix"]["builders"];
    assert_eq!(b[0]["uri"], "ssh-ng://root@127.0.0.1");
    assert_eq!(b[0]["systems"], serde_json::json!(["aarch64-linux"]));
    assert_eq!((b[0]["answers"].as_bool(), b[1]["answers"].as_bool()), (Some(true), Some(false)));
    assert!(Path::new(&machines).exists());
}
