//! Load through the kernel: 32 concurrent processes each exec a tiny static aarch64 program (no libc:
//! an exec costs qemu's start-up, nixqimg's and little else) 500 times
//! through nixqimg (PF); every exec must succeed and the guest must see only fds 0-2. The same check,
//! shorter, under POCF, where the kernel hands nixqimg the program as AT_EXECFD. Afterwards nothing
//! may be left running in the namespace and nothing may be left in TMPDIR. Prints the figures (wall
//! time, execs/s); it asserts no timing.

mod binfmt_support;

use binfmt_support::{ns, probes, q, TempDir};
use std::time::Duration;

const WORKERS: usize = 32;

/// One phase: register with `flags`, run WORKERS loops of `n` execs, print "failures=N" and the time.
fn phase(flags: &str, n: usize) -> String {
    format!(
        r#"
"$NQ" register --replace --flags {flags} aarch64 >/dev/null || exit 90
rm -f fail.*
start=$EPOCHREALTIME
for w in $(seq {WORKERS}); do
  (
    for ((i = 0; i < {n}; i++)); do
      ./probe > "out.$w" 2>&1; rc=$?
      if [ $rc != 0 ]; then echo "exit $rc: $(head -c 200 "out.$w")" >> "fail.$w"; continue; fi
      read -r line < "out.$w"
      [ "$line" = "fds=0,1,2" ] || echo "saw '$line'" >> "fail.$w"
    done
  ) &
done
wait
end=$EPOCHREALTIME
echo "{flags} failures=$(cat fail.* 2>/dev/null | wc -l)"
cat fail.* 2>/dev/null | sort | uniq -c | head -5 >&2
echo "{flags} seconds=$(awk "BEGIN {{ print $end - $start }}")" >&2
"#
    )
}

#[test]
fn thirty_two_processes_exec_foreign_programs_500_times_each_with_no_failure_and_no_leaks() {
    let p = probes();
    let d = TempDir::new("load");
    std::fs::copy(&p.fds, d.path().join("probe")).unwrap();
    std::fs::create_dir_all(d.path().join("tmp")).unwrap();
    let script = format!(
        r#"
cd {dir}
export TMPDIR={dir}/tmp
{pf}
{pocf}
# Everything started above has exited: only this shell (pid 1 of the namespace) is left.
for p in /proc/[0-9]*; do read -r c < "$p/comm" && echo "proc ${{p#/proc/}} $c"; done
echo "tmp: $(ls -A "$TMPDIR")"
"#,
        dir = q(d.path()),
        pf = phase("PF", 500),
        pocf = phase("POCF", 25),
    );
    let out = ns(&script, &[], Duration::from_secs(1500));
    eprintln!("{}", out.stderr);
    assert_eq!(out.ok(), "PF failures=0\nPOCF failures=0\nproc 1 bash\ntmp: \n", "stderr:\n{}", out.stderr);
    for (flags, n) in [("PF", 500), ("POCF", 25)] {
        let secs: f64 = out
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{flags} seconds=")))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(f64::NAN);
        let execs = (WORKERS * n) as f64;
        eprintln!("load {flags}: {WORKERS} x {n} = {execs} execs in {secs:.1} s wall: {:.0} execs/s", execs / secs);
    }
    // Only the files the script made.
    let mut left: Vec<String> =
        std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.retain(|n| !n.starts_with("out.") && n != "probe" && n != "tmp");
    assert!(left.is_empty(), "stray files: {left:?}");
}
