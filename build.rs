//! Links the interpreter's hot path first in .text, its read-only data in one 64 KiB window and its
//! arena last in .bss (src/interp/text-order.ld says why), for every Linux build of the binary: the
//! static release, the Nix package and the test build alike.
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
    }
}
