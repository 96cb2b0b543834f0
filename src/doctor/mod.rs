//! `nixqimg doctor`: why foreign programs or builds fail here, and the fix for each problem in one line.
//!
//! Facts are gathered at the edges (procfs, the binaries' headers, `nix show-config`, `qemu --version`,
//! and with `--try` the programs themselves); [`findings`] turns them into problems without touching
//! anything, and the report is rendered for people or as JSON (README.md documents it; fields are only
//! ever added). The plan shown is the interpreter's own ([`crate::interp::plan::plan`]) for the page size asked.

use crate::arch::{self, Arch};
use crate::binfmt::{self, entries, native, status};
use crate::error::{code, Error, Result};
use crate::interp::config::{self, ProcessEnv};
use crate::interp::elf::{self, ElfFacts};
use crate::interp::exec::{self, RealProbe};
use crate::interp::plan::{self, Mode, Request, Strategy};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod findings;
mod render;
pub use findings::findings;
pub use render::render;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Foreign programs to examine.
    pub binaries: Vec<PathBuf>,
    /// Run each program directly and loader-first under qemu and report what each printed.
    #[arg(long = "try")]
    pub try_run: bool,
    /// Machine-readable output (documented in README.md).
    #[arg(long)]
    pub json: bool,
    /// Predict for a host with this page size (e.g. 16384 or 65536) instead of this one's.
    #[arg(long, value_name = "BYTES", value_parser = parse_page_size)]
    pub page_size: Option<u64>,
    /// Seconds each --try run may take.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub timeout: u64,
}

fn parse_page_size(s: &str) -> std::result::Result<u64, String> {
    let n: u64 = s.parse().map_err(|_| format!("'{s}' is not a number of bytes"))?;
    if n.is_power_of_two() && (1024..=1 << 30).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not a page size (a power of two such as 4096, 16384, 65536)"))
    }
}

/// Page sizes Linux hosts use: always reported, so one run answers "and on 16K? on 64K?".
pub const PAGE_SIZES: [u64; 3] = [4096, 16384, 65536];

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: Host,
    pub binaries: Vec<Binary>,
    pub findings: Vec<Finding>,
    /// Number of findings with severity "problem"; doctor exits 1 when it is not 0.
    pub problems: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub kernel: String,
    pub arch: &'static str,
    /// This host's page size.
    pub page_size: u64,
    /// The page size the predictions below use (`--page-size`, else `page_size`).
    pub assumed_page_size: u64,
    pub mmap_min_addr: Option<u64>,
    pub binfmt_misc: status::Mount,
    pub native: Vec<NativeFact>,
    pub systems: Vec<SystemFact>,
    pub nix: Option<NixFact>,
    pub in_container: bool,
    /// Whose binfmt_misc this process sees: "host", "container" (a container sharing the host's),
    /// "nixqimg-ns" (the private instance of `nixqimg ns`), "user-namespace" (another user namespace:
    /// its own instance if it mounted one, else its parent's).
    pub binfmt_scope: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct NativeFact {
    pub system: &'static str,
    pub how: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct SystemFact {
    pub system: &'static str,
    pub served_by: Option<String>,
    pub served_by_nixqimg: bool,
    pub flags: Option<String>,
    pub interpreter: Option<String>,
    pub interpreter_exists: bool,
    /// The interpreter is a static ELF (null when it cannot be read).
    pub interpreter_static: Option<bool>,
    pub shadowed: Vec<String>,
    /// The qemu-user nixqimg would exec for this system, if any.
    pub qemu: Option<String>,
    pub qemu_static: Option<bool>,
    pub qemu_version: Option<String>,
    /// nixqimg's marker entry that carries execs from chroots and containers without qemu.
    pub chroot_qemu: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NixFact {
    pub version: String,
    pub system: String,
    pub sandbox: String,
    pub extra_platforms: Vec<String>,
    pub sandbox_paths: Vec<String>,
    pub daemon: bool,
    /// The remote builders Nix will use (nix.conf `builders`, machines files), each probed.
    pub builders: Vec<BuilderFact>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuilderFact {
    pub uri: String,
    pub systems: Vec<String>,
    pub max_jobs: u32,
    /// It answered Nix's `store ping`/`store info` within the timeout.
    pub answers: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    pub path: String,
    /// Why the file could not be examined; the other fields are then empty.
    pub error: Option<String>,
    pub arch: Option<&'static str>,
    pub system: Option<&'static str>,
    /// "ET_EXEC" (fixed address) or "ET_DYN".
    pub elf_type: Option<&'static str>,
    pub is_static: Option<bool>,
    pub interp: Option<String>,
    pub interp_exists: Option<bool>,
    pub runpath: Option<String>,
    /// "RUNPATH" or "RPATH".
    pub runpath_kind: Option<&'static str>,
    pub needed: Vec<String>,
    /// Lowest PT_LOAD address (rounded down to 4 KiB, as qemu reserves it), hex.
    pub lowest_load: Option<String>,
    pub guest_base: Option<GuestBase>,
    pub native: bool,
    /// The binfmt_misc entry the kernel would hand this file to.
    pub binfmt_entry: Option<String>,
    pub plan: Option<PlanFact>,
    pub tries: Vec<Try>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestBase {
    pub page_size: u64,
    /// Run directly under qemu, this fixed-address image cannot be placed (the "Unable to find a
    /// guest_base" failure).
    pub risk: bool,
    /// The lowest load address is a multiple of the page size.
    pub aligned: bool,
    /// The same verdict for 4096, 16384 and 65536-byte pages.
    pub by_page_size: BTreeMap<u64, bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanFact {
    /// "direct" or "loader-first".
    pub mode: Option<&'static str>,
    pub argv: Vec<String>,
    pub why: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Try {
    /// "direct" or "loader-first".
    pub strategy: &'static str,
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// "problem" (something fails), "warning" (may fail), or "info".
    pub severity: &'static str,
    /// "host", a Nix system, or a binary's path.
    pub subject: String,
    pub what: String,
    /// One line: a command, a nix.conf setting or a NixOS option. Null for info.
    pub fix: Option<String>,
}

fn finding(severity: &'static str, subject: impl Into<String>, what: String, fix: Option<String>) -> Finding {
    Finding { severity, subject: subject.into(), what, fix }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The guest_base verdict for an image at every page size of interest.
pub fn guest_base(facts: &ElfFacts, page_size: u64) -> Option<GuestBase> {
    let lo = facts.lowest_load.filter(|_| facts.is_fixed_address())?;
    let by_page_size = PAGE_SIZES.iter().map(|p| (*p, plan::guest_base_risk(facts, *p))).collect();
    Some(GuestBase {
        page_size,
        risk: plan::guest_base_risk(facts, page_size),
        aligned: lo % page_size == 0,
        by_page_size,
    })
}

fn shown_argv<S: AsRef<OsStr>>(argv: &[S]) -> Vec<String> {
    argv.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect()
}

/// Builds the interpreter's request for `path` as binfmt_misc would start it (argv0 = path, no args)
/// and plans it with `strategy` for `page_size`.
fn plan_for(path: &Path, facts: &ElfFacts, strategy: Strategy, page_size: u64) -> Result<plan::Plan<'static>> {
    let self_exe = std::fs::read_link("/proc/self/exe").ok();
    let mut cfg = config::load(self_exe.as_deref(), &ProcessEnv, false);
    if strategy != Strategy::Auto {
        cfg.strategy = strategy;
    }
    let qemu = crate::interp::find_qemu(&cfg, facts.arch, &RealProbe).ok_or_else(|| {
        Error::new(format!("no qemu-{} found", facts.arch.qemu))
            .hint("install qemu-user-static or set NIXQIMG_QEMU_DIR")
    })?;
    let env = crate::interp::environ();
    let env: Vec<&OsStr> = env.iter().map(|e| e.as_os_str()).collect();
    let req = Request {
        program: path.as_os_str(),
        path: path.as_os_str(),
        argv0: path.as_os_str(),
        args: &[],
        env: &env,
        facts,
        qemu,
        strategy: cfg.strategy,
        sysroots: &cfg.sysroots,
        page_size,
        secure: false,
        explain: true,
    };
    plan::plan(&req, &RealProbe).map(plan::Plan::into_owned).map_err(|e| Error::new(e.to_string()))
}

/// Output of a child, bounded: a program that prints forever must not fill memory.
const MAX_OUTPUT: u64 = 16 * 1024;

/// Runs `argv` with `env`, in its own process group, killed after `timeout`.
fn run_bounded<S: AsRef<OsStr>>(exe: &Path, argv: &[S], env: &[S], timeout: Duration) -> Try {
    use std::os::unix::process::CommandExt;
    let mut t = Try {
        strategy: "",
        argv: shown_argv(argv),
        exit_code: None,
        signal: None,
        timed_out: false,
        stdout: String::new(),
        stderr: String::new(),
        error: None,
    };
    let mut cmd = Command::new(exe);
    cmd.arg0(argv.first().map(|a| a.as_ref().to_os_string()).unwrap_or_default())
        .args(argv.iter().skip(1).map(|a| a.as_ref()))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for kv in env {
        let b = kv.as_ref().as_bytes();
        if let Some(eq) = b.iter().position(|&c| c == b'=') {
            cmd.env(std::ffi::OsStr::from_bytes(&b[..eq]), std::ffi::OsStr::from_bytes(&b[eq + 1..]));
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            t.error = Some(format!("cannot run {}: {e}", exe.display()));
            return t;
        }
    };
    let pid = child.id() as i32;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(MAX_OUTPUT).read_to_end(&mut buf);
            }
            lossy(&buf)
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                t.timed_out = true;
                break None;
            }
        }
    };
    // The whole group: whatever the program started must not outlive the try, nor hold our pipes.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    let status = status.or_else(|| child.wait().ok());
    if let Some(st) = status {
        use std::os::unix::process::ExitStatusExt;
        t.exit_code = st.code();
        t.signal = st.signal();
    }
    t.stdout = out.join().unwrap_or_default();
    t.stderr = err.join().unwrap_or_default();
    t
}

fn examine(path: &Path, page_size: u64, inst: &entries::Instance, natives: &[native::Native], a: &Args) -> Binary {
    let mut b = Binary {
        path: path.display().to_string(),
        error: None,
        arch: None,
        system: None,
        elf_type: None,
        is_static: None,
        interp: None,
        interp_exists: None,
        runpath: None,
        runpath_kind: None,
        needed: Vec::new(),
        lowest_load: None,
        guest_base: None,
        native: false,
        binfmt_entry: None,
        plan: None,
        tries: Vec::new(),
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            b.error = Some(format!("cannot open: {e}"));
            return b;
        }
    };
    let mut head = [0u8; 128];
    let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).unwrap_or(0);
    let head = &head[..n];
    if inst.enabled {
        b.binfmt_entry = inst.entries.iter().find(|e| e.enabled && e.matches(head)).map(|e| e.name.clone());
    }
    let facts = match elf::read(&file) {
        Ok(f) => f,
        Err(e) => {
            b.error = Some(e.to_string());
            return b;
        }
    };
    b.arch = Some(facts.arch.name);
    b.system = Some(facts.arch.nix_system);
    b.elf_type = Some(if facts.is_fixed_address() { "ET_EXEC" } else { "ET_DYN" });
    b.is_static = Some(facts.is_static());
    b.interp = facts.interp.as_deref().map(lossy);
    b.interp_exists = facts.interp.as_deref().map(|i| Path::new(std::ffi::OsStr::from_bytes(i)).is_file());
    b.runpath = facts.runpath.as_deref().map(lossy);
    b.runpath_kind = facts.runpath.as_ref().map(|_| if facts.runpath_is_rpath { "RPATH" } else { "RUNPATH" });
    b.needed = facts.needed.iter().map(|n| lossy(n)).collect();
    b.lowest_load = facts.lowest_load.map(|l| format!("{l:#x}"));
    b.guest_base = guest_base(&facts, page_size);
    b.native = native::is_native(natives, facts.arch) && facts.arch.matches(head);
    if b.native {
        return b;
    }
    b.plan = Some(match plan_for(path, &facts, Strategy::Auto, page_size) {
        Ok(p) => PlanFact {
            mode: Some(match p.mode {
                Mode::Direct => "direct",
                Mode::LoaderFirst { .. } => "loader-first",
            }),
            argv: shown_argv(&p.argv),
            why: p.why,
            error: None,
        },
        Err(e) => PlanFact { mode: None, argv: Vec::new(), why: Vec::new(), error: Some(e.to_string()) },
    });
    if a.try_run {
        for (name, s) in [("direct", Strategy::Direct), ("loader-first", Strategy::LoaderFirst)] {
            // A static program is never handed to ld.so (it spins forever under qemu 7.2).
            if s == Strategy::LoaderFirst && facts.is_static() {
                continue;
            }
            let mut t = match plan_for(path, &facts, s, exec::page_size()) {
                Ok(p) => run_bounded(&p.exe, &p.argv, &p.env, Duration::from_secs(a.timeout)),
                Err(e) => Try {
                    strategy: name,
                    argv: Vec::new(),
                    exit_code: None,
                    signal: None,
                    timed_out: false,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: Some(e.to_string()),
                },
            };
            t.strategy = name;
            b.tries.push(t);
        }
    }
    b
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn qemu_version(q: &Path) -> Option<String> {
    let t = run_bounded(q, &[q.as_os_str().to_owned(), "--version".into()], &[], Duration::from_secs(5));
    (t.exit_code == Some(0)).then(|| first_line(&t.stdout))
}

fn read_u64(p: &str) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn in_container() -> bool {
    Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists()
}

/// The initial user namespace's inode number, fixed by the kernel (PROC_USER_INIT_INO).
const INIT_USER_NS_INO: u64 = 0xEFFF_FFFD;

/// See `Host::binfmt_scope`. A container's marker files say nothing about binfmt_misc once a user
/// namespace mounted its own instance (Linux >= 6.7), so the namespace is looked at first.
pub fn binfmt_scope(userns_ino: Option<u64>, nixqimg_ns: bool, container: bool) -> &'static str {
    match (userns_ino, nixqimg_ns, container) {
        (Some(i), true, _) if i != INIT_USER_NS_INO => "nixqimg-ns",
        (Some(i), false, _) if i != INIT_USER_NS_INO => "user-namespace",
        (_, _, true) => "container",
        _ => "host",
    }
}

fn own_binfmt_scope() -> &'static str {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/user").ok().map(|m| m.ino());
    binfmt_scope(ino, std::env::var_os(crate::binfmt::ns::MARKER).is_some_and(|v| v == "1"), in_container())
}

fn host_facts(page_size: u64, inst: &entries::Instance, natives: &[native::Native]) -> Host {
    let st = status::build(Path::new(entries::DIR), inst, natives, &|p| Path::new(p).exists());
    let self_exe = std::fs::read_link("/proc/self/exe").ok();
    let cfg = config::load(self_exe.as_deref(), &ProcessEnv, false);
    let systems = st
        .systems
        .iter()
        .filter(|s| !s.native)
        .map(|s| {
            let a = arch::by_name(s.system).unwrap_or(arch::host());
            let q = crate::interp::find_qemu(&cfg, a, &RealProbe);
            let qemu_static = q
                .as_ref()
                .and_then(|q| std::fs::File::open(q).ok())
                .and_then(|f| elf::read(&f).ok())
                .map(|f| f.is_static());
            SystemFact {
                system: s.system,
                served_by: s.served_by.clone(),
                served_by_nixqimg: s.served_by_nixqimg,
                flags: s.flags.clone(),
                interpreter: s.interpreter.clone(),
                interpreter_exists: s.interpreter.as_deref().is_some_and(|i| Path::new(i).exists()),
                interpreter_static: s
                    .interpreter
                    .as_deref()
                    .and_then(|i| std::fs::File::open(i).ok())
                    .and_then(|f| elf::read(&f).ok())
                    .map(|f| f.is_static()),
                shadowed: s.shadowed.clone(),
                qemu_version: q.as_deref().and_then(qemu_version),
                qemu: q.map(|q| q.display().to_string()),
                qemu_static,
                chroot_qemu: s.chroot_qemu.clone(),
            }
        })
        .collect();
    let nix = crate::nix::facts().map(|f| {
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let builders = crate::nix::builders::parse(&f.builders, &f.system, &read)
            .into_iter()
            .map(|m| {
                let a = crate::nix::builders::probe(&m, &f.version, crate::nix::builders::PROBE_TIMEOUT);
                BuilderFact {
                    uri: m.shown().to_string(),
                    systems: m.systems,
                    max_jobs: m.max_jobs,
                    answers: a.answers,
                    error: a.error,
                }
            })
            .collect();
        NixFact {
            version: f.version,
            system: f.system,
            sandbox: f.sandbox,
            extra_platforms: f.extra_platforms,
            sandbox_paths: f.sandbox_paths,
            daemon: f.daemon,
            builders,
        }
    });
    Host {
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        arch: arch::host().name,
        page_size: exec::page_size(),
        assumed_page_size: page_size,
        mmap_min_addr: read_u64("/proc/sys/vm/mmap_min_addr"),
        binfmt_misc: st.binfmt_misc,
        native: natives.iter().map(|n| NativeFact { system: n.arch.nix_system, how: n.how }).collect(),
        systems,
        nix,
        in_container: in_container(),
        binfmt_scope: own_binfmt_scope(),
    }
}

pub fn collect(a: &Args) -> Report {
    let page_size = a.page_size.unwrap_or_else(exec::page_size);
    let inst = entries::read(Path::new(entries::DIR));
    let natives = native::detect();
    let host = host_facts(page_size, &inst, &natives);
    let binaries: Vec<Binary> = a.binaries.iter().map(|p| examine(p, page_size, &inst, &natives, a)).collect();
    let findings = findings(&host, &binaries);
    let problems = findings.iter().filter(|f| f.severity == "problem").count();
    Report { host, binaries, findings, problems }
}

pub fn run(a: Args) -> Result<()> {
    let r = collect(&a);
    let text = if a.json {
        let mut s =
            serde_json::to_string_pretty(&r).map_err(|e| Error::new(format!("cannot encode the report: {e}")))?;
        s.push('\n');
        s
    } else {
        render(&r)
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if r.problems > 0 {
        return Err(Error::new(format!("{} problem(s) found", r.problems))
            .hint("each has its fix above")
            .code(code::FAILURE));
    }
    Ok(())
}

impl Try {
    /// How the run ended, in words: the report and the findings say it the same way.
    fn outcome(&self) -> String {
        if self.timed_out {
            return "timed out".to_string();
        }
        if let Some(e) = &self.error {
            return e.clone();
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "no exit status".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(e_type: u16, lowest: u64, interp: Option<&str>) -> ElfFacts {
        ElfFacts {
            arch: arch::by_name("x86_64").unwrap(),
            e_type,
            interp: interp.map(|s| s.as_bytes().to_vec()),
            runpath: None,
            runpath_is_rpath: false,
            needed: vec![],
            lowest_load: Some(lowest),
            highest_load: Some(lowest + 0x1000),
        }
    }

    #[test]
    fn guest_base_verdicts_per_page_size() {
        // The bootstrap-tools case: patchelf put a page below 0x400000.
        let g = guest_base(&facts(2, 0x3ff000, Some("/x/ld")), 16384).unwrap();
        assert!(g.risk && !g.aligned);
        assert!(!g.by_page_size[&4096]);
        assert!(g.by_page_size[&16384]);
        assert!(g.by_page_size[&65536]);
        // `patchelf --page-size 16384`: safe on 16K, not on 64K.
        let g = guest_base(&facts(2, 0x3fc000, None), 16384).unwrap();
        assert!(!g.risk);
        assert!(g.by_page_size[&65536]);
        let g = guest_base(&facts(2, 0x400000, None), 65536).unwrap();
        assert!(!g.risk && g.aligned);
        // PIE has no fixed address to reserve.
        assert!(guest_base(&facts(3, 0, None), 65536).is_none());
    }

    #[test]
    fn page_size_option_wants_a_power_of_two() {
        assert_eq!(parse_page_size("16384"), Ok(16384));
        assert!(parse_page_size("12000").is_err());
        assert!(parse_page_size("x").is_err());
    }

    fn host(mounted: bool, systems: Vec<SystemFact>) -> Host {
        Host {
            kernel: "6.18".into(),
            arch: "x86_64",
            page_size: 4096,
            assumed_page_size: 4096,
            mmap_min_addr: Some(65536),
            binfmt_misc: status::Mount { path: "/b".into(), mounted, enabled: mounted },
            native: vec![],
            systems,
            nix: None,
            in_container: false,
            binfmt_scope: "host",
        }
    }

    #[test]
    fn the_binfmt_scope_looks_at_the_user_namespace_before_container_files() {
        assert_eq!(binfmt_scope(Some(INIT_USER_NS_INO), false, false), "host");
        assert_eq!(binfmt_scope(Some(INIT_USER_NS_INO), false, true), "container");
        // Inside `nixqimg ns` on a machine with /.dockerenv: private, not the host's.
        assert_eq!(binfmt_scope(Some(4026532500), true, true), "nixqimg-ns");
        assert_eq!(binfmt_scope(Some(4026532500), false, true), "user-namespace");
        // The marker alone (leaked into the initial namespace) proves nothing.
        assert_eq!(binfmt_scope(Some(INIT_USER_NS_INO), true, false), "host");
        let h = Host { binfmt_scope: "nixqimg-ns", in_container: true, ..host(true, vec![]) };
        let f = findings(&h, &[]);
        assert!(f.iter().all(|f| !f.what.contains("the host's")), "{f:?}");
        assert!(f.iter().any(|f| f.what.contains("private instance of `nixqimg ns`")), "{f:?}");
    }

    fn served(by: &str, flags: &str, exists: bool) -> SystemFact {
        SystemFact {
            system: "aarch64-linux",
            served_by: Some(by.into()),
            served_by_nixqimg: by.starts_with("nixqimg-"),
            flags: Some(flags.into()),
            interpreter: Some("/i".into()),
            interpreter_exists: exists,
            interpreter_static: Some(true),
            shadowed: vec![],
            qemu: Some("/usr/bin/qemu-aarch64-static".into()),
            qemu_static: Some(true),
            qemu_version: None,
            chroot_qemu: None,
        }
    }

    #[test]
    fn every_problem_has_a_fix() {
        let cases = [
            host(false, vec![]),
            host(true, vec![]),
            host(true, vec![served("qemu-aarch64", "P", false)]),
            host(true, vec![served("nixqimg-aarch64", "PF", true)]),
        ];
        let mut seen = 0;
        for h in &cases {
            for f in findings(h, &[]) {
                if f.severity == "problem" {
                    seen += 1;
                    assert!(f.fix.as_deref().is_some_and(|x| !x.is_empty()), "{f:?}");
                }
            }
        }
        assert!(seen >= 3, "{seen}");
        assert!(findings(&cases[3], &[]).iter().all(|f| f.severity != "problem"));
        let f = findings(&cases[2], &[]);
        assert!(f.iter().any(|f| f.fix.as_deref() == Some("nixqimg register --replace aarch64-linux")), "{f:?}");
    }
}
