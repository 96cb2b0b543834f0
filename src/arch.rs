//! The one table of architectures. The interpreter (ELF machine → qemu), registration (magic/mask),
//! `status`, `doctor` and `run` all read it; nothing else in the crate names an architecture.

/// ELF data encoding, from `e_ident[EI_DATA]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    Little,
    Big,
}

/// ELF class, from `e_ident[EI_CLASS]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Elf32,
    Elf64,
}

/// CPU family: a host of one family may run some of its members natively (x86_64 runs i686 when the
/// kernel has IA32 emulation; most aarch64 hosts run armv7l, Apple silicon does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    X86,
    Arm,
    Riscv,
    Power,
    S390,
    Mips,
    LoongArch,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Arch {
    /// Our name, as `uname -m` prints it for a native host.
    pub name: &'static str,
    /// The Nix system double.
    pub nix_system: &'static str,
    /// qemu-user is `qemu-<qemu>` (Debian also ships `qemu-<qemu>-static`).
    pub qemu: &'static str,
    /// qemu-system for `run`, when there is one we boot.
    pub qemu_system: Option<&'static str>,
    pub machine: u16,
    pub class: Class,
    pub endian: Endian,
    pub family: Family,
    /// binfmt_misc magic and mask (20 bytes: e_ident, e_type, e_machine), as QEMU's
    /// qemu-binfmt-conf.sh and Debian's binfmt.d files have them.
    pub magic: &'static [u8; 20],
    pub mask: &'static [u8; 20],
    /// Debian's cross sysroot lives under `/usr/<triplet>`.
    pub gnu_triplet: &'static str,
    /// The glibc dynamic loader's file name, to find a relocated one.
    pub loader: &'static str,
}

const M_64LE: [u8; 20] = *b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff";
const M_X86: [u8; 20] = *b"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff";

pub static ARCHES: &[Arch] = &TABLE;

/// A named static, not an anonymous constant, so that src/interp/text-order.ld can place it with the
/// interpreter's read-only data.
static TABLE: [Arch; 9] = [
    Arch {
        name: "x86_64",
        nix_system: "x86_64-linux",
        qemu: "x86_64",
        qemu_system: Some("qemu-system-x86_64"),
        machine: 62,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::X86,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
        mask: &M_X86,
        gnu_triplet: "x86_64-linux-gnu",
        loader: "ld-linux-x86-64.so.2",
    },
    Arch {
        name: "i686",
        nix_system: "i686-linux",
        qemu: "i386",
        qemu_system: None,
        machine: 3,
        class: Class::Elf32,
        endian: Endian::Little,
        family: Family::X86,
        magic: b"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x03\x00",
        mask: &M_X86,
        gnu_triplet: "i686-linux-gnu",
        loader: "ld-linux.so.2",
    },
    Arch {
        name: "aarch64",
        nix_system: "aarch64-linux",
        qemu: "aarch64",
        qemu_system: Some("qemu-system-aarch64"),
        machine: 183,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::Arm,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
        mask: &M_64LE,
        gnu_triplet: "aarch64-linux-gnu",
        loader: "ld-linux-aarch64.so.1",
    },
    Arch {
        name: "armv7l",
        nix_system: "armv7l-linux",
        qemu: "arm",
        qemu_system: None,
        machine: 40,
        class: Class::Elf32,
        endian: Endian::Little,
        family: Family::Arm,
        magic: b"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
        mask: &M_64LE,
        gnu_triplet: "arm-linux-gnueabihf",
        loader: "ld-linux-armhf.so.3",
    },
    Arch {
        name: "riscv64",
        nix_system: "riscv64-linux",
        qemu: "riscv64",
        qemu_system: None,
        machine: 243,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::Riscv,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xf3\x00",
        mask: &M_64LE,
        gnu_triplet: "riscv64-linux-gnu",
        loader: "ld-linux-riscv64-lp64d.so.1",
    },
    Arch {
        name: "ppc64le",
        nix_system: "powerpc64le-linux",
        qemu: "ppc64le",
        qemu_system: None,
        machine: 21,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::Power,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x15\x00",
        mask: b"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\x00",
        gnu_triplet: "powerpc64le-linux-gnu",
        loader: "ld64.so.2",
    },
    Arch {
        name: "s390x",
        nix_system: "s390x-linux",
        qemu: "s390x",
        qemu_system: None,
        machine: 22,
        class: Class::Elf64,
        endian: Endian::Big,
        family: Family::S390,
        magic: b"\x7fELF\x02\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x16",
        mask: b"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff",
        gnu_triplet: "s390x-linux-gnu",
        loader: "ld64.so.1",
    },
    Arch {
        name: "mips64el",
        nix_system: "mips64el-linux",
        qemu: "mips64el",
        qemu_system: None,
        machine: 8,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::Mips,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x08\x00",
        mask: b"\xff\xff\xff\xff\xff\xff\xff\x00\xfe\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
        gnu_triplet: "mips64el-linux-gnuabi64",
        loader: "ld.so.1",
    },
    Arch {
        name: "loongarch64",
        nix_system: "loongarch64-linux",
        qemu: "loongarch64",
        qemu_system: None,
        machine: 258,
        class: Class::Elf64,
        endian: Endian::Little,
        family: Family::LoongArch,
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x02\x01",
        mask: b"\xff\xff\xff\xff\xff\xff\xff\xfc\x00\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
        gnu_triplet: "loongarch64-linux-gnu",
        loader: "ld-linux-loongarch-lp64d.so.1",
    },
];

/// The architecture an ELF header belongs to, by machine, class and byte order.
pub fn by_elf(machine: u16, class: Class, endian: Endian) -> Option<&'static Arch> {
    ARCHES.iter().find(|a| a.machine == machine && a.class == class && a.endian == endian)
}

/// Accepts our name, the Nix system, or the qemu name (`aarch64`, `aarch64-linux`, `arm`, `i386`...).
pub fn by_name(name: &str) -> Option<&'static Arch> {
    ARCHES.iter().find(|a| {
        a.name == name
            || a.nix_system == name
            || a.qemu == name
            || (name == "arm64" && a.name == "aarch64")
            || (name == "amd64" && a.name == "x86_64")
    })
}

/// The architecture of the running binary's CPU (compile-time target: nixqimg is built per host).
pub fn host() -> &'static Arch {
    let name = if cfg!(target_arch = "x86_64") {
        "x86_64"
    } else if cfg!(target_arch = "aarch64") {
        "aarch64"
    } else if cfg!(target_arch = "riscv64") {
        "riscv64"
    } else if cfg!(target_arch = "powerpc64") {
        "ppc64le"
    } else if cfg!(target_arch = "s390x") {
        "s390x"
    } else if cfg!(target_arch = "x86") {
        "i686"
    } else if cfg!(target_arch = "arm") {
        "armv7l"
    } else if cfg!(target_arch = "loongarch64") {
        "loongarch64"
    } else {
        "mips64el"
    };
    by_name(name).unwrap_or(&ARCHES[0])
}

impl Arch {
    /// Does `header` (the first 20 bytes of a file) match this entry's magic under its mask, as the
    /// kernel's binfmt_misc compares them?
    pub fn matches(&self, header: &[u8]) -> bool {
        header.len() >= 20
            && self.magic.iter().zip(self.mask.iter()).zip(header.iter()).all(|((m, k), h)| h & k == m & k)
    }

    /// binfmt_misc wants the magic and mask as `\xNN` escapes.
    pub fn escaped(bytes: &[u8]) -> String {
        use std::fmt::Write;
        bytes.iter().fold(String::with_capacity(bytes.len() * 4), |mut s, b| {
            let _ = write!(s, "\\x{b:02x}");
            s
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header as a compiler would write it for `arch`, with e_type `ty`.
    fn header(arch: &Arch, ty: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = if arch.class == Class::Elf64 { 2 } else { 1 };
        h[5] = if arch.endian == Endian::Little { 1 } else { 2 };
        h[6] = 1;
        let (t, m) = match arch.endian {
            Endian::Little => (ty.to_le_bytes(), arch.machine.to_le_bytes()),
            Endian::Big => (ty.to_be_bytes(), arch.machine.to_be_bytes()),
        };
        h[16..18].copy_from_slice(&t);
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn every_magic_matches_its_own_exec_and_dyn_headers_and_no_other_arch() {
        for a in ARCHES {
            for ty in [2u16, 3] {
                let h = header(a, ty);
                assert!(a.matches(&h), "{} does not match its own e_type {ty}", a.name);
                for b in ARCHES.iter().filter(|b| b.name != a.name) {
                    assert!(!b.matches(&h), "{} matches {}'s header", b.name, a.name);
                }
            }
            // Relocatable objects and core files are not programs.
            assert!(!a.matches(&header(a, 1)), "{} matches ET_REL", a.name);
            assert!(!a.matches(&header(a, 4)), "{} matches ET_CORE", a.name);
            // The magic itself is a header the table maps back to the same entry.
            let class = if a.magic[4] == 2 { Class::Elf64 } else { Class::Elf32 };
            let endian = if a.magic[5] == 1 { Endian::Little } else { Endian::Big };
            let machine = match endian {
                Endian::Little => u16::from_le_bytes([a.magic[18], a.magic[19]]),
                Endian::Big => u16::from_be_bytes([a.magic[18], a.magic[19]]),
            };
            assert_eq!(by_elf(machine, class, endian), Some(a));
        }
    }

    #[test]
    fn names_resolve() {
        assert_eq!(by_name("aarch64-linux").unwrap().qemu, "aarch64");
        assert_eq!(by_name("arm64").unwrap().name, "aarch64");
        assert_eq!(by_name("i386").unwrap().name, "i686");
        assert_eq!(by_name("armv7l-linux").unwrap().qemu, "arm");
        assert!(by_name("vax").is_none());
    }

    #[test]
    fn escaped_is_what_binfmt_misc_parses() {
        assert_eq!(Arch::escaped(b"\x7fE\x00"), "\\x7f\\x45\\x00");
    }
}
