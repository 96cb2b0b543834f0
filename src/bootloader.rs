//! `bootloader`: not built yet (owned by its issue).

use crate::error::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    Err(Error::new("bootloader: not implemented yet"))
}
