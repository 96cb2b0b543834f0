//! Logging is set up only when asked (`NIXQIMG_LOG`, or `log =` in nixqimg.conf for builds, whose
//! sandbox passes no environment); otherwise `tracing` macros cost one relaxed load each.
//!
//! The subscriber is ours, not tracing-subscriber's: nixqimg logs three events, all from the
//! interpreter, and tracing-subscriber's thread-locals (its format buffer, its span registry) made the
//! binary's TLS block too big for musl's built-in one. That cost every foreign exec an mmap and a page
//! fault before `main`, whether logging was asked for or not.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Installs a subscriber writing to stderr, or to `file` when given. Returns whether one was set.
pub fn init(filter: Option<&str>, file: Option<&Path>) -> bool {
    let Some(filter) = filter else { return false };
    install(filter, file)
}

/// Out of the interpreter's hot text (`#[cold]` code goes to `.text.unlikely`, which
/// src/interp/text-order.ld leaves where it is): every foreign exec calls `init`, and only the
/// few that ask for a log need the 4 KiB of parsing and opening behind it.
#[cold]
#[inline(never)]
fn install(filter: &str, file: Option<&Path>) -> bool {
    let out = match file.and_then(|f| std::fs::OpenOptions::new().create(true).append(true).open(f).ok()) {
        Some(f) => Out::File(Mutex::new(f)),
        None => Out::Stderr,
    };
    tracing::subscriber::set_global_default(Lines { filter: Filter::parse(filter), out }).is_ok()
}

/// `NIXQIMG_LOG`'s value: comma-separated directives, each `LEVEL` or `TARGET=LEVEL` (the subset of
/// tracing's filter syntax that names levels; spans and field filters have nothing to act on here).
/// What does not parse as that means `debug`, as it did with tracing-subscriber's EnvFilter.
#[derive(Debug, PartialEq)]
struct Filter {
    /// (target prefix, most verbose level shown), the longest prefix deciding.
    directives: Vec<(String, LevelFilter)>,
}

impl Filter {
    fn parse(s: &str) -> Filter {
        let mut directives = Vec::new();
        for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (target, level) = match d.rsplit_once('=') {
                Some((t, l)) => (t.trim(), l.trim()),
                None if d.parse::<LevelFilter>().is_ok() => ("", d),
                // A bare target, as in tracing's syntax: everything from it.
                None => (d, "trace"),
            };
            match level.parse::<LevelFilter>() {
                Ok(l) => directives.push((target.to_string(), l)),
                Err(_) => return Filter { directives: vec![(String::new(), LevelFilter::DEBUG)] },
            }
        }
        Filter { directives }
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        let mut best: Option<(usize, LevelFilter)> = None;
        for (t, l) in &self.directives {
            if target.starts_with(t.as_str()) && !best.is_some_and(|(n, _)| t.len() < n) {
                best = Some((t.len(), *l));
            }
        }
        // With no directive for the target, tracing's default: errors only.
        best.map_or(LevelFilter::ERROR, |(_, l)| l)
    }

    fn most_verbose(&self) -> LevelFilter {
        self.directives.iter().map(|(_, l)| *l).max().unwrap_or(LevelFilter::ERROR).max(LevelFilter::ERROR)
    }
}

enum Out {
    Stderr,
    File(Mutex<std::fs::File>),
}

/// One line per event, `LEVEL message field=value ...`, written with one write (O_APPEND keeps the
/// lines of concurrent interpreters whole in a shared log file).
struct Lines {
    filter: Filter,
    out: Out,
}

impl Subscriber for Lines {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= self.filter.level_for(m.target())
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.most_verbose())
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // No span is ever entered in nixqimg; the id only has to be non-zero.
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let line = format_event(e.metadata().level(), |v| e.record(v));
        let _ = match &self.out {
            Out::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Out::File(f) => f.lock().map_or(Ok(()), |mut f| f.write_all(line.as_bytes())),
        };
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// `LEVEL message k=v k=v\n`, fields in the order given, values as `{:?}` (strings quoted), the message
/// bare: the shape tracing-subscriber's fmt wrote without time and target.
fn format_event(level: &Level, record: impl FnOnce(&mut dyn Visit)) -> String {
    struct Fields {
        message: String,
        rest: String,
    }
    impl Visit for Fields {
        fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
            if f.name() == "message" {
                let _ = write!(self.message, "{v:?}");
            } else {
                let _ = write!(self.rest, " {}={v:?}", f.name());
            }
        }
    }
    let mut fields = Fields { message: String::new(), rest: String::new() };
    record(&mut fields);
    let mut line = format!("{level:>5} {}{}", fields.message, fields.rest);
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_like_tracings() {
        let f = Filter::parse("debug");
        assert_eq!(f.level_for("nixqimg::interp"), LevelFilter::DEBUG);
        let f = Filter::parse("warn, nixqimg::interp=trace");
        assert_eq!(f.level_for("nixqimg::interp"), LevelFilter::TRACE);
        assert_eq!(f.level_for("nixqimg::cli"), LevelFilter::WARN);
        assert_eq!(f.most_verbose(), LevelFilter::TRACE);
        assert_eq!(Filter::parse("nixqimg").level_for("nixqimg::interp"), LevelFilter::TRACE);
        assert_eq!(Filter::parse("other=debug").level_for("nixqimg::interp"), LevelFilter::ERROR);
        assert_eq!(Filter::parse("off").level_for("nixqimg"), LevelFilter::OFF);
        // Not a filter at all: debug, as before.
        assert_eq!(Filter::parse("x=loud").level_for("nixqimg"), LevelFilter::DEBUG);
    }

    #[test]
    fn events_are_lines_in_the_log_file() {
        let path = std::env::temp_dir().join(format!("nixqimg-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let sub = Lines { filter: Filter::parse("info,nixqimg::logging=debug"), out: Out::File(Mutex::new(f)) };
        tracing::subscriber::with_default(sub, || {
            let argv = ["qemu", "-0"];
            tracing::debug!(arch = "aarch64", argv = ?argv, "exec");
            tracing::trace!("too verbose");
            tracing::debug!(target: "other", "below the default level");
            tracing::info!(target: "other", n = 3, "shown");
        });
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "DEBUG exec arch=\"aarch64\" argv=[\"qemu\", \"-0\"]\n INFO shown n=3\n");
    }
}
