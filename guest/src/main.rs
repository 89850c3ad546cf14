//! The wasmvisor guest: greets with what it read from the VMM's boot hand-off and exits 0.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use wasmvisor_guest::boot::Boot;
use wasmvisor_guest::println;

wasmvisor_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
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
