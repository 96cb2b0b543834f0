//! The guest_base failure on a 64K-page arm64 kernel, and doctor's 64K verdicts checked against what
//! really happened there (until now they were only a prediction: Debian ships 4K and 16K arm64
//! kernels, no 64K one). The kernel is built from Debian's own source with a minimal configuration
//! (tests/support/build-kernel-64k, cached); it boots under qemu-system-aarch64 TCG with the same
//! initramfs and /init as the 16K test (tests/vm_support). Four builds of one x86_64 program: first
//! PT_LOAD at 0x3ff000 (bootstrap-tools-like), 0x3fc000 (16K-aligned), 0x400000 (plain -no-pie) and
//! 0x3f0000 (`patchelf --page-size 65536`, 64K-aligned).

mod vm_support;

use serde_json::Value;
use vm_support::{boot_64k, parts, Boot};

const GUEST_BASE: &str = "Unable to find a guest_base to satisfy all guest address mapping requirements";
const ARGV_KEPT: &str = "argv: [my argv0] [a b] [] [c]";

fn store() -> &'static str {
    &parts().store
}

/// doctor's guest_base verdict for the host it runs on, per program path.
fn risks(r: &Value) -> Vec<(String, bool, u64)> {
    r["binaries"]
        .as_array()
        .unwrap_or_else(|| panic!("no binaries in {r:#}"))
        .iter()
        .map(|b| {
            (
                b["path"].as_str().unwrap_or("").to_string(),
                b["guest_base"]["risk"].as_bool().unwrap_or(false),
                b["guest_base"]["page_size"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn show(b: &Boot) -> String {
    b.log.lines().filter(|l| l.starts_with("@@ ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn on_64k_pages_the_kernel_is_what_the_test_needs() {
    let b = boot_64k();
    eprintln!("64K boot took {:?}\n{}", b.took, show(b));
    assert!(b.header.ends_with("KernelPageSize: 64 kB"), "{}", b.header);
    assert_eq!(parts().load_3f0, "0x00000000003f0000", "patchelf --page-size 65536");
    // binfmt_misc is built in: no module to load.
    assert_eq!((b.case("insmod").rc, b.case("mount").rc), (Some(0), Some(0)), "{}", show(b));
}

#[test]
fn on_64k_pages_qemu_run_directly_cannot_find_a_guest_base_for_the_0x3ff000_program() {
    let b = boot_64k();
    let c = b.case("direct_3ff");
    assert_eq!(c.rc, Some(1), "{}", c.text());
    assert_eq!(
        c.out.first().map(String::as_str),
        Some(format!("qemu-x86_64: {}/bin/argv: {GUEST_BASE}", store()).as_str())
    );
}

#[test]
fn on_64k_pages_nixqimg_as_the_binfmt_interpreter_runs_every_build_with_its_exact_argv() {
    let b = boot_64k();
    assert_eq!(b.case("nixqimg_register").rc, Some(0), "{}", b.case("nixqimg_register").text());
    for name in ["nixqimg_3ff", "nixqimg_3fc", "nixqimg_400", "nixqimg_3f0"] {
        let c = b.case(name);
        assert_eq!((c.rc, c.out.as_slice()), (Some(0), &[ARGV_KEPT.to_string()][..]), "{name}:\n{}", show(b));
    }
}

#[test]
fn on_64k_pages_doctor_predicts_exactly_the_layouts_that_fail_directly() {
    let b = boot_64k();
    let s = store();
    let mut verdicts = risks(&b.case("doctor_json").json());
    verdicts.extend(risks(&b.case("doctor_json_3f0").json()));
    let happened: Vec<(String, bool, u64)> = [
        ("direct_3ff", format!("{s}/bin/argv")),
        ("direct_3fc", format!("{s}/bin/argv-16k")),
        ("direct_400", "/opt/argv-400000".to_string()),
        ("direct_3f0", format!("{s}/bin/argv-64k")),
    ]
    .into_iter()
    .map(|(case, path)| {
        let c = b.case(case);
        let failed = c.rc != Some(0);
        if failed {
            // The only failure expected directly is qemu's guest_base one.
            assert!(c.out.first().is_some_and(|l| l.ends_with(GUEST_BASE)), "{case}: {}", c.text());
        } else {
            assert_eq!(c.out, [format!("argv: [{path}] [a b] [] [c]")], "{case}");
        }
        (path, failed, 65536)
    })
    .collect();
    assert_eq!(verdicts, happened, "doctor's verdicts (left) against what qemu did (right):\n{}", show(b));
    // And what happened is the rule: a fixed image whose lowest address is not 64K-aligned fails.
    let failed: Vec<bool> = happened.iter().map(|h| h.1).collect();
    assert_eq!(failed, [true, true, false, false]);
}
