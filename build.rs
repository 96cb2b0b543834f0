//! Links the interpreter's hot path first in .text, its read-only data in one 64 KiB window and the
//! writable data it touches on one page (src/interp/text-order.ld says why), for every Linux build of
//! the binary: the static release, the Nix package and the test build alike.
fn main() {
    println!("cargo:rerun-if-changed=src/interp/text-order.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/interp/text-order.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{script}");
        // One read-only-and-executable segment for the ELF headers, the code and the read-only data
        // (the layout before binutils 2.31 made -z separate-code the default on x86_64): musl's
        // start-up reads the program headers, which then share the code's first fault-around window
        // instead of costing a fault of their own, and the kernel maps one segment fewer per exec.
        // What separate-code guards against, gadgets in non-code bytes, buys little in a non-PIE
        // binary whose code addresses are fixed anyway.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,noseparate-code");
        // No RELRO: it makes the linker end the GOT and the tables before it on a page boundary, so
        // they could never share the page where the file's data ends and .bss begins, the one page the
        // kernel has written before nixqimg starts (text-order.ld). A static non-PIE binary has
        // nothing to protect there: its start-up resolves no relocation and mprotects nothing. Last
        // on the link line, it also wins over nixpkgs' relro hardening, which ld-wrapper puts first.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,norelro");
    }
}
