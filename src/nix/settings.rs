//! What Nix says about itself (`nix --version`, `nix config show`), and what in it stops a foreign
//! build; shared with `doctor`.

use super::{Needs, ADD_PLATFORMS};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Nix settings that decide whether a foreign build can run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixFacts {
    pub version: String,
    pub system: String,
    pub sandbox: String,
    pub extra_platforms: Vec<String>,
    pub sandbox_paths: Vec<String>,
    pub store: String,
    /// Builds go through nix-daemon (which does not see a private namespace).
    pub daemon: bool,
    /// Nix's `builders` setting, as it says it (machines lines or `@FILE`).
    pub builders: String,
}

/// One problem with the fix in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// Parses `nix config show --json` or `nix show-config --json` (both `{"name": {"value": ...}}`).
pub fn parse_show_config(
    json: &str,
    nix_remote: Option<&str>,
    daemon_socket: bool,
    state_writable: bool,
) -> Option<NixFacts> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let get = |k: &str| v.get(k).and_then(|e| e.get("value")).cloned().unwrap_or(serde_json::Value::Null);
    let text = |k: &str| match get(k) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let list = |k: &str| match get(k) {
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        serde_json::Value::String(s) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    };
    let store = text("store");
    let daemon = uses_daemon(&store, nix_remote, daemon_socket, state_writable);
    Some(NixFacts {
        version: String::new(),
        system: text("system"),
        sandbox: text("sandbox"),
        extra_platforms: list("extra-platforms"),
        sandbox_paths: list("sandbox-paths"),
        store,
        daemon,
        builders: text("builders"),
    })
}

/// Nix's own rule for `store = auto`: the local store when its state directory is writable, else the
/// daemon when its socket exists.
pub fn uses_daemon(store: &str, nix_remote: Option<&str>, daemon_socket: bool, state_writable: bool) -> bool {
    let s = nix_remote.filter(|r| !r.is_empty()).unwrap_or(store);
    match s {
        "daemon" => true,
        s if s.starts_with("unix://") => true,
        "auto" | "" => !state_writable && daemon_socket,
        _ => false,
    }
}

/// `nix --version`'s "nix (Nix) 2.26.3" as (2, 26); `None` when it says something else.
pub fn parse_version(out: &str) -> Option<(u32, u32)> {
    let v = out.trim().rsplit(' ').next()?;
    let mut it = v.split(['.', 'p', 'r', '-', '+']).map(|n| n.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// How to ask this Nix for its settings: `nix config show` from 2.20 on (where `show-config` became a
/// deprecated alias that will go), `nix show-config` before (2.8 has no `config`). Unknown versions get
/// the new spelling first; `facts` falls back to the other one.
pub fn config_command(version: Option<(u32, u32)>) -> [&'static [&'static str]; 2] {
    const NEW: &[&str] = &["config", "show", "--json"];
    const OLD: &[&str] = &["show-config", "--json"];
    match version {
        Some(v) if v < (2, 20) => [OLD, NEW],
        _ => [NEW, OLD],
    }
}

/// Runs `nix --version` and `nix config show` (or `show-config`). `None` when there is no usable nix.
pub fn facts() -> Option<NixFacts> {
    let quiet = |args: &[&str]| Command::new("nix").args(args).stdin(Stdio::null()).stderr(Stdio::null()).output().ok();
    let version_text = quiet(&["--version"]).map(|v| String::from_utf8_lossy(&v.stdout).trim().to_string());
    let version = version_text.as_deref().and_then(parse_version);
    let out = config_command(version).into_iter().find_map(|cmd| {
        let mut args = vec!["--extra-experimental-features", "nix-command"];
        args.extend_from_slice(cmd);
        quiet(&args).filter(|o| o.status.success())
    })?;
    let state = std::env::var_os("NIX_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| "/nix/var/nix".into());
    let socket = std::env::var_os("NIX_DAEMON_SOCKET_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("daemon-socket/socket"));
    let writable = ::nix::unistd::access(&state, ::nix::unistd::AccessFlags::W_OK).is_ok()
        || (!state.exists() && ::nix::unistd::geteuid().is_root());
    let remote = std::env::var("NIX_REMOTE").ok();
    let mut f = parse_show_config(&String::from_utf8_lossy(&out.stdout), remote.as_deref(), socket.exists(), writable)?;
    f.version = version_text.as_deref().and_then(|t| t.rsplit(' ').next()).unwrap_or("").to_string();
    Some(f)
}

/// `nix --version`'s number is at least MAJOR.MINOR (an unreadable one counts as old).
pub fn version_at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut it = version.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

/// Sandbox paths (as `sandbox-paths` lists them, `inside[=host][?]`) whose place inside the sandbox
/// lies within another listed one: `(inner, outer)` pairs. Nix bind-mounts the directory, then
/// mounts the inner path onto a file it creates through that bind mount: the real file outside any
/// store is truncated (seen with Nix 2.8 and 2.26, NOTES.md).
pub fn nested_sandbox_paths(paths: &[String]) -> Vec<(String, String)> {
    let inside = |s: &str| s.split_once('=').map_or(s, |(i, _)| i).trim_end_matches('?').to_string();
    let mut out = Vec::new();
    for p in paths {
        let inner = inside(p);
        if let Some(outer) = paths.iter().map(|q| inside(q)).find(|o| *o != inner && Path::new(&inner).starts_with(o)) {
            if !out.iter().any(|(i, _)| *i == inner) {
                out.push((inner, outer));
            }
        }
    }
    out
}

/// The data-loss problem for each nested sandbox path.
pub fn nested_problems(f: &NixFacts) -> Vec<Problem> {
    nested_sandbox_paths(&f.sandbox_paths)
        .into_iter()
        .map(|(inner, outer)| Problem {
            what: format!(
                "the sandbox paths list {inner} inside {outer}, which is listed too: Nix then empties the real {inner} (data loss, seen with Nix 2.8 and 2.26)"
            ),
            fix: format!(
                "list only {outer} (or only {inner}) in extra-sandbox-paths, and reinstall {inner} if it is now empty"
            ),
        })
        .collect()
}

/// What stops `needs` from reaching a build, given Nix's settings. Empty means nothing does.
pub fn problems(f: &NixFacts, needs: &Needs) -> Vec<Problem> {
    let mut out = nested_problems(f);
    let missing: Vec<&str> = needs
        .platforms
        .iter()
        .filter(|p| **p != f.system && !f.extra_platforms.contains(p))
        .map(|s| s.as_str())
        .collect();
    if !missing.is_empty() {
        out.push(Problem {
            what: format!("Nix will refuse {} builds: not in extra-platforms", missing.join(", ")),
            fix: format!(
                "append `{ADD_PLATFORMS} = {}` to nix.conf (NixOS: nixqimg.binfmt.emulatedSystems)",
                missing.join(" ")
            ),
        });
    }
    if f.sandbox == "true" || f.sandbox == "relaxed" {
        let visible = |p: &Path| {
            f.sandbox_paths.iter().any(|s| {
                let host = s.split_once('=').map_or(s.as_str(), |(_, h)| h).trim_end_matches('?');
                p.starts_with(host)
            })
        };
        let hidden: Vec<String> =
            needs.sandbox_paths.iter().filter(|p| !visible(p)).map(|p| p.display().to_string()).collect();
        if !hidden.is_empty() {
            out.push(Problem {
                what: format!("the Nix sandbox will not see {}", hidden.join(", ")),
                fix: format!(
                    "add `extra-sandbox-paths = {}` to nix.conf (see `nixqimg nix-config`; NixOS: nixqimg.binfmt.enable)",
                    hidden.join(" ")
                ),
            });
        }
    }
    out
}
