//! The edges where an image meets a machine: `run` boots it in qemu-system, `write` puts it on a disk.

pub mod metadata;
pub mod run;
pub mod write;
