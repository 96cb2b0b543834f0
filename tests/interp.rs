//! The interpreter through the kernel: nixqimg registered (P, F) in a private binfmt_misc instance,
//! real aarch64 programs exec'd by a shell, and what the guest program itself reports checked byte
//! for byte.

mod interp_support;

use interp_support::*;
use std::ffi::OsStr;
use std::path::Path;

fn stderr_lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr).lines().map(str::to_string).collect()
}

/// Runs the argv, environment and child checks for one program, and returns what /proc/self/exe was.
fn check_argv_env_child(prog: &Path) -> String {
    let script = r#"
(exec -a $'A0 \xff' "$PROG" '' 'x y' $'line\nbreak' $'\xfe\xff'); echo "status=$?"
env -i A=1 'B=x y' $'C=\xff' LD_LIBRARY_PATH=/custom PROBE_MODE=report "$PROG"; echo "status=$?"
env -i A=1 PROBE_MODE=spawn PROBE_SELF="$PROG" "$PROG"; echo "status=$?"
"#;
    let out = in_binfmt_ns(&[aarch64_entry("PF")], script, &[("PROG", prog.as_os_str())]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("status=0").count(), 3, "{prog:?}:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let r = reports(&out.stdout);
    assert_eq!(r.len(), 3, "{text}");

    // argv[0] and every argument, byte for byte.
    let want: Vec<Vec<u8>> =
        vec![b"A0 \xff".to_vec(), vec![], b"x y".to_vec(), b"line\nbreak".to_vec(), b"\xfe\xff".to_vec()];
    assert_eq!(r[0].argv, want, "{prog:?}");
    // Only stdin, stdout, stderr: nothing of nixqimg's or qemu's leaks into the program.
    assert_eq!(r[0].fds, ["0", "1", "2"], "{prog:?}");
    // Signal dispositions are the caller's: an interpreter that ignored SIGPIPE (as Rust's runtime
    // does by default) would hand `yes | head` an ignored SIGPIPE.
    assert_eq!(r[0].sigpipe, "default", "{prog:?}");

    // The whole environment: nothing added, nothing lost; LD_* is handed to the guest through qemu's
    // -E (so it comes first) and is absent from qemu's own environment.
    let env = r[1].env.clone();
    assert_eq!(
        env,
        vec![
            b"LD_LIBRARY_PATH=/custom".to_vec(),
            b"A=1".to_vec(),
            b"B=x y".to_vec(),
            b"C=\xff".to_vec(),
            b"PROBE_MODE=report".to_vec()
        ],
        "{prog:?}"
    );
    assert!(!r[1].qenv.iter().any(|v| v.starts_with(b"LD_")), "LD_* reached qemu's environment: {:?}", r[1].qenv);

    // A child the program spawns (another foreign exec through the kernel) sees exactly what its
    // parent gave it: in particular no LD_LIBRARY_PATH that nixqimg might have used.
    let self_var = [b"PROBE_SELF=".as_slice(), osb(prog)].concat();
    assert_eq!(r[2].argv, bytes(&["child0", "c1"]), "{prog:?}");
    assert_eq!(r[2].env, vec![b"A=1".to_vec(), b"PROBE_MODE=report".to_vec(), self_var], "{prog:?}");
    r[0].exe.clone()
}

fn canon(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

#[test]
fn static_program_runs_directly_with_exact_argv_env_and_children() {
    let f = fixtures();
    let exe = check_argv_env_child(&f.static_probe);
    assert_eq!(exe, canon(&f.static_probe), "a static program must run directly, never through ld.so");
}

#[test]
fn dynamic_pie_whose_loader_is_only_in_the_cross_sysroot_runs_loader_first() {
    let f = fixtures();
    // PT_INTERP /lib/ld-linux-aarch64.so.1 does not exist on this x86_64 host; Debian's cross libc
    // in /usr/aarch64-linux-gnu is the default sysroot.
    assert!(!Path::new("/lib/ld-linux-aarch64.so.1").exists(), "this test expects no arm64 libc at /lib");
    let exe = check_argv_env_child(&f.pie_probe);
    assert_eq!(exe, "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1");
}

#[test]
fn non_pie_program_runs() {
    let f = fixtures();
    let exe = check_argv_env_child(&f.nopie_probe);
    assert_eq!(exe, "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1");
}

#[test]
fn bootstrap_tools_program_with_its_loader_in_place_runs_directly() {
    let f = fixtures();
    let exe = check_argv_env_child(&f.bt_inplace);
    assert_eq!(exe, canon(&f.bt_inplace));
}

#[test]
fn bootstrap_tools_program_whose_interp_store_path_is_gone_runs_through_the_trees_loader() {
    let f = fixtures();
    let loader = f.bt.join("lib/ld-linux-aarch64.so.1").display().to_string();
    // With the forced RPATH real bootstrap-tools carry: libc comes from RPATH.
    assert_eq!(check_argv_env_child(&f.bt_rpath), loader);
    // Without it: nixqimg hands ld.so the tree's lib with --library-path, which leaks into nothing.
    assert_eq!(check_argv_env_child(&f.bt_norpath), loader);
}

#[test]
fn explain_shows_the_plan_that_was_chosen() {
    let f = fixtures();
    let out = std::process::Command::new(NIXQIMG)
        .args(["exec", "--explain", "--"])
        .env_remove("LD_LIBRARY_PATH")
        .arg(&f.bt_norpath)
        .arg("a b")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lib = f.bt.join("lib").display().to_string();
    let last = text.lines().last().unwrap();
    assert!(
        last.contains(&format!("-- {lib}/ld-linux-aarch64.so.1 --inhibit-cache --library-path {lib} --argv0 ")),
        "{text}"
    );
    assert!(last.ends_with(" 'a b'"), "{text}");
    assert!(text.contains("# program lies in bootstrap-tools tree"), "{text}");
    // patchelf adds a page below the first segment, as in real bootstrap-tools (0x3f0000 with the
    // cross gcc's 64K max-page-size, 0x3ff000 on x86_64).
    assert!(text.contains("# lowest load address 0x3f0000; host page size"), "{text}");
}

#[test]
fn status_signals_and_stdio_pass_through() {
    let f = fixtures();
    for prog in [&f.static_probe, &f.bt_norpath] {
        let script = r#"
PROBE_MODE=exit:42 "$PROG"; echo "exit=$?"
PROBE_MODE=kill:15 "$PROG"; echo "term=$?"
PROBE_MODE=kill:11 "$PROG" 2>/dev/null; echo "segv=$?"
printf 'a\0b\nc\377' | PROBE_MODE=cat "$PROG" | od -An -tx1 | tr -d ' \n'; echo
"#;
        let out = in_binfmt_ns(&[aarch64_entry("PF")], script, &[("PROG", prog.as_os_str())]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            "exit=42\nterm=143\nsegv=139\n6100620a63ff\n",
            "{prog:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn script_whose_shebang_is_a_relocated_foreign_shell() {
    let f = fixtures();
    let script = f.dir.join("hello.sh");
    write_exe(&script, format!("#!{}\nprintf '[%s]' \"$0\" \"$@\"; echo\n", f.bt_dash.display()).as_bytes());
    let out = in_binfmt_ns(&[aarch64_entry("PF")], r#""$S" a 'b c'; echo "rc=$?""#, &[("S", script.as_os_str())]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("[{}][a][b c]\nrc=0\n", script.display()));
}

#[test]
fn nixqimg_log_writes_the_elf_facts_and_the_exec_to_its_file() {
    let f = fixtures();
    let log = f.dir.join(format!("interp-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let script = r#"NIXQIMG_LOG=debug NIXQIMG_LOG_FILE="$L" PROBE_MODE=exit:0 "$P" x; echo "rc=$?"
NIXQIMG_LOG=error NIXQIMG_LOG_FILE="$L" PROBE_MODE=exit:0 "$P" y; echo "rc=$?""#;
    let envs = [("P", f.bt_inplace.as_os_str()), ("L", log.as_os_str())];
    let out = in_binfmt_ns(&[aarch64_entry("PF")], script, &envs);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=0\nrc=0\n", "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing on the program's stderr: the log went to the file.
    assert_eq!(stderr_lines(&out), Vec::<String>::new());
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Two events from the first exec, none from the second (filtered out at `error`).
    assert_eq!(lines.len(), 2, "{text}");
    let loader = f.bt.join("lib/ld-linux-aarch64.so.1").display().to_string();
    assert_eq!(lines[0], format!("DEBUG elf arch=\"aarch64\" interp=Some({loader:?})"), "{text}");
    assert!(lines[1].starts_with("DEBUG exec argv=["), "{text}");
    assert!(lines[1].contains(&format!("{:?}, \"x\"]", f.bt_inplace.display().to_string())), "{text}");
    assert!(lines[1].contains(" why=["), "{text}");
}

#[test]
fn missing_loader_is_one_line_and_127() {
    let f = fixtures();
    let out = in_binfmt_ns(&[aarch64_entry("PF")], r#""$P" x; echo "rc=$?""#, &[("P", f.no_loader.as_os_str())]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=127\n");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "nixqimg: {}: its loader /nonexistent/ld-nowhere.so.1 does not exist",
            f.no_loader.display()
        )),
        "{lines:?}"
    );
    assert!(lines[0].ends_with(')'), "the line must end with a hint: {lines:?}");
}

#[test]
fn missing_library_directory_is_reported_by_the_loader_with_127() {
    let f = fixtures();
    let out = in_binfmt_ns(&[aarch64_entry("PF")], r#""$P"; echo "rc=$?""#, &[("P", f.no_libdir.as_os_str())]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=127\n");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("libgone.so: cannot open shared object file"), "{lines:?}");
}

#[test]
fn non_elf_and_unknown_machine_are_refused_with_126() {
    let f = fixtures();
    let text = f.dir.join("notes.nqx");
    write_exe(&text, b"just text\n");
    let mut odd = std::fs::read(&f.static_probe).unwrap();
    odd[18] = 0x99;
    odd[19] = 0;
    let odd_path = f.dir.join("odd-machine");
    write_exe(&odd_path, &odd);
    let entries = [
        format!(":nixqimg-test-ext:E::nqx::{NIXQIMG}:P"),
        format!(
            r":nixqimg-test-odd:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x99\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:{NIXQIMG}:P"
        ),
    ];
    let out = in_binfmt_ns(
        &entries,
        r#""$T"; echo "rc=$?"; "$O"; echo "rc=$?""#,
        &[("T", text.as_os_str()), ("O", odd_path.as_os_str())],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=126\nrc=126\n");
    let lines = stderr_lines(&out);
    assert_eq!(
        lines,
        [
            format!("nixqimg: {}: not an ELF file (the file is damaged or not a program; binfmt_misc matched only its first 20 bytes)", text.display()),
            format!("nixqimg: {}: ELF machine 153 (64-bit, little-endian) is not one nixqimg knows (see 'nixqimg status' for the architectures nixqimg serves)", odd_path.display()),
        ]
    );
}

/// Every cut of the headers and every flipped header byte of a bootstrap-tools-like program, exec'd
/// through the kernel: each one either runs (qemu's business) or nixqimg says one line and exits
/// 126/127. Never a panic, never a hang.
#[test]
fn truncated_and_corrupted_elves_never_panic_or_hang() {
    let f = fixtures();
    let good = std::fs::read(&f.bt_norpath).unwrap();
    let phoff = u64::from_le_bytes(good[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(good[56..58].try_into().unwrap()) as usize;
    let end = phoff + phnum * 56;
    // PT_INTERP's string is read too: flip its bytes as well.
    let interp = good.windows(GONE_HASH.len()).position(|w| w == GONE_HASH.as_bytes()).expect("PT_INTERP string");
    let interp_start = good[..interp].iter().rposition(|&b| b == 0).map_or(interp, |z| z + 1);
    let interp_end = interp + good[interp..].iter().position(|&b| b == 0).unwrap();
    let dir = f.bt.join("bin/fuzz");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut n = 0;
    // Shorter than 20 bytes the kernel itself refuses (the magic does not match): start there.
    for cut in 20..end {
        write_exe(&dir.join(format!("cut-{cut:05}")), &good[..cut]);
        n += 1;
    }
    for i in (0..end).chain(interp_start..=interp_end) {
        let mut bad = good.clone();
        bad[i] ^= 0xff;
        write_exe(&dir.join(format!("flip-{i:05}")), &bad);
        n += 1;
    }
    let script = r#"
cd "$D"
for f in *; do
  timeout -k 2 20 "./$f" >/dev/null 2>"../err-$f"; rc=$?
  printf '%s %s %s\n' "$f" "$rc" "$(wc -l < "../err-$f")"
  # Always one line, however long the message (ld.so's name the fixture's path twice).
  printf '  %s: %s\n' "$f" "$(head -n 1 "../err-$f" | cut -c 1-300)"
done
"#;
    let out =
        in_binfmt_ns(&[aarch64_entry("PF")], script, &[("D", dir.as_os_str()), ("PROBE_MODE", OsStr::new("exit:0"))]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = 0;
    let mut refused = 0;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("  ") {
            continue;
        }
        let mut parts = line.split(' ');
        let (name, rc, nlines) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let first = lines.peek().filter(|l| l.starts_with("  ")).map(|l| l.to_string()).unwrap_or_default();
        seen += 1;
        assert_ne!(rc, "124", "{name} hung");
        assert_ne!(rc, "137", "{name} hung");
        assert_ne!(rc, "134", "{name} aborted: {first}");
        assert!(!first.contains("panicked"), "{name}: {first}");
        if first.contains("nixqimg:") {
            refused += 1;
            assert!(rc == "126" || rc == "127", "{name}: nixqimg refused with {rc}: {first}");
            assert_eq!(nlines, "1", "{name}: more than one line: {first}");
        }
    }
    assert_eq!(seen, n, "not every case ran:\n{text}");
    // Most cuts and many flips make the file unusable; nixqimg must have caught those itself.
    assert!(refused > n / 3, "only {refused} of {n} refused by nixqimg:\n{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shipped binary: fully static for x86_64 and aarch64 (it must run where no libc is visible,
/// inside Nix sandboxes and bare initramfs VMs), as `file` reports it.
#[test]
fn static_binaries_build_for_both_architectures() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/build-static");
    let out = std::process::Command::new(script).args(["x86_64", "aarch64"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    for (path, arch) in paths.iter().zip(["x86-64", "ARM aarch64"]) {
        let file = std::process::Command::new("file").arg("-L").arg(path).output().unwrap();
        let text = String::from_utf8_lossy(&file.stdout);
        assert!(text.contains(arch) && text.contains("statically linked"), "{text}");
    }
}
