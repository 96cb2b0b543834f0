//! A real second Nix behind a real sshd, for the remote-builder tests: a network namespace the test
//! makes (loopback only) that both sides run in, and a builder in its own mount + pid namespace
//! where a different store is bind-mounted at the local store's path (Nix copies only between
//! stores with the same store directory). Debian's sshd serves it with a host key and a client key
//! made here; Nix reaches it with its own `ssh-ng://` and runs the builder's `nix-daemon --stdio`
//! through a `remote-program` script that sets the builder's NIX_* and registers nixqimg for
//! aarch64-linux in the builder's own private binfmt_misc (`nixqimg ns`). Everything is killed and
//! removed on drop: the namespaces die with their last process.
#![allow(dead_code)]

use super::*;
use std::process::Child;
use std::time::{Duration, Instant};

/// A network namespace holding only a loopback, kept alive by one bounded `sleep`.
pub struct Net {
    holder: Child,
}

impl Net {
    pub fn new() -> Net {
        need("unshare", "util-linux");
        need("nsenter", "util-linux");
        need("ip", "iproute2");
        let holder = Command::new("unshare")
            .args(["--net", "--fork", "--kill-child", "--", "sleep", "900"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let net = Net { holder };
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(net.ns()).map_or(true, |l| l == mine) {
            assert!(Instant::now() < deadline, "unshare --net did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        run(Command::new("nsenter")
            .arg(format!("--net={}", net.ns().display()))
            .args(["ip", "link", "set", "lo", "up"]));
        net
    }

    pub fn ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder.id()))
    }

    /// `prog` run by `store`'s environment inside this network, under a timeout.
    pub fn cmd(&self, store: &Store, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = store.cmd("nsenter");
        c.arg(format!("--net={}", self.ns().display())).args(["--", "timeout", "600"]).arg(prog);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The second Nix: its store, its keys and sshd, and the machines line that names it.
pub struct Builder {
    pub store: Store,
    pub keys: PathBuf,
    /// The local store directory the builder's store is mounted over.
    local: PathBuf,
    sshd: Option<Child>,
}

impl Builder {
    /// Prepares a builder for `local`'s store, reachable once [`Builder::start`] ran.
    pub fn new(local: &Store, name: &str) -> Builder {
        need("/usr/sbin/sshd", "openssh-server");
        need("ssh-keygen", "openssh-client");
        let store = Store::new(&format!("{name}-builder"), local.nix);
        let keys = PathBuf::from(format!("{}-keys", store.dir.display()));
        let _ = std::fs::remove_dir_all(&keys);
        std::fs::create_dir_all(&keys).unwrap();
        for k in ["client", "host"] {
            run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(keys.join(k)));
        }
        std::fs::create_dir_all(store.dir.join("tmp")).unwrap();
        // The builder runs aarch64-linux builds through its own nixqimg (what `nix-config` says).
        let interp = static_nixqimg();
        let out = Command::new(NIXQIMG)
            .args(["nix-config", "--systems", "aarch64-linux", "--interpreter"])
            .arg(interp)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let conf = store.dir.join("etc/nix.conf");
        let mut c = std::fs::read_to_string(&conf).unwrap();
        c.push_str(&text(&out.stdout));
        std::fs::write(&conf, c).unwrap();
        let k = keys.display();
        std::fs::write(
            keys.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1\nHostKey {k}/host\nAuthorizedKeysFile {k}/client.pub\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n"
            ),
        )
        .unwrap();
        // The client side: nothing from root's own ~/.ssh, no prompt, a bounded connect.
        std::fs::write(keys.join("ssh_config"), "BatchMode yes\nConnectTimeout 5\n").unwrap();
        // What sshd runs for Nix: the builder's settings, then its nix-daemon in a private binfmt_misc.
        let l = local.dir.display();
        let script = format!(
            "#!/bin/sh\nexport NIX_STORE_DIR={l}/store NIX_STATE_DIR={l}/state NIX_LOG_DIR={l}/log NIX_CONF_DIR={l}/etc XDG_CACHE_HOME={l}/cache HOME={l}/home TMPDIR={l}/tmp PATH={}:/usr/bin:/bin\nexec {} ns --interpreter {} --systems aarch64-linux -- nix-daemon \"$@\"\n",
            local.nix.bin().display(),
            NIXQIMG,
            interp.display()
        );
        std::fs::write(keys.join("remote-program"), script).unwrap();
        run(Command::new("chmod").arg("+x").arg(keys.join("remote-program")));
        Builder { store, keys, local: local.dir.clone(), sshd: None }
    }

    /// Starts sshd for the builder inside `net`, in a mount + pid namespace of its own.
    pub fn start(&mut self, net: &Net) {
        let script = format!(
            "set -e\nmount --bind {r} {l}\nmount -t proc proc /proc\nmount -t tmpfs -o mode=755 tmpfs /run\nmkdir /run/sshd\nexec /usr/sbin/sshd -D -e -f {k}/sshd_config",
            r = self.store.dir.display(),
            l = self.local.display(),
            k = self.keys.display()
        );
        let log = std::fs::File::create(self.keys.join("sshd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", net.ns().display()))
            .args(["--", "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"])
            .args(["--", "timeout", "900", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sshd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains("Server listening on 127.0.0.1 port 22") {
            assert!(Instant::now() < deadline, "sshd did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What sshd said.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.keys.join("sshd.log")).unwrap_or_default()
    }

    /// Kills sshd, every session and the builder's Nix at once (the pid namespace dies with its init).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The builder has started a build: its sandbox build directory exists.
    pub fn building(&self) -> bool {
        std::fs::read_dir(self.store.dir.join("tmp"))
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("nix-build-")))
            .unwrap_or(false)
    }

    /// The builder's store holds a path with this file name.
    pub fn has(&self, store_path: &Path) -> bool {
        store_path.file_name().is_some_and(|n| self.store.dir.join("store").join(n).exists())
    }

    /// The machines line (nix.conf `builders`, `--builders`, a machines file) for this builder:
    /// Nix's own fields, the client key and the builder's host key (so ssh checks it).
    pub fn machine(&self) -> String {
        let host = std::fs::read_to_string(self.keys.join("host.pub")).unwrap();
        let b64 = base64(host.trim().as_bytes());
        format!(
            "ssh-ng://root@127.0.0.1?remote-program={}/remote-program aarch64-linux {}/client 1 1 - - {b64}",
            self.keys.display(),
            self.keys.display()
        )
    }

    /// NIX_SSHOPTS for the local side.
    pub fn sshopts(&self) -> String {
        format!("-F {}/ssh_config", self.keys.display())
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.keys);
    }
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
