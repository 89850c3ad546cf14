//! Fuzzes the vsock device's queue and packet parsing: the input is the guest's RAM (rings,
//! descriptor tables, packet headers and payloads, laid out however the bytes say) behind a
//! device a well-behaved driver has set up; the device must process it without panicking,
//! and a reset must always bring it back to a state an honest driver can use.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor::devices::virtio::vsock::VsockDevice;
use wasmvisor_providers::{Broker, TenantSpec};

/// RAM of the fuzzed guest. The rings sit in its first bytes so that short inputs reach them;
/// descriptors may point anywhere (and beyond).
const RAM: usize = 64 * 1024;
/// (queue, descriptor table, avail ring, used ring): RX, TX, event.
const RINGS: [(u32, u64, u64, u64); 3] = [(1, 0x000, 0x080, 0x0c0), (0, 0x100, 0x180, 0x1c0), (2, 0x200, 0x280, 0x2c0)];

fn write(device: &mut VsockDevice, offset: u64, value: u32) {
    device.mmio_write(offset, &value.to_le_bytes());
}

/// Brings the device up the way virtio-drivers does, with the rings of [`RINGS`].
fn activate(device: &mut VsockDevice, size: u32) {
    write(device, 0x70, 0);
    write(device, 0x70, 1);
    write(device, 0x70, 3);
    write(device, 0x24, 1);
    write(device, 0x20, 1);
    write(device, 0x70, 11);
    for (queue, desc, avail, used) in RINGS {
        write(device, 0x30, queue);
        write(device, 0x38, size);
        write(device, 0x80, desc as u32);
        write(device, 0x90, avail as u32);
        write(device, 0xa0, used as u32);
        write(device, 0x44, 1);
    }
    write(device, 0x70, 15);
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, ram)) = data.split_first() else { return };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM");
    mem.write_slice(&ram[..ram.len().min(RAM)], GuestAddress(0)).expect("fits");
    let spec = TenantSpec {
        name: "fuzz".parse().expect("tenant"),
        grants: BTreeSet::new(),
        config: BTreeMap::new(),
        data_dir: std::env::temp_dir().join("wasmvisor-fuzz"),
        echo_log: false,
    };
    let broker = Broker::open(spec).expect("a broker without grants opens nothing");
    let mut device = VsockDevice::new(mem, Box::new(broker), None);
    // Queue sizes 1..8: the descriptor tables fit their 128 bytes.
    activate(&mut device, 1 << (shape % 4));
    for _ in 0..(1 + shape / 64) {
        device.process();
    }
    // Whatever happened, a reset and a fresh setup must work.
    activate(&mut device, 8);
    assert!(device.is_active(), "a reset and an honest setup bring the device back");
});
