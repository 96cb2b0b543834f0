//! Fixtures for tests/cloud.rs: the NixOS-shaped systems with Debian trixie's userland
//! (tests/fixtures/cloud, built by real Nix in its own store under /var/cache/nixqimg-tests/cloud), a
//! guest booted by `nixqimg run` in the background with its console in a file, and SSH into it with a
//! key made for the test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const NIXQIMG: &str = env!("CARGO_BIN_EXE_nixqimg");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud/build")
}

/// The Nix store's variables the fixture uses (`build --env`), for nixqimg image (it runs nix-store -qR).
pub fn nix_env() -> Vec<(String, String)> {
    let out = Command::new(fixture()).arg("--env").output().expect("run tests/fixtures/cloud/build --env");
    assert!(out.status.success(), "build --env: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

static SYSTEMS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// The toplevel for `arch`, built once per test run (the Debian root and the store are cached).
pub fn system(arch: &str) -> PathBuf {
    let mut built = SYSTEMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(a, _)| a == arch) {
        return p.clone();
    }
    let start = Instant::now();
    let out = Command::new(fixture()).arg(arch).stderr(Stdio::inherit()).output().expect("run the cloud fixture");
    assert!(out.status.success(), "tests/fixtures/cloud/build {arch} failed ({})", out.status);
    let top = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(top.join("boot.json").is_file(), "the fixture gave no system: {}", top.display());
    eprintln!("cloud fixture {arch}: {} ({:.1}s)", top.display(), start.elapsed().as_secs_f64());
    built.push((arch.to_string(), top.clone()));
    top
}

pub fn nixqimg() -> Command {
    let mut c = Command::new(NIXQIMG);
    c.envs(nix_env()).stdin(Stdio::null());
    c
}

/// Runs `cmd`, fails the test with its output unless it exits 0, returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh ed25519 key pair in `dir` (private key `id`, public `id.pub`).
pub fn keypair(dir: &Path) -> PathBuf {
    let key = dir.join("id");
    ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "nixqimg-test", "-f"]).arg(&key));
    key
}

/// A guest booted by `nixqimg run` in its own process group, console in `log`; killed with its QEMU on drop.
pub struct Guest {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub key: PathBuf,
    pub started: Instant,
}

impl Guest {
    /// `nixqimg run IMAGE --snapshot --accel tcg --ssh-port P --until 'reboot: Power down' --timeout T EXTRA`.
    pub fn boot(image: &Path, key: &Path, log: &Path, extra: &[&str], timeout: u64) -> Guest {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = nixqimg()
            .arg("run")
            .arg(image)
            .args(["--snapshot", "--accel", "tcg", "--ssh-port", &port.to_string()])
            .args(["--until", "reboot: Power down", "--timeout", &timeout.to_string()])
            .args(extra)
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("spawn nixqimg run");
        Guest { child, port, log: log.to_path_buf(), key: key.to_path_buf(), started: Instant::now() }
    }

    pub fn ssh_cmd(&self, script: &str) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i").arg(&self.key).args([
            "-p",
            &self.port.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "IdentitiesOnly=yes",
            "root@127.0.0.1",
            script,
        ]);
        c.stdin(Stdio::null());
        c
    }

    /// Tries to log in until it works or `within` passes; returns the seconds since boot when it did.
    pub fn wait_for_login(&mut self, within: Duration) -> Result<f64, String> {
        let deadline = self.started + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("nixqimg run ended ({st}) before a login worked; console:\n{}", self.console()));
            }
            let o = self.ssh_cmd("true").output().unwrap();
            if o.status.success() {
                return Ok(self.started.elapsed().as_secs_f64());
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            std::thread::sleep(Duration::from_secs(3));
        }
        Err(format!("no login within {}s (last ssh: {last}); console:\n{}", within.as_secs(), self.console()))
    }

    /// Runs `script` as root in the guest; returns (status, stdout+stderr).
    pub fn ssh(&self, script: &str) -> (i32, String) {
        let o = self.ssh_cmd(script).output().unwrap();
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.code().unwrap_or(-1), s)
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).replace('\r', "")
    }

    /// Powers the guest off over SSH and waits for `nixqimg run` to see it stop.
    pub fn poweroff(&mut self) -> std::process::ExitStatus {
        let _ = self.ssh("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the guest did not power off within 120s; console:\n{}", self.console());
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pgid = self.child.id() as i32;
            // SAFETY: kill(2) on the process group this Guest spawned (process_group(0) made its id
            // the group id); it touches no memory.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}
