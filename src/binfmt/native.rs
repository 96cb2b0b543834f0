//! Which architectures this host runs without qemu. Checked, not assumed: the host's own architecture
//! always; a 32-bit sibling (i686 on x86_64, armv7l on aarch64) only if the kernel really runs a tiny
//! program of that kind (x86_64 kernels without IA32 emulation, or booted with `ia32_emulation=0`,
//! and aarch64 CPUs without AArch32 EL0 such as Apple silicon, refuse it with ENOEXEC).
//!
//! The probe program carries EI_ABIVERSION = 1: the kernel's ELF loader ignores that byte, while
//! every binfmt_misc magic for ELF (QEMU's, Debian's, ours) requires 0 there, so a registered
//! emulator cannot make a foreign program look native.

use crate::arch::{self, Arch};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// How a sibling's verdict was reached, for `status --json` and doctor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Native {
    pub arch: &'static Arch,
    pub how: &'static str,
}

const BASE: u32 = 0x0804_8000;

/// A 32-bit little-endian ELF executable: one PT_LOAD mapping the whole file at BASE, `code` at 84.
pub fn tiny_elf32(machine: u16, e_flags: u32, code: &[u8]) -> Vec<u8> {
    let size = (52 + 32 + code.len()) as u32;
    let mut f = Vec::with_capacity(size as usize);
    f.extend_from_slice(b"\x7fELF\x01\x01\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(BASE + 84).to_le_bytes()); // e_entry
    f.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    f.extend_from_slice(&e_flags.to_le_bytes());
    for v in [52u16, 32, 1, 40, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for v in [1u32, 0, BASE, BASE, size, size, 5, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// `exit(0)` programs for the 32-bit siblings we can probe.
fn probe_program(a: &Arch) -> Option<Vec<u8>> {
    match a.name {
        // mov eax, 1; xor ebx, ebx; int 0x80
        "i686" => Some(tiny_elf32(3, 0, b"\xb8\x01\x00\x00\x00\x31\xdb\xcd\x80")),
        // mov r0, #0; mov r7, #1; svc #0 (EABI5)
        "armv7l" => Some(tiny_elf32(40, 0x0500_0000, b"\x00\x00\xa0\xe3\x01\x70\xa0\xe3\x00\x00\x00\xef")),
        _ => None,
    }
}

/// Runs `prog` from a sealed memory file and says whether it exited 0.
fn runs(prog: &[u8]) -> bool {
    let name = c"nixqimg-native-probe";
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let mut rw = unsafe { std::fs::File::from_raw_fd(fd) };
    if rw.write_all(prog).is_err() {
        return false;
    }
    // Exec refuses a file that is open for writing (ETXTBSY): keep a read-only handle, drop the other.
    let Ok(ro) = std::fs::File::open(format!("/proc/self/fd/{}", rw.as_raw_fd())) else { return false };
    drop(rw);
    let path = format!("/proc/{}/fd/{}", std::process::id(), ro.as_raw_fd());
    let Ok(mut child) = std::process::Command::new(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Every architecture this host runs natively, with how we know.
pub fn detect() -> Vec<Native> {
    let host = arch::host();
    let mut out = vec![Native { arch: host, how: "host architecture" }];
    for a in arch::ARCHES.iter().filter(|a| a.family == host.family && a.name != host.name) {
        if a.class == crate::arch::Class::Elf32 && host.class == crate::arch::Class::Elf64 {
            if let Some(p) = probe_program(a) {
                if runs(&p) {
                    out.push(Native { arch: a, how: "a 32-bit probe program ran natively" });
                }
            }
        }
    }
    out
}

pub fn is_native(natives: &[Native], a: &Arch) -> bool {
    natives.iter().any(|n| n.arch.name == a.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_programs_escape_every_elf_magic_in_the_table() {
        for a in arch::ARCHES {
            if let Some(p) = probe_program(a) {
                assert!(arch::ARCHES.iter().all(|b| !b.matches(&p)), "{} probe matches a magic", a.name);
                let f = tempfile_with(&p);
                let facts = crate::interp::elf::read(&f).unwrap();
                assert_eq!(facts.arch.name, a.name);
                assert_eq!(facts.lowest_load, Some(BASE as u64));
            }
        }
    }

    fn tempfile_with(b: &[u8]) -> std::fs::File {
        let p = std::env::temp_dir().join(format!("nixqimg-probe-{}", std::process::id()));
        std::fs::write(&p, b).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i686_verdict_agrees_with_the_kernels_ia32_switch() {
        // Cross-check the probe against the kernel's own switches: /proc/sys/abi/vsyscall32 exists only
        // with CONFIG_IA32_EMULATION, and `ia32_emulation=0` on the command line turns it off.
        let natives = detect();
        if !std::path::Path::new("/proc/sys/abi/vsyscall32").exists() {
            assert!(!is_native(&natives, arch::by_name("i686").unwrap()));
        } else {
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let off = cmdline.split_whitespace().any(|w| w == "ia32_emulation=0" || w == "ia32_emulation=false");
            assert_eq!(is_native(&natives, arch::by_name("i686").unwrap()), !off);
        }
    }
}
