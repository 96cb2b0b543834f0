//! `nixqimg register / unregister / status` through the kernel, each test in its own private
//! binfmt_misc instance: real aarch64 programs run by path, through PATH and via a shebang under
//! P, PF and POCF; conflicts with another entry registered before and after, and which one the
//! kernel really uses; `--dry-run`, `--replace` and `unregister` putting the displaced entry back.

mod binfmt_support;

use binfmt_support::{ns, probes, q, Out, TempDir, NIXQIMG};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// The probe's report for `args` with argv[0] `argv0`, as the guest must see it.
fn report(argv0: &str, args: &[&str], env: &[&str], exe: &str) -> String {
    let mut s = format!("argc={}\nargv[0]={argv0}\n", args.len() + 1);
    for (i, a) in args.iter().enumerate() {
        s.push_str(&format!("argv[{}]={a}\n", i + 1));
    }
    for e in env {
        s.push_str(&format!("env={e}\n"));
    }
    s.push_str(&format!("uid=0 euid=0\nfds=0,1,2\nexe={exe}\n"));
    s
}

#[test]
fn foreign_programs_run_by_path_through_path_and_by_shebang_under_p_pf_and_pocf() {
    let p = probes();
    let d = TempDir::new("exec");
    let bin = d.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(&p.static_, bin.join("probe")).unwrap();
    std::fs::copy(&p.dynamic, bin.join("probe-dyn")).unwrap();
    let script = d.path().join("script");
    std::fs::write(&script, format!("#!{} shebang-arg\n", bin.join("probe").display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for flags in ["P", "PF", "POCF"] {
        let out = ns(
            &format!(
                r#"set -e
"$NQ" register --flags {flags} aarch64-linux
cd {dir}
echo "== by path"; BF_X='a b' ./bin/probe one 'two words' ''
echo "== renamed"; (exec -a renamed ./bin/probe x)
echo "== dynamic"; (exec -a dyn ./bin/probe-dyn x)
echo "== PATH"; PATH={bin}:$PATH probe y
echo "== shebang"; ./script z
"#,
                dir = q(d.path()),
                bin = q(&bin),
            ),
            &[],
            T,
        );
        let b = bin.display().to_string();
        let dir = d.path().display().to_string();
        // P keeps argv[0]; with O/C the kernel's fd is handed to qemu, so /proc/self/exe is still
        // the program's own path (qemu resolves it back).
        let mut want = String::from("nixqimg-aarch64: registered for aarch64-linux\n");
        // With F, the qemu marker entry for chroots without qemu comes along (README).
        if flags.contains('F') {
            want += "nixqimg-aarch64-qemu: registered for aarch64-linux\n";
        }
        want += "== by path\n";
        want += &report("./bin/probe", &["one", "two words", ""], &["BF_X=a b"], &format!("{dir}/bin/probe"));
        want += "== renamed\n";
        want += &report("renamed", &["x"], &[], &format!("{dir}/bin/probe"));
        want += "== dynamic\n";
        want += &report("dyn", &["x"], &[], "");
        want += "== PATH\n";
        want += &report("probe", &["y"], &[], &format!("{b}/probe"));
        want += "== shebang\n";
        want += &report(&format!("{b}/probe"), &["shebang-arg", "./script", "z"], &[], &format!("{b}/probe"));
        assert_out(&out, &want, &format!("flags {flags}"));
    }
}

/// Compares line by line, except `exe=` of loader-first runs (the loader, per NOTES), which only
/// has to be there.
fn assert_out(out: &Out, want: &str, what: &str) {
    let got = out.ok();
    let g: Vec<&str> = got.lines().collect();
    let w: Vec<&str> = want.lines().collect();
    assert_eq!(g.len(), w.len(), "{what}: got\n{got}\nwant\n{want}\nstderr:\n{}", out.stderr);
    for (a, b) in g.iter().zip(&w) {
        if *b == "exe=" {
            assert!(a.starts_with("exe="), "{what}: {a} vs {b}\ngot\n{got}");
        } else {
            assert_eq!(a, b, "{what}: got\n{got}\nwant\n{want}\nstderr:\n{}", out.stderr);
        }
    }
}

#[test]
fn register_is_idempotent_and_status_and_unregister_round_trip() {
    let out = ns(
        r#"
"$NQ" register aarch64-linux riscv64; echo "rc=$?"
"$NQ" register arm64; echo "rc=$?"
"$NQ" status --json > /tmp/status1.json; echo "rc=$?"
"$NQ" unregister aarch64; echo "rc=$?"
"$NQ" status; echo "rc=$?"
"$NQ" unregister; echo "rc=$?"
ls /proc/sys/fs/binfmt_misc
"$NQ" unregister; echo "rc=$?"
echo ==json; cat /tmp/status1.json
"#,
        &[],
        T,
    );
    let s = out.ok();
    let (text, js) = s.split_once("==json\n").unwrap();
    let want_head =
        "nixqimg-aarch64: registered for aarch64-linux\nnixqimg-riscv64: registered for riscv64-linux\n\
                     nixqimg-aarch64-qemu: registered for aarch64-linux\nnixqimg-riscv64-qemu: registered for riscv64-linux\nrc=0\n\
                     nixqimg-aarch64: already registered for aarch64-linux\nnixqimg-aarch64-qemu: already registered for aarch64-linux\nrc=0\nrc=0\n\
                     nixqimg-aarch64-qemu: removed\nnixqimg-aarch64: removed\nrc=0\n";
    assert!(text.starts_with(want_head), "{text}");
    assert!(text.contains("\naarch64-linux: not served ('nixqimg register aarch64-linux')\n"), "{text}");
    assert!(text.contains("\nriscv64-linux: served by nixqimg-riscv64 (PF)\n"), "{text}");
    assert!(text.contains("\nx86_64-linux: native (host architecture)\n"), "{text}");
    assert!(
        text.ends_with(
            "nixqimg-riscv64-qemu: removed\nnixqimg-riscv64: removed\nrc=0\nregister\nstatus\nno nixqimg entries to remove\nrc=0\n"
        ),
        "{text}"
    );
    let j = json(js);
    assert_eq!(j["binfmt_misc"]["mounted"], true);
    let e = j["entries"].as_array().unwrap();
    assert_eq!(e.len(), 4);
    let m = e.iter().find(|e| e["name"] == "nixqimg-aarch64-qemu").unwrap();
    assert_eq!((m["flags"].as_str(), m["owner"].as_str()), (Some("POF"), Some("nixqimg")));
    assert_eq!(m["magic"], "7f454c4602010100004e0000000000000200b700");
    assert_eq!(
        (m["systems"].clone(), m["carries"].clone()),
        (serde_json::json!([]), serde_json::json!(["aarch64-linux"]))
    );
    let a = e.iter().find(|e| e["name"] == "nixqimg-aarch64").unwrap();
    assert_eq!(a["interpreter"], NIXQIMG);
    assert_eq!(a["flags"], "PF");
    assert_eq!(a["owner"], "nixqimg");
    assert_eq!(a["magic"], "7f454c460201010000000000000000000200b700");
    assert_eq!(a["mask"], "ffffffffffffff00fffffffffffffffffeffffff");
    assert_eq!(a["systems"], serde_json::json!(["aarch64-linux"]));
    let sys = j["systems"].as_array().unwrap().iter().find(|s| s["system"] == "aarch64-linux").unwrap();
    assert_eq!(sys["served_by"], "nixqimg-aarch64");
    assert_eq!(sys["conflict"], false);
}

#[test]
fn refusals_say_why_with_usage_exit_codes() {
    let out = ns(
        r#"
umount /proc/sys/fs/binfmt_misc
"$NQ" register aarch64; echo "rc=$?"
"$NQ" register --mount aarch64 >/dev/null; echo "rc=$?"
"$NQ" register x86_64-linux; echo "rc=$?"
"$NQ" register; echo "rc=$?"
"$NQ" register vax; echo "rc=$?"
"$NQ" register --flags PQ aarch64; echo "rc=$?"
"#,
        &[],
        T,
    );
    assert_eq!(out.ok(), "rc=1\nrc=0\nrc=2\nrc=2\nrc=2\nrc=2\n", "stderr:\n{}", out.stderr);
    let e: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(e[0], "nixqimg: binfmt_misc is not mounted at /proc/sys/fs/binfmt_misc (rerun with --mount, or: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)");
    assert_eq!(e[1], "nixqimg: x86_64-linux runs natively on this host (host architecture); registering it would send native programs through qemu (leave it out; --all skips native systems)");
    assert_eq!(e[2], "nixqimg: name the systems to register, or --all (e.g. nixqimg register aarch64-linux)");
    assert!(
        e[3].starts_with(
            "nixqimg: 'vax' is not a system nixqimg knows (one of x86_64-linux, i686-linux, aarch64-linux,"
        ),
        "{}",
        e[3]
    );
    assert_eq!(
        e[4],
        "nixqimg: binfmt flag 'Q' is not one of P, O, C, F (e.g. --flags PF (the default) or --flags POCF)"
    );
}

#[test]
fn dry_run_prints_the_exact_line_and_changes_nothing() {
    let p = probes();
    let out = ns(
        &format!(
            r#"
"$NQ" register --dry-run aarch64; echo "rc=$?"
ls /proc/sys/fs/binfmt_misc
{probe}; echo "rc=$?"
"#,
            probe = q(&p.static_)
        ),
        &[],
        T,
    );
    let want = format!(
        "would write ':nixqimg-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:{NIXQIMG}:PF' to /proc/sys/fs/binfmt_misc/register\n\
         would write ':nixqimg-aarch64-qemu:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x4e\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:{qemu}:POF' to /proc/sys/fs/binfmt_misc/register\nrc=0\nregister\nstatus\nrc=126\n",
        qemu = std::fs::canonicalize("/usr/bin/qemu-aarch64-static").unwrap().display()
    );
    assert_eq!(out.ok(), want, "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("Exec format error"), "{}", out.stderr);
}

/// A plain qemu entry (flags F, no P) loses argv[0]: the guest sees the program's path there. Under
/// nixqimg (always P) the guest sees the argv[0] it was given. That tells which entry ran.
const QEMU_ENTRY: &str = r"printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' > /proc/sys/fs/binfmt_misc/register";

fn who_ran(probe: &str) -> String {
    format!("(exec -a WHO {probe} | sed -n 's/^argv.0.=//p')")
}

#[test]
fn conflicting_entry_registered_before_nixqimg_needs_replace_and_comes_back_on_unregister() {
    binfmt_support::need("qemu-aarch64-static", "qemu-user-static");
    let p = probes();
    let probe = q(&p.static_);
    let out = ns(
        &format!(
            r#"
{QEMU_ENTRY}
echo "-- qemu only"; {who}
"$NQ" register aarch64; echo "rc=$?"
"$NQ" status --json > /tmp/s0.json
"$NQ" register --replace aarch64; echo "rc=$?"
echo "-- after replace"; {who}
"$NQ" status --json > /tmp/s1.json
"$NQ" status | grep '^aarch64-linux'
"$NQ" unregister; echo "rc=$?"
echo "-- after unregister"; {who}
cat /proc/sys/fs/binfmt_misc/qemu-aarch64 | head -1
echo "== s0"; cat /tmp/s0.json; echo "== s1"; cat /tmp/s1.json
"#,
            who = who_ran(&probe)
        ),
        &[],
        T,
    );
    let s = out.ok();
    let (text, rest) = s.split_once("== s0\n").unwrap();
    let (s0, s1) = rest.split_once("== s1\n").unwrap();
    let path = p.static_.display().to_string();
    assert_eq!(
        text,
        format!(
            "-- qemu only\n{path}\nrc=1\n\
             nixqimg-aarch64: registered for aarch64-linux\n\
             qemu-aarch64: disabled (aarch64-linux now goes to nixqimg; 'nixqimg unregister' re-enables it)\n\
             nixqimg-aarch64-qemu: registered for aarch64-linux\nrc=0\n\
             -- after replace\nWHO\n\
             aarch64-linux: served by nixqimg-aarch64 (PF); disabled: qemu-aarch64\n\
             nixqimg-aarch64-qemu: removed\nnixqimg-aarch64: removed\nqemu-aarch64: re-enabled for aarch64-linux\nrc=0\n\
             -- after unregister\n{path}\nenabled\n"
        ),
        "stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("nixqimg: qemu-aarch64 already serves aarch64-linux (interpreter /usr/bin/qemu-aarch64-static); nixqimg will not shadow it (rerun with --replace ('nixqimg unregister' puts it back), or remove it: echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64)"),
        "{}",
        out.stderr
    );
    let sys = |j: &serde_json::Value| {
        j["systems"].as_array().unwrap().iter().find(|s| s["system"] == "aarch64-linux").unwrap().clone()
    };
    let a0 = sys(&json(s0));
    assert_eq!(a0["served_by"], "qemu-aarch64");
    assert_eq!(a0["served_by_nixqimg"], false);
    let a1 = sys(&json(s1));
    assert_eq!(a1["served_by"], "nixqimg-aarch64");
    assert_eq!(a1["disabled"], serde_json::json!(["qemu-aarch64"]));
}

/// procfs shows no order: status derives it from registration order, and the kernel agrees. Both
/// orders, both entries enabled, then an exec.
#[test]
fn with_two_enabled_entries_status_names_the_one_the_kernel_really_uses() {
    binfmt_support::need("qemu-aarch64-static", "qemu-user-static");
    let p = probes();
    let probe = q(&p.static_);
    let ours = {
        let l = ns("\"$NQ\" register --dry-run aarch64", &[], T);
        let l = l.ok().trim().to_string();
        l.strip_prefix("would write '").unwrap().split_once("' to ").unwrap().0.to_string()
    };
    let out = ns(
        &format!(
            r#"
echo "== qemu first, nixqimg after"
{QEMU_ENTRY}
printf '%s' '{ours}' > /proc/sys/fs/binfmt_misc/register
"$NQ" status | grep '^aarch64-linux'; {who}
echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64; echo -1 > /proc/sys/fs/binfmt_misc/nixqimg-aarch64
echo "== nixqimg first, qemu after"
"$NQ" register aarch64
{QEMU_ENTRY}
"$NQ" status | grep '^aarch64-linux'; {who}
"$NQ" status --json | grep -c '"conflict": true'
"#,
            who = who_ran(&probe)
        ),
        &[],
        T,
    );
    let path = p.static_.display().to_string();
    assert_eq!(
        out.ok(),
        format!(
            "== qemu first, nixqimg after\n\
             aarch64-linux: served by nixqimg-aarch64 (PF); also matched by qemu-aarch64, which the kernel never reaches (it uses the newest registration)\nWHO\n\
             == nixqimg first, qemu after\nnixqimg-aarch64: registered for aarch64-linux\n\
             nixqimg-aarch64-qemu: registered for aarch64-linux\n\
             aarch64-linux: served by qemu-aarch64 (F); also matched by nixqimg-aarch64, which the kernel never reaches (it uses the newest registration)\n{path}\n1\n"
        ),
        "stderr:\n{}",
        out.stderr
    );
}

#[test]
fn direct_registers_the_static_qemu_itself_with_f() {
    binfmt_support::need("qemu-aarch64-static", "qemu-user-static");
    let p = probes();
    let out = ns(
        &format!(
            r#"
"$NQ" register --direct aarch64
"$NQ" status --json | grep -E '"(interpreter|flags)"' | head -2
(exec -a WHO {probe} k)
"#,
            probe = q(&p.static_)
        ),
        &[],
        T,
    );
    let path = p.static_.display().to_string();
    let qemu = std::fs::canonicalize("/usr/bin/qemu-aarch64-static").unwrap();
    assert_eq!(
        out.ok(),
        format!(
            "nixqimg-aarch64: registered for aarch64-linux\n      \"interpreter\": \"{}\",\n      \"flags\": \"PF\",\n{}",
            qemu.display(),
            report("WHO", &["k"], &[], &path)
        ),
        "stderr:\n{}",
        out.stderr
    );
}

#[test]
fn binfmt_d_writes_systemd_files_and_names_debians_competing_file() {
    let d = TempDir::new("binfmt-d");
    let out = std::process::Command::new(NIXQIMG)
        .args(["register", "--binfmt-d"])
        .arg(d.path())
        .arg("aarch64")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = d.path().join("nixqimg-aarch64.conf");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with("# aarch64-linux: written by 'nixqimg register --binfmt-d'\n:nixqimg-aarch64:M::\\x7f\\x45"),
        "{text}"
    );
    assert!(text.ends_with(&format!(":{NIXQIMG}:PF\n")), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{}: written for aarch64-linux\n", file.display())), "{stdout}");
    // Debian's qemu-user-static (installed for these tests) claims aarch64 too.
    assert!(
        stdout.contains("note: /usr/lib/binfmt.d/qemu-aarch64.conf registers qemu-aarch64 for aarch64-linux too, and systemd-binfmt lets the file read last win: mask it with 'ln -s /dev/null /etc/binfmt.d/qemu-aarch64.conf'"),
        "{stdout}"
    );
    assert!(stdout.ends_with("apply with: systemctl restart systemd-binfmt\n"), "{stdout}");
}

/// Every foreign architecture in the table, through `register --all` and the kernel: Debian's static
/// busybox for that architecture (real headers, not ones we wrote) must reach its qemu and run.
/// One Debian suite (trixie) keeps the download to one apt update: mips64el (released up to bookworm)
/// and loongarch64 (no release port) are checked against Debian's binfmt.d files only (unit test in
/// src/binfmt/lines.rs).
#[test]
fn register_all_runs_debians_busybox_of_every_foreign_architecture() {
    let fetch = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs");
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("debcache-binfmt");
    // (suite, Debian arch, Nix system)
    let set = [
        ("trixie", "armhf", "armv7l-linux"),
        ("trixie", "riscv64", "riscv64-linux"),
        ("trixie", "ppc64el", "powerpc64le-linux"),
        ("trixie", "s390x", "s390x-linux"),
    ];
    let pkgs: Vec<String> = set.iter().map(|s| format!("busybox-static:{}", s.1)).collect();
    let st = std::process::Command::new(&fetch).arg("trixie").arg(cache.join("trixie")).args(&pkgs).status().unwrap();
    assert!(st.success(), "fetch-debs trixie {pkgs:?} failed");
    let mut script = String::from("\"$NQ\" register --all | LC_ALL=C sort\n");
    for (suite, arch, sys) in set {
        let bb = cache.join(suite).join(format!("root/busybox-static_{arch}/usr/bin/busybox"));
        script += &format!("{} echo {sys} ran; echo \"rc=$?\"\n", q(&bb));
    }
    let out = ns(&script, &[], T);
    // Each system's entry and its qemu marker entry, in `LC_ALL=C sort`'s byte order.
    let mut lines = Vec::new();
    for n in ["aarch64", "armv7l", "loongarch64", "mips64el", "ppc64le", "riscv64", "s390x"] {
        let sys = if n == "ppc64le" { "powerpc64le".to_string() } else { n.to_string() };
        lines.push(format!("nixqimg-{n}: registered for {sys}-linux\n"));
        lines.push(format!("nixqimg-{n}-qemu: registered for {sys}-linux\n"));
    }
    lines.sort();
    let mut want = lines.concat();
    for (_, _, sys) in set {
        want += &format!("{sys} ran\nrc=0\n");
    }
    assert_eq!(out.ok(), want, "stderr:\n{}", out.stderr);
}
