//! Nix's remote builders as `build` and `doctor` see them: the machines Nix will use (nix.conf
//! `builders`, `--builders`, machines files named with `@FILE`), whether each answers (Nix's own
//! `nix store ping`/`info` over the machine's URI, under a timeout), and per foreign system the
//! route `build` takes: a native builder that answers first, emulation here through nixqimg
//! otherwise, or what `--emulate`/`--no-emulate` force.
//!
//! Parsing and routing are pure, with unit tests; only [`probe`] runs anything.

use crate::error::{Error, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a builder has to answer before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One machine as Nix reads it (nix.conf's manual, "Remote builds": URI, systems, SSH key, max
/// jobs, speed factor, supported and mandatory features, base64 host key; `-` for a default).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    pub uri: String,
    pub systems: Vec<String>,
    pub ssh_key: Option<String>,
    pub max_jobs: u32,
    pub host_key: Option<String>,
    /// The line as given, handed back to Nix unchanged (`--builders`).
    pub line: String,
}

/// Parses a `builders` value: machines separated by newlines or `;`, `#` comments, `@FILE` lines
/// read through `read` (a missing file is no machine, as in Nix). `this_system` fills `-` systems.
pub fn parse(spec: &str, this_system: &str, read: &dyn Fn(&Path) -> Option<String>) -> Vec<Machine> {
    parse_depth(spec, this_system, read, 0)
}

fn parse_depth(spec: &str, this_system: &str, read: &dyn Fn(&Path) -> Option<String>, depth: u32) -> Vec<Machine> {
    let mut out = Vec::new();
    for raw in spec.split(['\n', ';']) {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(file) = line.strip_prefix('@') {
            if depth < 4 {
                if let Some(text) = read(Path::new(file.trim())) {
                    out.extend(parse_depth(&text, this_system, read, depth + 1));
                }
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let field = |i: usize| f.get(i).copied().filter(|s| *s != "-" && !s.is_empty());
        let uri = f[0];
        let uri = if uri.contains("://") || uri == "localhost" || uri == "auto" {
            uri.to_string()
        } else {
            format!("ssh://{uri}")
        };
        let systems = match field(1) {
            Some(s) => s.split(',').filter(|x| !x.is_empty()).map(String::from).collect(),
            None => vec![this_system.to_string()],
        };
        out.push(Machine {
            uri,
            systems,
            ssh_key: field(2).map(String::from),
            max_jobs: field(3).and_then(|n| n.parse().ok()).unwrap_or(1),
            host_key: field(7).map(String::from),
            line: line.to_string(),
        });
    }
    out
}

impl Machine {
    /// The store URI with the key and host key as store settings, for `nix store ping --store`.
    pub fn store_uri(&self) -> String {
        let mut params = Vec::new();
        if let Some(k) = &self.ssh_key {
            params.push(format!("ssh-key={k}"));
        }
        if let Some(h) = &self.host_key {
            params.push(format!("base64-ssh-public-host-key={h}"));
        }
        if params.is_empty() {
            return self.uri.clone();
        }
        let sep = if self.uri.contains('?') { '&' } else { '?' };
        format!("{}{sep}{}", self.uri, params.join("&"))
    }

    /// The URI as people read it (without `?settings`).
    pub fn shown(&self) -> &str {
        self.uri.split('?').next().unwrap_or(&self.uri)
    }
}

/// Whether a machine answered, and Nix's last line when it did not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Answer {
    pub answers: bool,
    pub error: Option<String>,
}

/// `nix store ping` (Nix < 2.19) or `nix store info` against the machine, killed after `timeout`.
pub fn probe(m: &Machine, nix_version: &str, timeout: Duration) -> Answer {
    let verb = if super::version_at_least(nix_version, 2, 19) { "info" } else { "ping" };
    let child = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "store", verb, "--store"])
        .arg(m.store_uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Answer { answers: false, error: Some(format!("cannot run nix: {e}")) },
    };
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut std::io::Read::take(&mut e, 1 << 16), &mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    match status {
        Some(st) if st.success() => Answer { answers: true, error: None },
        Some(_) => {
            let text = reader.join().unwrap_or_default();
            Answer { answers: false, error: Some(last_error(&text)) }
        }
        None => Answer { answers: false, error: Some(format!("no answer within {} s", timeout.as_secs())) },
    }
}

/// Nix's most telling line: the last `error:` one, else the last non-empty one.
pub fn last_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let l = lines.iter().rev().find(|l| l.starts_with("error:")).or(lines.last()).copied().unwrap_or("failed");
    l.chars().take(300).collect()
}

/// What `--emulate` / `--no-emulate` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A native builder when one answers, else emulation here.
    Auto,
    /// Emulation here, builders ignored.
    Emulate,
    /// A native builder or failure, never emulation.
    NoEmulate,
}

/// Where one system's derivations are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This machine runs the system natively.
    Native,
    /// On these answering builders (their machines lines), nothing of it emulated here.
    Builders(Vec<Machine>),
    /// Here, through nixqimg; `why` says why no builder.
    Emulate { why: String },
}

/// The route for a foreign `system` given the machines and their answers (same order).
pub fn route(system: &str, machines: &[(Machine, Answer)], mode: Mode) -> Result<Route> {
    let serving: Vec<&(Machine, Answer)> =
        machines.iter().filter(|(m, _)| m.systems.iter().any(|s| s == system)).collect();
    if mode == Mode::Emulate {
        return Ok(Route::Emulate { why: "--emulate".into() });
    }
    let up: Vec<Machine> = serving.iter().filter(|(_, a)| a.answers).map(|(m, _)| m.clone()).collect();
    if !up.is_empty() {
        return Ok(Route::Builders(up));
    }
    let why = match serving.first() {
        None => format!("no builder for {system}"),
        Some((m, a)) => format!("builder {} does not answer: {}", m.shown(), a.error.as_deref().unwrap_or("no answer")),
    };
    if mode == Mode::NoEmulate {
        return Err(Error::new(format!("{system}: {why}, and --no-emulate forbids emulating it here"))
            .hint("start the builder or add one (nix.conf builders, --builders), or drop --no-emulate"));
    }
    Ok(Route::Emulate { why })
}

/// The line of Nix's output that says a builder went away during a build, if one does.
pub fn lost_builder(stderr: &str) -> Option<String> {
    const SIGNS: [&str; 4] = [
        "unexpected end-of-file",
        "Nix daemon disconnected unexpectedly",
        "cannot build on '",
        "Failed to find a machine for remote build",
    ];
    stderr.lines().map(str::trim).find(|l| SIGNS.iter().any(|s| l.contains(s))).map(|l| l.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &Path) -> Option<String> {
        None
    }

    #[test]
    fn machines_lines_as_nix_reads_them() {
        let files = |p: &Path| match p.to_str() {
            Some("/etc/nix/machines") => {
                Some("# comment\nbox aarch64-linux,armv7l-linux /k 4\n@/etc/nix/more\n".into())
            }
            Some("/etc/nix/more") => Some("ssh-ng://r@h?remote-program=/x - - - 1 - - QUJD".into()),
            _ => None,
        };
        let m = parse("@/etc/nix/machines ; ssh-ng://b riscv64-linux\n@/missing", "x86_64-linux", &files);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0].uri, "ssh://box");
        assert_eq!(m[0].systems, ["aarch64-linux", "armv7l-linux"]);
        assert_eq!((m[0].ssh_key.as_deref(), m[0].max_jobs), (Some("/k"), 4));
        assert_eq!(m[1].systems, ["x86_64-linux"], "'-' is this machine's system");
        assert_eq!(m[1].host_key.as_deref(), Some("QUJD"));
        assert_eq!(m[1].store_uri(), "ssh-ng://r@h?remote-program=/x&base64-ssh-public-host-key=QUJD");
        assert_eq!(m[1].shown(), "ssh-ng://r@h");
        assert_eq!(m[2].store_uri(), "ssh-ng://b");
        assert!(parse("", "x86_64-linux", &none).is_empty());
        // A machines file naming itself does not loop forever.
        let me = |_: &Path| Some("@/self\nb aarch64-linux".to_string());
        assert_eq!(parse("@/self", "x86_64-linux", &me).len(), 4);
    }

    fn up(uri: &str, systems: &str, answers: bool) -> (Machine, Answer) {
        let m = parse(&format!("{uri} {systems}"), "x86_64-linux", &none).remove(0);
        (m, Answer { answers, error: (!answers).then(|| "error: connection refused".to_string()) })
    }

    #[test]
    fn a_native_builder_first_emulation_otherwise() {
        let ms = [up("ssh-ng://down", "aarch64-linux", false), up("ssh-ng://up", "aarch64-linux", true)];
        match route("aarch64-linux", &ms, Mode::Auto).unwrap() {
            Route::Builders(b) => assert_eq!(b.iter().map(|m| m.uri.as_str()).collect::<Vec<_>>(), ["ssh-ng://up"]),
            r => panic!("{r:?}"),
        }
        assert_eq!(route("aarch64-linux", &ms, Mode::Emulate).unwrap(), Route::Emulate { why: "--emulate".into() });
        assert_eq!(
            route("riscv64-linux", &ms, Mode::Auto).unwrap(),
            Route::Emulate { why: "no builder for riscv64-linux".into() }
        );
        let down = &ms[..1];
        assert_eq!(
            route("aarch64-linux", down, Mode::Auto).unwrap(),
            Route::Emulate { why: "builder ssh-ng://down does not answer: error: connection refused".into() }
        );
        let e = route("aarch64-linux", down, Mode::NoEmulate).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "aarch64-linux: builder ssh-ng://down does not answer: error: connection refused, and --no-emulate"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_lost_builder_is_recognised_in_both_nix_versions() {
        let v28 = "building '/s/x.drv'...\nslow image on aarch64\nerror: unexpected end-of-file\nerror: builder for '/s/x.drv' failed with exit code 1";
        assert_eq!(lost_builder(v28).as_deref(), Some("error: unexpected end-of-file"));
        let v226 =
            "error: Nix daemon disconnected unexpectedly (maybe it crashed?)\nerror: builder for '/s/x.drv' failed";
        assert!(lost_builder(v226).unwrap().contains("disconnected"));
        assert_eq!(lost_builder("error: builder for '/s/x.drv' failed with exit code 1"), None);
        assert_eq!(last_error("ssh: connect\nerror: cannot open connection\n\n"), "error: cannot open connection");
    }
}
