//! The wasmvisor guest: runs the component the VMM mapped for it; without one, greets with
//! what it read from the boot hand-off and exits 0.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use wasmvisor_guest::abi::boot::MemoryKind;
use wasmvisor_guest::boot::Boot;
use wasmvisor_guest::println;

wasmvisor_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
    if let Some(artifact) = boot.info().region(MemoryKind::Component) {
        return wasmvisor_guest::wasm::run(boot, artifact);
    }
    let args: Vec<&str> = boot.args().collect();
    println!(
        "wasmvisor guest: {} MiB RAM, TSC {} kHz, {} env vars, args {:?}",
        boot.memory_size() >> 20,
        boot.tsc_khz(),
        boot.env().count(),
        args
    );
    0
}
