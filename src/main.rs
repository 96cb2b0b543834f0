//! nixqimg: a binfmt_misc interpreter that runs foreign programs under qemu-user with the right
//! loader, argv and environment, and a VM-less builder of bootable NixOS cloud images.

mod arch;
mod binfmt;
mod bootloader;
mod cli;
mod config;
mod doctor;
mod elf;
mod error;
mod exec;
mod image;
mod interp;
mod logging;
mod nix;
mod ns;
mod plan;
mod qemu;
mod seed;
mod write;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if interp::started_by_binfmt(args.first().map(|a| a.as_os_str())) {
        return interp::main(args);
    }
    cli::main(args)
}
