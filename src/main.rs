//! nixqimg: a binfmt_misc interpreter that runs foreign programs under qemu-user with the right
//! loader, argv and environment, and a VM-less builder of bootable NixOS cloud images.
//!
//! No Rust runtime start-up (`no_main`): std's would ignore SIGPIPE and install signal stacks, and
//! an interpreter must hand the foreign program the signal dispositions its caller gave it (qemu
//! passes an ignored SIGPIPE on to the guest) and start as fast as a C wrapper.
#![cfg_attr(not(test), no_main)]
#![warn(clippy::too_many_lines)]

mod arch;
mod binfmt;
mod cli;
mod doctor;
mod error;
mod image;
mod interp;
mod logging;
mod nix;
mod util;
mod vm;

#[cfg(not(test))]
use std::ffi::{c_char, c_int, CStr, OsStr};
#[cfg(not(test))]
use std::os::unix::ffi::OsStrExt;

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    let n = argc.max(0) as usize;
    let mut args = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the C runtime passes argc valid NUL-terminated strings in argv, alive for the
        // process and written by nobody: borrowed, not copied (the interpreter hands them on).
        args.push(unsafe { OsStr::from_bytes(CStr::from_ptr(*argv.add(i)).to_bytes()) });
    }
    let argv: &[*const c_char] = if argv.is_null() {
        &[]
    } else {
        // SAFETY: argv holds argc pointers, as above, alive for the process; `args` was made from
        // them, index for index.
        unsafe { std::slice::from_raw_parts(argv, n) }
    };
    run(&args, argv) as c_int
}

/// Interpreter or command line. In the unit-test build the harness owns `main`; allowing dead code
/// here keeps this function (and so everything it reaches) a root for the lint.
#[cfg_attr(test, allow(dead_code))]
fn run(args: &[&std::ffi::OsStr], argv: &[*const std::ffi::c_char]) -> u8 {
    let code = if interp::started_by_binfmt(args.first().copied()) {
        interp::main(args, argv)
    } else {
        cli::main(args.iter().map(|a| a.to_os_string()).collect())
    };
    // Without std's runtime nothing flushes stdout at exit.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

/// The interpreter lives a few hundred microseconds and then execs qemu; musl's allocator maps and
/// unmaps pages for each size class it meets. A bump arena serves the first allocations (all of the
/// interpreter's), freeing nothing; past it, and for everything larger, the system allocator.
mod arena {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::UnsafeCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SIZE: usize = 256 * 1024;
    /// The cursor sits in the same page as the buffer's first bytes: apart, they were two page faults.
    #[repr(C, align(64))]
    struct Buf {
        next: AtomicUsize,
        bytes: UnsafeCell<[u8; SIZE]>,
    }
    // SAFETY: disjoint ranges of the buffer are handed out through the atomic cursor below.
    unsafe impl Sync for Buf {}
    static BUF: Buf = Buf { next: AtomicUsize::new(0), bytes: UnsafeCell::new([0; SIZE]) };

    pub struct Arena;

    fn base() -> usize {
        BUF.bytes.get() as usize
    }

    // SAFETY: every pointer returned is either a fresh, suitably aligned, unshared range of BUF
    // (claimed with compare_exchange, never reused) or comes from System, to which it is returned.
    unsafe impl GlobalAlloc for Arena {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if layout.size() <= SIZE / 4 {
                let mut cur = BUF.next.load(Ordering::Relaxed);
                loop {
                    let start = (base() + cur).next_multiple_of(layout.align()) - base();
                    let end = start + layout.size();
                    if end > SIZE {
                        break;
                    }
                    match BUF.next.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => return (base() + start) as *mut u8,
                        Err(now) => cur = now,
                    }
                }
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let p = ptr as usize;
            if p >= base() && p < base() + SIZE {
                return;
            }
            // SAFETY: not from the arena, so from System with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

#[global_allocator]
static ALLOC: arena::Arena = arena::Arena;
