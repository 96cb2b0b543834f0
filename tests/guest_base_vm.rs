//! The failure that started nixqimg, reproduced on a real 16K-page arm64 kernel and shown fixed:
//! qemu-x86_64 cannot place an x86_64 ET_EXEC program whose first PT_LOAD is at 0x3ff000 (what
//! `patchelf --set-interpreter` makes of nixpkgs' bootstrap-tools) when the host's pages are 16K.
//!
//! Each kernel (Debian trixie `linux-image-*-arm64-16k`, and the 4K `linux-image-*-arm64` as control)
//! boots once under qemu-system-aarch64 with TCG; its /init (tests/vm_support/init) loads binfmt_misc,
//! runs every case and prints `@@` lines on the serial console. Three builds of one x86_64 program
//! (it prints its argv) are run: first PT_LOAD at 0x3ff000 (bootstrap-tools-like store path), 0x3fc000
//! (`patchelf --page-size 16384`) and 0x400000 (plain `gcc -no-pie`).

mod vm_support;

use serde_json::{json, Value};
use vm_support::{boot_16k, boot_4k, parts, Boot};

const GUEST_BASE: &str = "Unable to find a guest_base to satisfy all guest address mapping requirements";
/// What the program prints when started through the kernel as `exec -a "my argv0" PROG "a b" "" c`.
const ARGV_KEPT: &str = "argv: [my argv0] [a b] [] [c]";

fn store() -> &'static str {
    &parts().store
}

/// The case ran to the end with status `rc` and printed exactly `out`.
fn assert_case(b: &Boot, name: &str, rc: i32, out: &[String]) {
    let c = b.case(name);
    assert_eq!((c.rc, c.out.as_slice()), (Some(rc), out), "case {name} of {}; serial log:\n{}", b.header, b.log);
}

fn argv_with_path(path: &str) -> Vec<String> {
    vec![format!("argv: [{path}] [a b] [] [c]")]
}

fn assert_explain(b: &Boot, name: &str, want: &str) {
    let c = b.case(name);
    assert_eq!(c.rc, Some(0), "{name}:\n{}", c.text());
    assert!(c.out.iter().any(|l| l == want), "{name} does not say {want:?}:\n{}", c.text());
}

/// Per binary of a `doctor --json` report: path, lowest load, the guest_base verdict for the page size
/// doctor assumed, the verdict for 4K/16K/64K pages, and the interpreter's plan mode.
fn doctor_verdicts(report: &Value) -> Vec<Value> {
    let bins = report["binaries"].as_array().unwrap_or_else(|| panic!("no binaries in {report:#}"));
    bins.iter()
        .map(|b| {
            json!({
                "path": b["path"],
                "lowest_load": b["lowest_load"],
                "elf_type": b["elf_type"],
                "page_size": b["guest_base"]["page_size"],
                "risk": b["guest_base"]["risk"],
                "by_page_size": b["guest_base"]["by_page_size"],
                "plan": b["plan"]["mode"],
            })
        })
        .collect()
}

fn verdict(path: &str, lo: &str, page: u64, risk: bool, by: [bool; 3], plan: &str) -> Value {
    json!({
        "path": path,
        "lowest_load": lo,
        "elf_type": "ET_EXEC",
        "page_size": page,
        "risk": risk,
        "by_page_size": {"4096": by[0], "16384": by[1], "65536": by[2]},
        "plan": plan,
    })
}

#[test]
fn the_test_programs_and_parts_are_what_the_bug_report_describes() {
    let p = parts();
    assert_eq!(p.load_3ff, "0x00000000003ff000", "patchelf --set-interpreter into the store");
    assert_eq!(p.load_3fc, "0x00000000003fc000", "patchelf --page-size 16384");
    assert_eq!(p.load_400, "0x0000000000400000", "gcc -no-pie");
    assert!(p.package16k.ends_with("-arm64-16k"), "{}", p.package16k);
    // trixie's qemu-user-static is only transitional: the binaries in qemu-user must be static.
    assert!(
        p.qemu_file.contains("ARM aarch64") && p.qemu_file.contains("static"),
        "qemu-x86_64 from qemu-user:arm64 is not a static arm64 program: {}",
        p.qemu_file
    );
}

#[test]
fn on_16k_pages_qemu_run_directly_cannot_find_a_guest_base_for_the_0x3ff000_program() {
    let b = boot_16k();
    eprintln!("16K boot took {:?}", b.took);
    assert!(b.header.ends_with("KernelPageSize: 16 kB"), "{}", b.header);
    let c = b.case("direct_3ff");
    assert_eq!(c.rc, Some(1), "{}", c.text());
    assert_eq!(
        c.out.first().map(String::as_str),
        Some(format!("qemu-x86_64: {}/bin/argv: {GUEST_BASE}", store()).as_str())
    );
    // The ranges qemu could not reserve: page 0 and the image from 0x3ff000.
    assert!(c.out.iter().any(|l| l.trim_start().starts_with("00000000003ff000-")), "{}", c.text());
    // Aligned to the host's page, the same program runs directly.
    assert_case(b, "direct_3fc", 0, &argv_with_path(&format!("{}/bin/argv-16k", store())));
    assert_case(b, "direct_400", 0, &argv_with_path("/opt/argv-400000"));
}

#[test]
fn on_16k_pages_a_plain_binfmt_entry_for_qemu_fails_the_same_way() {
    let b = boot_16k();
    // binfmt_misc is a module in both kernels (CONFIG_BINFMT_MISC=m).
    assert_case(b, "insmod", 0, &[]);
    assert_case(b, "mount", 0, &[]);
    assert_case(b, "plain_register", 0, &[]);
    let c = b.case("plain_3ff");
    assert_eq!(c.rc, Some(1), "{}", c.text());
    assert_eq!(
        c.out.first().map(String::as_str),
        Some(format!("qemu-x86_64: {}/bin/argv: {GUEST_BASE}", store()).as_str())
    );
    assert_case(b, "plain_unregister", 0, &[]);
}

#[test]
fn on_16k_pages_nixqimg_as_the_binfmt_interpreter_runs_all_three_with_their_exact_argv() {
    let b = boot_16k();
    assert_eq!(b.case("nixqimg_register").rc, Some(0), "{}", b.case("nixqimg_register").text());
    let entry = b.case("nixqimg_entry");
    assert!(entry.out.iter().any(|l| l == "interpreter /usr/bin/nixqimg"), "{}", entry.text());
    assert!(entry.out.iter().any(|l| l == "flags: PF"), "{}", entry.text());
    for name in ["nixqimg_3ff", "nixqimg_3fc", "nixqimg_400"] {
        assert_case(b, name, 0, &[ARGV_KEPT.to_string()]);
    }
}

#[test]
fn on_16k_pages_nixqimg_predicts_the_failure_for_0x3ff000_and_goes_loader_first() {
    let b = boot_16k();
    assert_explain(
        b,
        "explain_3ff",
        "# lowest load address 0x3ff000; host page size 16384: qemu cannot reserve it (guest_base failure)",
    );
    let plan = b.case("explain_3ff").out.last().cloned().unwrap_or_default();
    let loader_first = format!(
        "/usr/bin/qemu-x86_64 -0 {s}/bin/argv -- {s}/lib/ld-linux-x86-64.so.2 --inhibit-cache --argv0 {s}/bin/argv {s}/bin/argv 'a b' '' c",
        s = store()
    );
    assert_eq!(plan, loader_first);
    assert_explain(b, "explain_3fc", "# lowest load address 0x3fc000; host page size 16384: qemu can place it");
    assert_explain(b, "explain_400", "# lowest load address 0x400000; host page size 16384: qemu can place it");
}

#[test]
fn on_16k_pages_doctor_predicts_the_failure_for_0x3ff000_not_0x400000_and_for_0x3fc000_only_on_64k_pages() {
    let b = boot_16k();
    let s = store();
    let c = b.case("doctor_json");
    assert_eq!(c.rc, Some(0), "{}", c.text());
    let r = c.json();
    assert_eq!(r["host"]["page_size"], 16384);
    assert_eq!(r["host"]["systems"][0]["served_by"], "nixqimg-x86_64", "{r:#}");
    assert_eq!(
        doctor_verdicts(&r),
        vec![
            verdict(&format!("{s}/bin/argv"), "0x3ff000", 16384, true, [false, true, true], "loader-first"),
            verdict(&format!("{s}/bin/argv-16k"), "0x3fc000", 16384, false, [false, false, true], "direct"),
            verdict("/opt/argv-400000", "0x400000", 16384, false, [false, false, false], "direct"),
        ]
    );
    // Served by nixqimg, the predicted failure is avoided: no problem to report.
    assert_eq!(r["problems"], 0, "{:#}", r["findings"]);

    // Asked for 64K pages, doctor says the 16K-aligned program would fail there, and nixqimg would
    // then run it loader-first.
    let c = b.case("doctor_64k");
    let r = c.json();
    assert_eq!((r["host"]["page_size"].clone(), r["host"]["assumed_page_size"].clone()), (json!(16384), json!(65536)));
    assert_eq!(
        doctor_verdicts(&r),
        vec![verdict(&format!("{s}/bin/argv-16k"), "0x3fc000", 65536, true, [false, false, true], "loader-first")]
    );
}

#[test]
fn on_16k_pages_doctor_names_the_fix_when_plain_qemu_serves_x86_64() {
    let b = boot_16k();
    let c = b.case("doctor_plain");
    // doctor exits 1 when it found a problem.
    assert_eq!(c.rc, Some(1), "{}", c.text());
    let r = c.json();
    let path = format!("{}/bin/argv", store());
    let problems: Vec<&Value> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "problem" && f["subject"] == path.as_str())
        .collect();
    assert_eq!(problems.len(), 1, "{:#}", r["findings"]);
    assert!(problems[0]["what"].as_str().unwrap_or("").contains("guest_base"), "{:#}", problems[0]);
    assert_eq!(problems[0]["fix"], "nixqimg register --replace x86_64-linux");
    assert_eq!(r["binaries"][0]["binfmt_entry"], "qemu-x86_64");
}

#[test]
fn on_16k_pages_doctor_try_shows_direct_failing_and_loader_first_running() {
    let b = boot_16k();
    let r = b.case("doctor_try").json();
    let tries = &r["binaries"][0]["tries"];
    let direct = &tries[0];
    assert_eq!((direct["strategy"].as_str(), direct["exit_code"].as_i64()), (Some("direct"), Some(1)), "{tries:#}");
    let first_line = direct["stderr"].as_str().unwrap_or("").lines().next().unwrap_or("").to_string();
    assert_eq!(first_line, format!("qemu-x86_64: {}/bin/argv: {GUEST_BASE}", store()));
    let lf = &tries[1];
    assert_eq!((lf["strategy"].as_str(), lf["exit_code"].as_i64()), (Some("loader-first"), Some(0)), "{tries:#}");
    assert_eq!(lf["stdout"], format!("argv: [{}/bin/argv]\n", store()));
}

#[test]
fn on_4k_pages_everything_runs_and_nothing_is_predicted_to_fail() {
    let b = boot_4k();
    eprintln!("4K boot took {:?}", b.took);
    assert!(b.header.ends_with("KernelPageSize: 4 kB"), "{}", b.header);
    let s = store();
    assert_case(b, "direct_3ff", 0, &argv_with_path(&format!("{s}/bin/argv")));
    assert_case(b, "direct_3fc", 0, &argv_with_path(&format!("{s}/bin/argv-16k")));
    assert_case(b, "direct_400", 0, &argv_with_path("/opt/argv-400000"));
    // A plain entry (no P) runs it too, but argv[0] is lost: the program sees its path.
    assert_case(b, "plain_3ff", 0, &argv_with_path(&format!("{s}/bin/argv")));
    for name in ["nixqimg_3ff", "nixqimg_3fc", "nixqimg_400"] {
        assert_case(b, name, 0, &[ARGV_KEPT.to_string()]);
    }
    for (name, lo) in [("explain_3ff", "0x3ff000"), ("explain_3fc", "0x3fc000"), ("explain_400", "0x400000")] {
        assert_explain(b, name, &format!("# lowest load address {lo}; host page size 4096: qemu can place it"));
    }
    let s = store();
    let r = b.case("doctor_json").json();
    assert_eq!(r["host"]["page_size"], 4096);
    // Nothing fails here, though doctor still tells what 16K/64K hosts would do.
    assert_eq!(
        doctor_verdicts(&r),
        vec![
            verdict(&format!("{s}/bin/argv"), "0x3ff000", 4096, false, [false, true, true], "direct"),
            verdict(&format!("{s}/bin/argv-16k"), "0x3fc000", 4096, false, [false, false, true], "direct"),
            verdict("/opt/argv-400000", "0x400000", 4096, false, [false, false, false], "direct"),
        ]
    );
    assert_eq!(r["problems"], 0, "{:#}", r["findings"]);
    // Even with plain qemu serving x86_64, nothing here is a problem.
    let plain = b.case("doctor_plain");
    assert_eq!(plain.rc, Some(0), "{}", plain.text());
    assert_eq!(plain.json()["problems"], 0, "{}", plain.text());
    let tries = b.case("doctor_try").json()["binaries"][0]["tries"].clone();
    let codes: Vec<_> =
        tries.as_array().unwrap().iter().map(|t| (t["strategy"].clone(), t["exit_code"].clone())).collect();
    assert_eq!(codes, vec![(json!("direct"), json!(0)), (json!("loader-first"), json!(0))]);
    assert_eq!(tries[0]["stderr"], "", "{tries:#}");
    // The 64K prediction does not depend on the host it is made on.
    let r = b.case("doctor_64k").json();
    assert_eq!(
        doctor_verdicts(&r),
        vec![verdict(&format!("{s}/bin/argv-16k"), "0x3fc000", 65536, true, [false, false, true], "loader-first")]
    );
}
