//! A setuid-root aarch64 program, registered with C (POCF), started by an unprivileged user (nobody,
//! via setpriv) with a hostile environment (NIXQIMG_* and QEMU_* variables, LD_*) and a hostile
//! nixqimg.conf in the one place nixqimg reads a config from (beside itself, here a directory nobody
//! owns), plus canaries where other tools look. nixqimg must run the real qemu with none of it
//! applied. A control run of the same program without the setuid bit shows that the very same
//! hostile settings do take effect for a normal exec, so the test can fail.

mod binfmt_support;

use binfmt_support::{ns, probes, q, TempDir, NIXQIMG};
use std::time::Duration;

/// Environment for the unprivileged user. `$E` is the hostile directory.
const HOSTILE: &[(&str, &str)] = &[
    ("NIXQIMG_QEMU_DIR", "$E"),
    ("NIXQIMG_STRATEGY", "loader-first"),
    ("NIXQIMG_SYSROOT", "$E"),
    ("NIXQIMG_LOG", "trace"),
    ("NIXQIMG_LOG_FILE", "$E/nixqimg.log"),
    ("QEMU_GDB", "1234"),
    ("QEMU_LD_PREFIX", "$E"),
    ("QEMU_LOG", "in_asm,strace"),
    ("QEMU_LOG_FILENAME", "$E/qemu.log"),
    ("QEMU_STRACE", "1"),
    ("QEMU_SET_ENV", "BF_INJECTED=1"),
    ("QEMU_UNSET_ENV", "BF_KEEP"),
    ("QEMU_CPU", "cortex-a53"),
    ("QEMU_GUEST_BASE", "0x1000"),
    ("QEMU_RESERVED_VA", "0x1000"),
    ("QEMU_STACK_SIZE", "1"),
    ("QEMU_PLUGIN", "$E/plugin.so"),
    ("LD_PRELOAD", "$E/evil.so"),
    ("LD_LIBRARY_PATH", "$E"),
    ("BF_KEEP", "kept"),
    ("XDG_CONFIG_HOME", "$E"),
    ("HOME", "$E"),
];

const HOSTILE_CONF: &str =
    "qemu_dir = $E\nsysroot = $E\nstrategy = loader-first\nlog = trace\nlog_file = $E/nixqimg.log\n";

#[test]
fn setuid_program_under_c_ignores_a_hostile_user_environment_and_config() {
    binfmt_support::need("setpriv", "util-linux");
    binfmt_support::need("qemu-aarch64-static", "qemu-user-static");
    let p = probes();
    let d = TempDir::new("security");
    let w = d.path().display().to_string();
    let envs: Vec<String> = HOSTILE.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let env_args = envs.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(" ");
    let script = format!(
        r#"set -e
W={w}; E=$W/evil
mkdir -p $W/suid $W/pub $E
cp {probe} $W/suid/probe; chown 0:0 $W/suid/probe; chmod 4755 $W/suid/probe
cp {probe} $W/pub/plain; chmod 755 $W/pub/plain
# nixqimg itself in a directory nobody owns: the config beside it is the user's to write.
cp {nq} $W/pub/nixqimg; chown 65534:65534 $W/pub; chmod 755 $W/pub
printf '#!/bin/sh\ntouch {w}/evil/PWNED\necho PWNED "$@"\n' > $E/qemu-aarch64-static
cp $E/qemu-aarch64-static $E/qemu-aarch64; cp $E/qemu-aarch64-static $E/ld-linux-aarch64.so.1
chmod 755 $E/*; chown -R 65534:65534 $E; chmod 777 $E
"$NQ" register --interpreter $W/pub/nixqimg --flags POCF aarch64 >/dev/null
as_nobody() {{ setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }}
as_nobody sh -c 'printf "%s" "$1" > {w}/pub/nixqimg.conf; mkdir -p {w}/evil/nixqimg; cp {w}/pub/nixqimg.conf {w}/evil/nixqimg/nixqimg.conf; cp {w}/pub/nixqimg.conf {w}/evil/nixqimg.conf' _ "$(printf '{conf}' | sed "s|\$E|$E|g")"
set +e
echo "== setuid"
as_nobody env -i {env_args} timeout 20 $W/suid/probe x; echo "rc=$?"
echo "left: $(cd $E && ls | tr '\n' ' ')"
echo "== control"
as_nobody env -i {env_args} timeout 20 $W/pub/plain x; echo "rc=$?"
echo "left: $(cd $E && ls | tr '\n' ' ')"
"#,
        probe = q(&p.static_),
        nq = q(NIXQIMG),
        conf = HOSTILE_CONF.replace('\n', "\\n"),
    );
    let out = ns(&script, &[], Duration::from_secs(120));
    let s = out.ok();
    let (setuid, control) = s.split_once("== control\n").unwrap_or_else(|| panic!("{s}\n{}", out.stderr));
    let e = format!("{w}/evil");
    let mut want = format!("== setuid\nargc=2\nargv[0]={w}/suid/probe\nargv[1]=x\n");
    // The guest gets the user's environment minus QEMU_* (nothing of it reached qemu: no
    // BF_INJECTED, BF_KEEP still there) and minus LD_* (glibc's ld.so drops those for nixqimg itself,
    // a secure exec, as it would for a native setuid program).
    for (k, v) in HOSTILE.iter().filter(|(k, _)| k.starts_with("NIXQIMG_") || k.starts_with("BF_")) {
        want += &format!("env={k}={}\n", v.replace("$E", &e));
    }
    want += "uid=65534 euid=0\n";
    let got: Vec<&str> = setuid.lines().collect();
    let fds = got.iter().find(|l| l.starts_with("fds=")).copied().unwrap_or("");
    // A setuid program keeps the kernel's AT_EXECFD (qemu opens the program through it, never by a
    // path that could be swapped): fd 3 is the only extra one allowed.
    assert!(fds == "fds=0,1,2" || fds == "fds=0,1,2,3", "{setuid}");
    want += fds;
    want += "\n";
    let exe = got.iter().find(|l| l.starts_with("exe=")).copied().unwrap_or("exe=?");
    want +=
        &format!("{exe}\nrc=0\nleft: ld-linux-aarch64.so.1 nixqimg nixqimg.conf qemu-aarch64 qemu-aarch64-static \n");
    assert_eq!(setuid, want, "stderr:\n{}", out.stderr);
    // Nothing hostile ran or wrote: no PWNED, no logs (the listing above is the whole directory), and
    // qemu printed no strace.
    assert!(!out.stderr.contains("PWNED") && !out.stderr.contains("exit_group"), "{}", out.stderr);
    // Control: the same settings, without setuid, are honoured (the user's own NIXQIMG_QEMU_DIR wins
    // over the build-time search) — so the setuid run above really had them to ignore.
    assert!(control.starts_with("PWNED "), "control run did not use the hostile qemu:\n{control}\n{}", out.stderr);
    assert!(control.contains("left: PWNED "), "{control}");
}
