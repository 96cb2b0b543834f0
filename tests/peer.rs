//! Every behaviour docker's binfmt installer (tonistiigi/binfmt) tests its emulators for, re-expressed
//! as named tests of ours: its `test/test.bats` (argv through exec, PATH lookup, shebangs, relative
//! paths, `/proc/self/exe` after `chdir`), `test/argv0_test.go` (re-exec through `/proc/self/exe`)
//! and `test/sched_test.go` (scheduler syscalls). The programs (tests/peer_support/*.c) are built for
//! aarch64 twice, static and dynamic (its loader where PT_INTERP says: nixqimg runs it directly), and
//! run through the kernel with nixqimg registered (PF) in a private binfmt_misc instance. The peer's
//! `env` is a real foreign one: Debian's arm64 coreutils.
//!
//! Where the peer's expected output names its work directory, ours names the fixture directory.
//! Its two `shell-command-relative` cases are skipped there under emulation (its wrapper rewrites
//! relative arguments); here they must hold.

mod interp_support;

use interp_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const PROGRAMS: [&str; 5] = ["printargs", "execargv0", "chwd", "reexec", "sched"];

struct Work {
    /// One directory per build: `static`, `dynamic`; each holds the programs, `env` and the shebang scripts.
    dirs: Vec<PathBuf>,
    /// The same programs built for this host, to compare the scheduler answers with.
    native: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer_support").join(format!("{name}.c"))
}

fn work() -> &'static Work {
    static W: OnceLock<Work> = OnceLock::new();
    W.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peer");
        let _ = std::fs::remove_dir_all(&base);
        let debs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debcache");
        run(Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fetch-debs"))
            .arg("bookworm")
            .arg(&debs)
            .arg("coreutils:arm64"));
        let sysroot = "/usr/aarch64-linux-gnu/lib";
        let mut dirs = Vec::new();
        for (kind, flags) in [
            ("static", vec!["-static".to_string()]),
            (
                "dynamic",
                vec![format!("-Wl,--dynamic-linker={sysroot}/ld-linux-aarch64.so.1"), format!("-Wl,-rpath,{sysroot}")],
            ),
        ] {
            let d = base.join(kind);
            std::fs::create_dir_all(d.join("bin")).unwrap();
            for p in PROGRAMS {
                run(Command::new("aarch64-linux-gnu-gcc").args(["-O2", "-o"]).arg(d.join(p)).args(&flags).arg(src(p)));
            }
            // A program found only through PATH (the peer copies printargs into /usr/bin).
            std::fs::copy(d.join("printargs"), d.join("bin/test-printargs")).unwrap();
            std::fs::copy(debs.join("root/coreutils_arm64/usr/bin/env"), d.join("env")).unwrap();
            let w = d.display().to_string();
            for (name, text) in [
                ("shebang.sh", "#!./printargs\n".to_string()),
                ("shebang2.sh", "#!./printargs arg\n".to_string()),
                ("shebang3.sh", format!("#!{w}/printargs\n")),
                ("shebang4.sh", format!("#!{w}/shebang3.sh\n")),
                ("shebang-path.sh", format!("#!{w}/env ./printargs\n")),
                ("shebang-path2.sh", format!("#!{w}/env sh\n\n./printargs \"$@\"\n")),
            ] {
                write_exe(&d.join(name), text.as_bytes());
            }
            dirs.push(d);
        }
        let native = base.join("native");
        std::fs::create_dir_all(&native).unwrap();
        run(Command::new("gcc").args(["-O2", "-o"]).arg(native.join("sched")).arg(src("sched")));
        Work { dirs, native }
    })
}

/// Runs `script` in each build's directory (as `$W`, also the working directory, with `$W/bin` on
/// PATH) through nixqimg, and returns what each printed (stdout and stderr) and its status.
fn each(script: &str) -> Vec<(PathBuf, String, i32)> {
    work()
        .dirs
        .iter()
        .map(|d| {
            let full = format!("cd \"$W\" && export PATH=\"$W/bin:$PATH\" && {{ {script}\n}} 2>&1");
            let out = in_binfmt_ns(&[aarch64_entry("PF")], &full, &[("W", d.as_os_str())]);
            (d.clone(), String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code().unwrap_or(-1))
        })
        .collect()
}

/// `script` succeeds in every build and prints exactly `want` (with `$W` replaced by the build's directory).
fn expect(script: &str, want: &str) {
    for (d, out, rc) in each(script) {
        let want = format!("{}\n", want.replace("$W", &d.display().to_string()));
        assert_eq!((rc, out.as_str()), (0, want.as_str()), "{script} in {}", d.display());
    }
}

#[test]
fn exec_single_keeps_the_argv0_it_was_given() {
    expect("./execargv0 ./printargs foo bar1 bar2", "foo bar1 bar2");
}

#[test]
fn exec_multi_through_a_foreign_exec_of_a_foreign_exec() {
    expect("./execargv0 ./execargv0 ./printargs ./printargs baz", "baz");
}

#[test]
fn exec_multi_with_absolute_paths() {
    expect("./execargv0 \"$W/execargv0\" \"$W/printargs\" \"$W/printargs\" baz", "baz");
}

#[test]
fn exec_multi_found_through_path() {
    expect("./execargv0 test-printargs test-printargs abc", "test-printargs abc");
}

#[test]
fn exec_direct_from_the_shell_through_path() {
    expect("test-printargs foo bar1", "test-printargs foo bar1");
}

#[test]
fn exec_direct_by_absolute_path() {
    expect("\"$W/printargs\" foo bar1", "$W/printargs foo bar1");
}

#[test]
fn shebang_with_a_relative_foreign_interpreter() {
    expect("./execargv0 ./shebang.sh arg1 arg2", "./printargs $W/shebang.sh arg2");
}

#[test]
fn shebang_with_an_argument() {
    expect("./execargv0 ./shebang2.sh arg1 arg2", "./printargs arg $W/shebang2.sh arg2");
}

#[test]
fn shebang_with_an_absolute_interpreter() {
    expect("./execargv0 ./shebang3.sh arg1 arg2", "$W/printargs $W/shebang3.sh arg2");
}

#[test]
fn shebang_whose_interpreter_is_a_script() {
    expect("./execargv0 ./shebang4.sh arg1 arg2", "$W/printargs $W/shebang3.sh $W/shebang4.sh arg2");
}

#[test]
fn shebang_started_directly_by_relative_path() {
    expect("./shebang.sh foo bar1", "./printargs ./shebang.sh foo bar1");
}

#[test]
fn relative_exec_by_env() {
    expect("./execargv0 env env ./printargs foo bar1 bar2", "./printargs foo bar1 bar2");
}

#[test]
fn path_based_exec_by_env() {
    expect("./execargv0 env env test-printargs foo bar1 bar2", "test-printargs foo bar1 bar2");
}

#[test]
fn shebang_through_a_foreign_env_with_a_relative_program() {
    expect("./execargv0 ./shebang-path.sh ./shebang-path.sh foo bar1", "./printargs $W/shebang-path.sh foo bar1");
}

#[test]
fn shebang_through_a_foreign_env_running_a_shell() {
    expect("./execargv0 ./shebang-path2.sh ./shebang-path2.sh foo bar1", "./printargs foo bar1");
}

#[test]
fn shell_command_with_a_relative_script_keeps_its_relative_arguments() {
    // The peer skips this under emulation; through nixqimg the relative path stays as the user wrote it.
    expect("./execargv0 sh sh -c './shebang-path.sh foo bar1 bar2'", "./printargs ./shebang-path.sh foo bar1 bar2");
}

#[test]
fn shell_command_with_a_relative_script_run_directly() {
    expect("sh -c './shebang-path.sh foo bar1 bar2'", "./printargs ./shebang-path.sh foo bar1 bar2");
}

#[test]
fn shell_command_with_a_relative_script_nested() {
    expect("./execargv0 sh sh -c './shebang-path2.sh foo bar1 bar2'", "./printargs foo bar1 bar2");
}

#[test]
fn proc_self_exe_after_chdir_for_a_program_started_by_relative_path() {
    // qemu was handed the relative path and resolved it again at readlink time, after the chdir:
    // "readlink /proc/self/exe: No such file or directory". Static and dynamic (run directly) alike.
    expect("./chwd \"$W/chwd\"", "$W/chwd");
}

#[test]
fn proc_self_exe_after_chdir_for_a_program_started_by_absolute_path() {
    expect("\"$W/chwd\" \"$W/chwd\"", "$W/chwd");
}

#[test]
fn reexec_through_proc_self_exe_keeps_argv0() {
    expect("./reexec", "first,second,third\nstatus=0");
    expect("REEXEC_NAME=\"$W/reexec\" ./reexec", "first,second,third\nstatus=0");
}

/// The scheduler case `case` answers the same under emulation as natively, check by check, and
/// every check the peer expects to pass passes (`allowed_fail`: checks the kernel itself refuses to
/// this unprivileged namespace, natively as well).
fn sched_like_native(case: &str, allowed_fail: &[&str]) {
    let native = in_binfmt_ns(&[], &format!("\"$N/sched\" {case}"), &[("N", work().native.as_os_str())]);
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    for line in native.lines() {
        if let Some(f) = line.strip_prefix("FAIL ") {
            assert!(allowed_fail.iter().any(|a| f.starts_with(a)), "natively: {line}");
        }
    }
    for (d, out, _) in each(&format!("./sched {case}")) {
        assert_eq!(out, native, "{case} in {} differs from the native answers", d.display());
    }
}

#[test]
fn sched_get_set_scheduler() {
    // Leaving SCHED_IDLE needs CAP_SYS_NICE in the initial namespace (or RLIMIT_NICE): the kernel
    // refuses it to this test's user namespace, natively too. The peer runs as real root.
    sched_like_native("get-set-scheduler", &["set SCHED_OTHER"]);
}

#[test]
fn sched_priority_min_max() {
    sched_like_native("min-max", &[]);
}

#[test]
fn sched_yield() {
    sched_like_native("yield", &[]);
}

#[test]
fn sched_get_set_param() {
    sched_like_native("get-set-param", &[]);
}

#[test]
fn sched_get_set_attr() {
    sched_like_native("attr", &[]);
}
