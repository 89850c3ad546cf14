//! A guest that misbehaves on request, for the integration tests only.
//!
//! The first argument names the behaviour; the rest are its parameters:
//! `exit N`, `panic`, `fault ud|de|gp|pf|bp`, `stack-overflow`, `spin`, `wait MS`,
//! `bad-block`, `bad-buffer`, `bad-op`, `mmio`, `uart TEXT`, `print-many N`,
//! `print-then-fault N`, `env`, `vsock-hostile`, `vsock-noop N`, `vsock-bench N`, `vsock-echo PORT`,
//! `vsock-idle PORT`; as an HTTP VM of the daemon (whose tenant's name is the first argument),
//! `http-garbage` (answers every request with a malformed frame) and `http-silent` (never
//! answers). Any other first argument, with a component mapped, runs the component as the real
//! guest does: a daemon started with this guest serves honest tenants beside hostile ones.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::arch::asm;

use wasmvisor_guest::abi::hypercall::{Hypercall, HypercallBlock, HypercallError};
use wasmvisor_guest::abi::layout::{COM1_PORT, HYPERCALL_PORT, MMIO_BASE};
use wasmvisor_guest::boot::Boot;
use wasmvisor_guest::{hypercall, println};

#[path = "test-guest/hostile.rs"]
mod hostile;
#[path = "test-guest/vsock.rs"]
mod vsock;

wasmvisor_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
    let args: Vec<&str> = boot.args().collect();
    let number = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    match args.first().copied() {
        Some("exit") => number(1).and_then(|n| u8::try_from(n).ok()).unwrap_or(1),
        Some("panic") => panic!("the test guest panics on request"),
        Some("fault") => fault(args.get(1).copied().unwrap_or("ud")),
        Some("stack-overflow") => recurse(0) as u8,
        Some("spin") => loop {
            core::hint::spin_loop();
        },
        Some("wait") => {
            hypercall::wait(number(1).unwrap_or(10) * 1_000_000).expect("wait");
            println!("waited");
            0
        }
        Some("bad-block") => {
            // A request block beyond the end of RAM: the VMM must refuse to touch it.
            let gpa = boot.memory_size() + 0x1000;
            // SAFETY: the port write only exits to the VMM; no guest memory is accessed.
            unsafe { asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") gpa as u32) };
            println!("the VMM resumed a guest that sent an invalid block");
            1
        }
        Some("bad-buffer") => {
            // A console write whose buffer lies outside RAM gets BadAddress back.
            let outside = Hypercall::ConsoleWrite { gpa: boot.memory_size() - 8, len: 64 };
            let far = Hypercall::ConsoleWrite { gpa: u64::MAX - 4, len: 16 };
            expect_error(outside, HypercallError::BadAddress) | expect_error(far, HypercallError::BadAddress)
        }
        // Waiting for a launch is for a pre-booted guest, once, before its launch: refused
        // in any boot whose launch is behind it.
        Some("await-launch") => expect_error(Hypercall::AwaitLaunch, HypercallError::BadArgument),
        Some("bad-op") => {
            let mut block = HypercallBlock { op: 0xdead, ..Default::default() };
            let got = HypercallError::from_result(hypercall::raw(&mut block));
            println!("unknown op -> {got:?}");
            u8::from(got != Some(HypercallError::UnknownOp))
        }
        Some("mmio") => {
            // SAFETY: the MMIO window is mapped; no device answers there, so the VMM must stop us.
            unsafe { core::ptr::write_volatile(MMIO_BASE as *mut u32, 0x1234) };
            println!("the VMM resumed after an MMIO write to no device");
            1
        }
        Some("uart") => {
            for b in args.get(1).copied().unwrap_or("").bytes().chain(*b"\n") {
                // SAFETY: a port write to COM1's data register exits to the VMM's UART.
                unsafe { asm!("out dx, al", in("dx") COM1_PORT, in("al") b) };
            }
            0
        }
        Some("print-many") => {
            for i in 0..number(1).unwrap_or(10) {
                println!("line {i}");
            }
            0
        }
        Some("print-then-fault") => {
            for i in 0..number(1).unwrap_or(10) {
                println!("line {i}");
            }
            fault("ud")
        }
        Some("env") => {
            for (k, v) in boot.env() {
                println!("{k}={v}");
            }
            0
        }
        Some("vsock-hostile") => hostile::run(boot.memory_size()),
        Some("vsock-noop") => vsock::noop(boot, number(1).unwrap_or(1)),
        Some("vsock-bench") => vsock::bench(boot, number(1).unwrap_or(1000)),
        Some("vsock-echo") => vsock::echo(boot, number(1).unwrap_or(5000) as u32),
        Some("vsock-idle") => vsock::idle(boot, number(1).unwrap_or(5000) as u32),
        Some(kind @ ("http-garbage" | "http-silent")) => vsock::http_hostile(boot, kind),
        other => match boot.info().region(wasmvisor_guest::abi::boot::MemoryKind::Component) {
            Some(artifact) => wasmvisor_guest::wasm::run(boot, artifact),
            None => {
                println!("test-guest: unknown behaviour {other:?}");
                2
            }
        },
    }
}

fn expect_error(call: Hypercall, want: HypercallError) -> u8 {
    let got = hypercall::call(call);
    println!("{call:?} -> {got:?}");
    u8::from(got != Err(want))
}

fn fault(kind: &str) -> u8 {
    // SAFETY: each instruction below raises the named CPU exception on purpose; the VMM's
    // stubs report it and the VM stops, so nothing after it runs.
    unsafe {
        match kind {
            "ud" => asm!("ud2"),
            "bp" => asm!("int3"),
            "de" => {
                asm!("xor edx, edx", "xor eax, eax", "xor ecx, ecx", "div ecx", out("eax") _, out("edx") _, out("ecx") _)
            }
            // `cli` is privileged at CPL 3 unless IOPL=3, and IOPL is 3 here: use `hlt`.
            "gp" => asm!("hlt"),
            "pf" => {
                // Canonical but unmapped (PML4 slot 170 is empty).
                core::ptr::read_volatile(0x5555_0000_0000 as *const u8);
            }
            _ => println!("unknown fault kind {kind}"),
        }
    }
    1
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let pad = core::hint::black_box([depth; 64]);
    recurse(depth + 1) + pad[3]
}
