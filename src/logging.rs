//! Logging is set up only when asked (`NIXQIMG_LOG`, or `log =` in nixqimg.conf for builds, whose
//! sandbox passes no environment); otherwise `tracing` macros cost one relaxed load each.

use std::path::Path;

/// Installs a subscriber writing to stderr, or to `file` when given. Returns whether one was set.
pub fn init(filter: Option<&str>, file: Option<&Path>) -> bool {
    let Some(filter) = filter else { return false };
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).without_time();
    let res = match file.and_then(|f| std::fs::OpenOptions::new().create(true).append(true).open(f).ok()) {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).with_ansi(false).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    res.is_ok()
}
