//! The error every command returns: one line for people, a hint that says what to do, and the exit
//! code that is part of nixqimg's contract (see README "Exit codes").

use std::fmt;

/// Exit codes. 126/127 mirror the shell's: the program could not be run / a file it needs is missing.
pub mod code {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CANNOT_EXEC: u8 = 126;
    pub const NOT_FOUND: u8 = 127;
}

#[derive(Debug)]
pub struct Error {
    pub what: String,
    pub hint: Option<String>,
    pub code: u8,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(what: impl Into<String>) -> Self {
        Error { what: what.into(), hint: None, code: code::FAILURE }
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn code(mut self, code: u8) -> Self {
        self.code = code;
        self
    }
    /// An I/O failure on `path`, keeping the errno text.
    pub fn io(path: impl AsRef<std::path::Path>, e: std::io::Error) -> Self {
        Error::new(format!("{}: {e}", path.as_ref().display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(e.to_string())
    }
}
