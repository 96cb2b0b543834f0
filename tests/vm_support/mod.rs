//! Boots for the guest_base test: `assemble` (beside this file) fetches a 16K-page and a 4K-page
//! Debian trixie arm64 kernel, trixie's static qemu-x86_64 for arm64 and busybox, and builds the
//! initramfs; each kernel is then booted once under qemu-system-aarch64 (TCG) and its /init's serial
//! lines (`@@ CASE| output`, `@@ CASE rc=N`) are parsed into [`Case`]s that every test reads.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A whole boot takes ~15 s under TCG here; this only bounds a hung guest.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Parts {
    pub kernel16k: PathBuf,
    pub kernel4k: PathBuf,
    pub package16k: String,
    pub initrd: PathBuf,
    /// `<store>/<hash>-bootstrap-tools` inside the guest.
    pub store: String,
    /// `file`'s description of the qemu-x86_64 put into the guest.
    pub qemu_file: String,
    /// First PT_LOAD of each program as readelf on the build machine sees it.
    pub load_3ff: String,
    pub load_3fc: String,
    pub load_400: String,
    /// `patchelf --page-size 65536`: 64K-aligned.
    pub load_3f0: String,
    out: PathBuf,
}

#[derive(Debug, Default, Clone)]
pub struct Case {
    /// What the command printed (stdout and stderr, in order), one entry per line.
    pub out: Vec<String>,
    pub rc: Option<i32>,
}

impl Case {
    pub fn text(&self) -> String {
        self.out.join("\n")
    }
    /// The JSON value the output starts with (`doctor --json`; stderr, merged in by /init, may follow
    /// it); anything else fails the test with the output.
    pub fn json(&self) -> serde_json::Value {
        let text = self.text();
        match serde_json::Deserializer::from_str(&text).into_iter().next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!("not JSON ({e}):\n{text}"),
            None => panic!("no JSON:\n{text}"),
        }
    }
}

pub struct Boot {
    /// The whole serial log, for failure messages and the note.
    pub log: String,
    pub header: String,
    pub cases: BTreeMap<String, Case>,
    pub took: Duration,
}

impl Boot {
    /// The case `name`; a missing case fails the test with the whole log.
    pub fn case(&self, name: &str) -> &Case {
        self.cases.get(name).unwrap_or_else(|| panic!("the guest never ran case {name}; serial log:\n{}", self.log))
    }
}

fn need(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is missing: install the Debian package {package} (tests/run does)");
}

pub fn parts() -> &'static Parts {
    static P: OnceLock<Parts> = OnceLock::new();
    P.get_or_init(assemble)
}

fn assemble() -> Parts {
    need("qemu-system-aarch64", "qemu-system-arm");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join("guest-base-vm");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm_support/assemble");
    let start = Instant::now();
    let res = Command::new(&script)
        .arg(tmp.join("debcache-trixie"))
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(res.status.success(), "{} failed ({})", script.display(), res.status);
    eprintln!("assembling the VM parts took {:?}", start.elapsed());
    let text = String::from_utf8_lossy(&res.stdout).into_owned();
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| kv.get(k).map(|v| v.to_string()).unwrap_or_else(|| panic!("assemble printed no {k}:\n{text}"));
    Parts {
        kernel16k: get("kernel16k").into(),
        kernel4k: get("kernel4k").into(),
        package16k: get("package16k"),
        initrd: get("initrd").into(),
        store: get("store"),
        qemu_file: get("qemu_file"),
        load_3ff: get("load_3ff"),
        load_3fc: get("load_3fc"),
        load_400: get("load_400"),
        load_3f0: get("load_3f0"),
        out,
    }
}

/// The 64K-page arm64 kernel: Debian has none, so tests/support/build-kernel-64k builds one from
/// Debian's kernel source (cached under /var/cache/nixqimg-tests/kernel-64k; a cold build is
/// ~20-40 min on two busy cores, bounded at 60 min by the script).
pub fn kernel_64k() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/build-kernel-64k");
        let start = Instant::now();
        let res = Command::new("timeout")
            .arg("3700")
            .arg(&script)
            .arg("/var/cache/nixqimg-tests/kernel-64k")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            res.status.success(),
            "{} failed ({}): the 64K kernel could not be built",
            script.display(),
            res.status
        );
        eprintln!("the 64K kernel took {:?} (cached after the first build)", start.elapsed());
        let text = String::from_utf8_lossy(&res.stdout).into_owned();
        let k = text
            .lines()
            .find_map(|l| l.strip_prefix("kernel64k="))
            .unwrap_or_else(|| panic!("no kernel64k= in:\n{text}"));
        PathBuf::from(k)
    })
}

pub fn boot_64k() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    B.get_or_init(|| boot(kernel_64k(), "64k"))
}

/// Kills and reaps the VM whatever happens to the test.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn boot_16k() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    B.get_or_init(|| boot(&parts().kernel16k, "16k"))
}

pub fn boot_4k() -> &'static Boot {
    static B: OnceLock<Boot> = OnceLock::new();
    B.get_or_init(|| boot(&parts().kernel4k, "4k"))
}

/// Boots `kernel` with the test initramfs and parses the serial log. One VM at a time: the machine
/// has two cores shared with everyone else's tests.
fn boot(kernel: &Path, tag: &str) -> Boot {
    static ONE_VM: Mutex<()> = Mutex::new(());
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let p = parts();
    let log_path = p.out.join(format!("serial-{tag}.log"));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let start = Instant::now();
    let mut cmd = Command::new("qemu-system-aarch64");
    // SAFETY: prctl is async-signal-safe and touches only the child being started. It makes the
    // kernel kill the VM if this test process dies without running Reap's drop (e.g. SIGKILL).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let child = cmd
        .args(["-accel", "tcg", "-M", "virt", "-cpu", "max,pauth-impdef=on", "-m", "1G", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&p.initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start qemu-system-aarch64: {e}"));
    let mut vm = Reap(child);
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > BOOT_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = start.elapsed();
    drop(vm);
    let log = String::from_utf8_lossy(&std::fs::read(&log_path).unwrap()).replace('\r', "");
    let Some(status) = status else {
        panic!("the {tag} VM did not power off within {BOOT_TIMEOUT:?}; serial log:\n{log}");
    };
    assert!(status.success(), "qemu-system-aarch64 ({tag}) exited with {status}; serial log:\n{log}");
    assert!(log.lines().any(|l| l == "@@ done"), "the {tag} guest's /init did not finish; serial log:\n{log}");
    let mut b = parse(&log);
    b.took = took;
    b
}

/// `@@ kernel ...` is the header; `@@ NAME| LINE` appends to a case, `@@ NAME rc=N` ends it.
pub fn parse(log: &str) -> Boot {
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    let mut header = String::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix("@@ ") else { continue };
        if let Some(h) = rest.strip_prefix("kernel ") {
            header = h.to_string();
        } else if let Some((name, line)) = rest.split_once("| ") {
            cases.entry(name.to_string()).or_default().out.push(line.to_string());
        } else if let Some((name, rc)) = rest.split_once(" rc=") {
            cases.entry(name.to_string()).or_default().rc = rc.trim().parse().ok();
        }
    }
    Boot { log: log.to_string(), header, cases, took: Duration::ZERO }
}
