//! Small helpers that several parts use, kept here so no part imports another just for them.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The hasher of every HashMap and HashSet in the binary: std's RandomState keeps its random keys in
/// a thread-local, and that one made the binary's TLS block too big for musl's built-in one on
/// aarch64 (see src/logging.rs): an mmap and a page fault on every foreign exec. None of these maps
/// holds keys an attacker chooses (inode numbers, chunk indices, file names of our own directory).
pub type FixedState = std::hash::BuildHasherDefault<std::hash::DefaultHasher>;

/// Shell-quotes one argument for display (`--explain`), byte-exact for non-UTF-8.
pub fn shell_quote(a: &std::ffi::OsStr) -> String {
    let s = a.to_string_lossy();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A directory removed when it goes out of scope, whatever happens (run's VARS copy and seed).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Result<TempDir> {
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
            let p = base.join(format!("nixqimg-{what}-{}-{}-{i}", std::process::id(), nanos.unwrap_or(0)));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&p, e).hint("set TMPDIR to a writable directory")),
            }
        }
        Err(Error::new(format!("cannot make a temporary directory in {}", base.display())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
