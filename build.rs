//! Links the interpreter's hot path first in .text and its arena last in .bss (src/interp/text-order.ld
//! says why), for every Linux build of the binary: the static release, the Nix package and the test
//! build alike.
fn main() {
    println!("cargo:rerun-if-changed=src/interp/text-order.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/interp/text-order.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{script}");
    }
}
