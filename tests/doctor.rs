//! `nixqimg doctor` on real aarch64 programs, in private binfmt_misc instances, with a nix.conf the
//! test writes (NIX_CONF_DIR), so every verdict is the test's to know:
//! - the guest_base prediction for first loads at 0x3ff000 (bootstrap-tools after patchelf),
//!   0x3fc000 (`patchelf --page-size 16384`) and 0x400000, for 4K, 16K and 64K pages, and the plan
//!   that follows from it (loader-first where the direct run would fail);
//! - `--try` really running the program direct and loader-first;
//! - problems with their one-line fixes and exit 1; none and exit 0 once registered and configured.

mod binfmt_support;

use binfmt_support::{need, ns, probes, q, TempDir, NIXQIMG};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// A bootstrap-tools-like store tree with Debian's arm64 loader and libc, and three non-PIE copies
/// of the probe whose PT_INTERP and RPATH point into it, laid out by patchelf with 4K pages (first load
/// 0x3ff000) and 16K pages (0x3fc000), and one left alone (0x400000).
struct Tree {
    _dir: TempDir,
    p3ff: PathBuf,
    p3fc: PathBuf,
    p400: PathBuf,
}

fn tree() -> Tree {
    need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
    need("patchelf", "patchelf");
    let dir = TempDir::new("doctor");
    let bt = dir.path().join(format!("store/{HASH}-bootstrap-tools"));
    std::fs::create_dir_all(bt.join("lib")).unwrap();
    std::fs::create_dir_all(bt.join("bin")).unwrap();
    for lib in ["ld-linux-aarch64.so.1", "libc.so.6"] {
        std::fs::copy(Path::new("/usr/aarch64-linux-gnu/lib").join(lib), bt.join("lib").join(lib))
            .unwrap_or_else(|e| panic!("{lib}: {e} (install libc6-dev-arm64-cross)"));
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/binfmt_support/probe.c");
    let nopie = bt.join("bin/nopie");
    let st = Command::new("aarch64-linux-gnu-gcc").args(["-O2", "-no-pie", "-o"]).arg(&nopie).arg(&src).status();
    assert!(st.unwrap().success());
    let loader = bt.join("lib/ld-linux-aarch64.so.1");
    let variant = |name: &str, page: Option<&str>| {
        let p = bt.join("bin").join(name);
        std::fs::copy(&nopie, &p).unwrap();
        let mut c = Command::new("patchelf");
        if let Some(ps) = page {
            c.args(["--page-size", ps]);
        }
        // As bootstrap-tools' programs are: PT_INTERP and a forced RPATH into the tree.
        c.arg("--set-interpreter").arg(&loader).args(["--force-rpath", "--set-rpath"]).arg(bt.join("lib"));
        assert!(c.arg(&p).status().unwrap().success());
        p
    };
    let p3ff = variant("p3ff", Some("4096"));
    let p3fc = variant("p3fc", Some("16384"));
    let p400 = bt.join("bin/p400");
    std::fs::copy(&nopie, &p400).unwrap();
    // p400 keeps Debian's PT_INTERP; nixqimg finds the loader in the cross sysroot.
    Tree { _dir: dir, p3ff, p3fc, p400 }
}

fn doctor(args: &[&str], files: &[&Path], conf: &Path) -> (i32, String, String) {
    let out = Command::new(NIXQIMG)
        .arg("doctor")
        .args(args)
        .args(files)
        .env("NIX_CONF_DIR", conf)
        .env_remove("NIXQIMG_STRATEGY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn guest_base_is_predicted_per_page_size_and_the_plan_goes_loader_first_where_direct_would_fail() {
    let t = tree();
    let conf = TempDir::new("doctor-conf");
    let files = [t.p3ff.as_path(), t.p3fc.as_path(), t.p400.as_path()];
    for page in [4096u64, 16384, 65536] {
        let (_, out, err) = doctor(&["--json", "--page-size", &page.to_string()], &files, conf.path());
        let j = json(&out);
        assert_eq!(j["host"]["assumed_page_size"], page, "{err}");
        let bins = j["binaries"].as_array().unwrap();
        let lows: Vec<&str> = bins.iter().map(|b| b["lowest_load"].as_str().unwrap()).collect();
        assert_eq!(lows, ["0x3ff000", "0x3fc000", "0x400000"]);
        let risk: Vec<bool> = bins.iter().map(|b| b["guest_base"]["risk"].as_bool().unwrap()).collect();
        let want = match page {
            4096 => [false, false, false],
            16384 => [true, false, false],
            _ => [true, true, false],
        };
        assert_eq!(risk, want, "page size {page}");
        for (b, r) in bins.iter().zip(want) {
            assert_eq!(b["elf_type"], "ET_EXEC");
            assert_eq!(b["system"], "aarch64-linux");
            assert_eq!(b["guest_base"]["by_page_size"]["16384"], b["lowest_load"] == "0x3ff000");
            // Where direct would fail, the interpreter's plan is loader-first (ld.so is ET_DYN).
            if r {
                assert_eq!(b["plan"]["mode"], "loader-first", "{b}");
            }
        }
        // p3ff's loader is at its PT_INTERP: on 4K pages nothing forces loader-first.
        if page == 4096 {
            assert_eq!(bins[0]["plan"]["mode"], "direct", "{}", bins[0]);
            assert_eq!(bins[0]["interp_exists"], true);
        }
    }
    let (_, text, _) = doctor(&["--page-size", "16384"], &[t.p3ff.as_path()], conf.path());
    assert!(text.contains("\n  lowest load: 0x3ff000\n"), "{text}");
    assert!(
        text.contains(
            "\n  guest_base run directly: FAILS on 16384-byte pages (4096: ok, 16384: fails, 65536: fails)\n"
        ),
        "{text}"
    );
    assert!(text.contains("predicting for page size 16384 (--page-size)"), "{text}");
}

#[test]
fn try_runs_the_program_direct_and_loader_first() {
    let t = tree();
    let conf = TempDir::new("doctor-conf");
    let (_, out, err) = doctor(&["--json", "--try"], &[t.p3ff.as_path()], conf.path());
    let j = json(&out);
    let tries = j["binaries"][0]["tries"].as_array().unwrap_or_else(|| panic!("{out}\n{err}"));
    let names: Vec<&str> = tries.iter().map(|t| t["strategy"].as_str().unwrap()).collect();
    assert_eq!(names, ["direct", "loader-first"]);
    for t0 in tries {
        assert_eq!(t0["exit_code"], 0, "{t0}");
        let so = t0["stdout"].as_str().unwrap();
        assert!(so.starts_with(&format!("argc=1\nargv[0]={}\n", t.p3ff.display())), "{t0}");
    }
    // Loader-first really went through the tree's loader.
    let argv: Vec<&str> = tries[1]["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let after = &argv[argv.iter().position(|a| *a == "--").unwrap() + 1..];
    assert!(after[0].ends_with("-bootstrap-tools/lib/ld-linux-aarch64.so.1"), "{argv:?}");
    assert_eq!(after[1], "--inhibit-cache");
    // A static program is never handed to ld.so: one try only.
    let (_, out, _) = doctor(&["--json", "--try"], &[probes().static_.as_path()], conf.path());
    let j = json(&out);
    assert_eq!(j["binaries"][0]["is_static"], true);
    assert_eq!(j["binaries"][0]["tries"].as_array().unwrap().len(), 1);
    assert_eq!(j["binaries"][0]["tries"][0]["exit_code"], 0);
}

#[test]
fn problems_come_with_fixes_and_exit_1_until_registered_and_configured() {
    need("nix", "nix-bin");
    let p = probes();
    let conf = TempDir::new("doctor-nixconf");
    let qemu = std::fs::canonicalize("/usr/bin/qemu-aarch64-static").expect("install qemu-user-static");
    std::fs::write(conf.path().join("nix.conf"), "sandbox = true\nbuild-users-group =\n").unwrap();
    let good = TempDir::new("doctor-nixconf-good");
    std::fs::write(
        good.path().join("nix.conf"),
        format!(
            "sandbox = true\nbuild-users-group =\nextra-platforms = aarch64-linux\nextra-sandbox-paths = {}\n",
            qemu.display()
        ),
    )
    .unwrap();
    let script = format!(
        r#"
d() {{ NIX_CONF_DIR=$1 "$NQ" doctor --json {probe} > /tmp/d.json; echo "rc=$?"; cat /tmp/d.json; echo "==="; }}
d {bad}
"$NQ" register aarch64 >/dev/null
d {bad}
d {good}
"#,
        probe = q(&p.static_),
        bad = q(conf.path()),
        good = q(good.path()),
    );
    let out = ns(&script, &[], T);
    let s = out.ok();
    let runs: Vec<&str> = s.split("===\n").collect();
    let parse = |r: &str| {
        let (rc, js) = r.split_once('\n').unwrap();
        (rc.to_string(), json(js))
    };
    let problems = |j: &serde_json::Value| -> Vec<(String, String)> {
        j["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["severity"] == "problem")
            .map(|f| (f["what"].as_str().unwrap().to_string(), f["fix"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    let (rc, j) = parse(runs[0]);
    assert_eq!(rc, "rc=1");
    let pr = problems(&j);
    assert!(
        pr.contains(&(
            "no binfmt_misc entry serves aarch64-linux: its programs fail with 'Exec format error'".into(),
            "nixqimg register aarch64-linux".into()
        )),
        "{pr:?}"
    );
    assert_eq!(j["problems"], pr.len());
    let (rc, j) = parse(runs[1]);
    assert_eq!(rc, "rc=1", "{j}");
    let pr = problems(&j);
    assert!(
        pr.iter().any(|(w, f)| w.contains("aarch64-linux")
            && w.contains("extra-platforms")
            && f.contains("extra-platforms = aarch64-linux")),
        "{pr:?}"
    );
    assert!(
        pr.iter().any(|(w, f)| w.contains(&qemu.display().to_string()) && f.contains("extra-sandbox-paths")),
        "{pr:?}"
    );
    let sys = j["host"]["systems"].as_array().unwrap().iter().find(|s| s["system"] == "aarch64-linux").unwrap().clone();
    assert_eq!(sys["served_by"], "nixqimg-aarch64");
    assert_eq!(sys["flags"], "PF");
    assert_eq!(sys["qemu"], qemu.display().to_string());
    assert_eq!(sys["qemu_static"], true);
    assert!(sys["qemu_version"].as_str().unwrap().starts_with("qemu-aarch64 version "), "{sys}");
    assert_eq!(j["binaries"][0]["binfmt_entry"], "nixqimg-aarch64");
    assert_eq!(j["host"]["nix"]["sandbox"], "true");
    let (rc, j) = parse(runs[2]);
    assert_eq!(problems(&j), Vec::<(String, String)>::new());
    assert_eq!(rc, "rc=0");
    assert_eq!(j["host"]["nix"]["extra_platforms"], serde_json::json!(["aarch64-linux"]));
    // The nixqimg under test is a dynamic build: fine here, not inside a sandboxed build.
    let warn = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["severity"] == "warning" && f["subject"] == "aarch64-linux");
    assert_eq!(
        warn.unwrap()["what"],
        format!("{NIXQIMG} is dynamically linked: inside the Nix sandbox its loader and libraries are not visible")
    );
}

#[test]
fn inside_nixqimg_ns_doctor_knows_the_instance_is_private() {
    // This machine has /.dockerenv; doctor used to call every binfmt_misc here "the host's".
    let conf = TempDir::new("doctor-ns-conf");
    let out = Command::new(NIXQIMG)
        .args(["ns", "--systems", "aarch64-linux", "--", NIXQIMG, "doctor", "--json"])
        .env("NIX_CONF_DIR", conf.path())
        .output()
        .unwrap();
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["host"]["binfmt_scope"], "nixqimg-ns", "{v}");
    let whats: Vec<&str> = v["findings"].as_array().unwrap().iter().map(|f| f["what"].as_str().unwrap()).collect();
    assert!(whats.iter().all(|w| !w.contains("the host's")), "{whats:?}");
    assert!(whats.iter().any(|w| w.contains("private instance of `nixqimg ns`")), "{whats:?}");
    // Outside, in the initial user namespace, the marker proves nothing.
    let (_, out, _) = doctor(&["--json"], &[], conf.path());
    assert_ne!(json(&out)["host"]["binfmt_scope"], "nixqimg-ns");
}
