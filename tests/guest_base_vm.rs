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
    assert_case(b, "nixqimg_register", 0, &[]);
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
    assert!(!b.log.contains("guest_base"), "serial log:\n{}", b.log);
}
