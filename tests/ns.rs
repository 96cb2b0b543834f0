//! `nixqimg ns`: a private user+mount namespace with its own binfmt_misc holding nixqimg, as a user
//! runs it: exit status passed through, the global instance untouched, and a sandboxed single-user
//! `nix-build` of an aarch64-linux derivation inside it.

mod nix_support;

each_nix!(sandboxed_nix_build_of_an_aarch64_derivation_runs_inside_ns);

use nix_support::*;
use std::process::Command;

const GLOBAL: &str = "/proc/sys/fs/binfmt_misc";

fn global_entries() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(GLOBAL)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read_to_string(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn ns(args: &[&str]) -> std::process::Output {
    Command::new("timeout").arg("120").arg(NIXQIMG).arg("ns").args(args).output().unwrap()
}

#[test]
fn exit_status_and_signals_pass_through() {
    let r = ns(&["--systems", "aarch64-linux", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!((r.status.code(), text(&r.stdout).as_str()), (Some(7), "out\n"));
    assert!(text(&r.stderr).ends_with("err\n"), "{}", text(&r.stderr));
    let r = ns(&["--systems", "aarch64-linux", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(r.status.code(), Some(128 + 15));
    let r = ns(&["--systems", "aarch64-linux", "--", "/nonexistent/prog"]);
    assert_eq!(r.status.code(), Some(127));
    assert!(
        text(&r.stderr).ends_with("nixqimg: /nonexistent/prog: No such file or directory\n"),
        "{}",
        text(&r.stderr)
    );
    let r = ns(&["--systems", "vax-linux", "--", "true"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        text(&r.stderr).starts_with("nixqimg: 'vax-linux' is not a system nixqimg knows (one of x86_64-linux"),
        "{}",
        text(&r.stderr)
    );
}

#[test]
fn private_instance_holds_nixqimg_and_the_global_one_is_untouched() {
    let before = global_entries();
    let interp = static_nixqimg();
    let bb = inputs().busybox.join("bin/busybox");
    let script = format!(
        "cat {GLOBAL}/nixqimg-aarch64; ls {GLOBAL}; id -u; {bb} uname -m; (exec -a uname {bb} -m)",
        bb = bb.display()
    );
    let r = Command::new(NIXQIMG)
        .args(["ns", "--systems", "aarch64-linux", "--interpreter"])
        .arg(interp)
        .args(["--", "bash", "-c", &script])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r.stderr));
    let magic = "7f454c460201010000000000000000000200b700";
    let mask = "ffffffffffffff00fffffffffffffffffeffffff";
    assert_eq!(
        text(&r.stdout),
        format!(
            "enabled\ninterpreter {}\nflags: PF\noffset 0\nmagic {magic}\nmask {mask}\nnixqimg-aarch64\nnixqimg-aarch64-qemu\nregister\nstatus\n0\naarch64\naarch64\n",
            interp.display()
        )
    );
    assert_eq!(global_entries(), before, "the global binfmt_misc changed");
    assert!(!before.iter().any(|(n, _)| n == "nixqimg-aarch64"));
}

fn sandboxed_nix_build_of_an_aarch64_derivation_runs_inside_ns(which: Nix) {
    let inputs = inputs();
    let store = Store::new("ns-hello", which);
    let expr = repo().join("tests/fixtures/nix/chain.nix");
    let bb = inputs.busybox.display().to_string();
    let tools = inputs.tools.display().to_string();
    let args = [
        "nix-build",
        expr.to_str().unwrap(),
        "-A",
        "hello",
        "--no-out-link",
        "--arg",
        "busybox",
        &bb,
        "--arg",
        "tools",
        &tools,
    ];
    let without = nix(&store, Via::Nothing, &args);
    assert!(!without.status.success());
    assert!(text(&without.stderr).contains("Exec format error"), "{}", text(&without.stderr));

    let before = global_entries();
    let with = nix(&store, Via::Nixqimg, &args);
    assert!(with.status.success(), "{}", text(&with.stderr));
    let out = text(&with.stdout);
    assert_eq!(std::fs::read_to_string(out.trim()).unwrap(), "hello from aarch64\n");
    // --check rebuilds it, proving the sandbox (sandbox-fallback = false) really ran the builder.
    let mut check = args.to_vec();
    check.push("--check");
    let again = nix(&store, Via::Nixqimg, &check);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(global_entries(), before);
}

#[test]
fn an_unprivileged_user_gets_the_namespace_without_root() {
    need("setpriv", "util-linux");
    let bb = inputs().busybox.join("bin/busybox");
    let r = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", NIXQIMG, "ns", "--systems", "aarch64-linux", "--"])
        .args(["sh", "-c"])
        .arg(format!("{} uname -m; id -u; cat /proc/self/setgroups", bb.display()))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r.stderr));
    // Only its own id can be mapped, so setgroups is denied (which is why Nix wants root outside).
    assert_eq!(text(&r.stdout), "aarch64\n0\ndeny\n");
}

/// A root holding only a static nixqimg and an empty /proc, removed on drop.
fn small_root(name: &str) -> tempdir::Dir {
    let d = tempdir::Dir::new(name);
    std::fs::create_dir_all(d.0.join("proc")).unwrap();
    std::fs::copy(static_nixqimg(), d.0.join("nixqimg")).unwrap();
    d
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn inside_a_chroot_ns_names_the_chroot_not_the_sysctl() {
    let root = small_root("ns-chroot");
    // Its own mount namespace: the chroot's /proc is mounted there and goes with it.
    let script = r#"mount -t proc proc "$1/proc" && exec chroot "$1" /nixqimg ns --systems aarch64-linux --interpreter /nixqimg -- /nixqimg --version"#;
    let r = Command::new("timeout")
        .args(["120", "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(&root.0)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(126), "{}", text(&r.stderr));
    assert_eq!(
        text(&r.stderr),
        "nixqimg: ns: this process runs in a chroot, and the kernel refuses new user namespaces to chrooted processes \
         (start nixqimg ns outside the chroot and chroot inside it: nixqimg ns -- chroot DIR COMMAND...)\n"
    );
    // Without /proc nothing can tell: both causes are named.
    let r = Command::new("timeout")
        .args(["120", "chroot"])
        .arg(&root.0)
        .args(["/nixqimg", "ns", "--systems", "aarch64-linux", "--interpreter", "/nixqimg", "--", "/nixqimg"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(126), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("(in a chroot the kernel refuses it (run nixqimg ns outside"),
        "{}",
        text(&r.stderr)
    );
}

#[test]
fn a_foreign_program_in_a_chroot_without_qemu_runs_through_the_marker_entry() {
    // nixqimg is pinned by F and runs; the qemu it would look for is outside the chroot, so it routes
    // the exec to the qemu that ns's marker entry pins (README "Chroots and containers").
    let root = small_root("ns-chroot-noqemu");
    std::fs::copy(inputs().busybox.join("bin/busybox"), root.0.join("busybox")).unwrap();
    // Not exec'd: the shell stays pid 1 of the new pid namespace, with the namespace's root.
    let script = r#"mount -t proc proc "$1/proc" && chroot "$1" /busybox echo ran in the chroot"#;
    let r = Command::new("timeout")
        .arg("120")
        .arg(NIXQIMG)
        .args(["ns", "--systems", "aarch64-linux", "--interpreter"])
        .arg(static_nixqimg())
        .args(["--", "unshare", "--pid", "--fork", "sh", "-c", script, "sh"])
        .arg(&root.0)
        .output()
        .unwrap();
    assert_eq!((r.status.code(), text(&r.stdout).as_str()), (Some(0), "ran in the chroot\n"), "{}", text(&r.stderr));
}
