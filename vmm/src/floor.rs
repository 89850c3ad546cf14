//! The floor: the least a VM costs on this host, measured the way `HOST-KVM.md`'s probe does.
//!
//! Create a VM with 16 MiB, identity page tables and one vCPU (with the host's supported
//! CPUID) in long mode at CPL 3, run a two-byte guest (`out imm8, al`) to its first exit,
//! tear everything down. Benchmarks run it
//! beside real boots so that ratios, not noisy absolute times, are what we compare.

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use wasmvisor_abi::layout::{IMAGE_BASE, STACK_TOP};

use crate::arch;
use crate::vm::VmError;

/// RAM of the floor VM, as in the probe.
const FLOOR_MEMORY: u64 = 16 << 20;

/// Runs the floor VM once and returns how long it took, end to end. With `query_cpuid` it
/// asks KVM for the supported CPUID as the probe does (~300 us under PVM); without, it uses
/// the per-process cache that `vm::boot` uses too.
pub fn floor_boot(kvm_device: &Path, query_cpuid: bool) -> Result<Duration, VmError> {
    let setup = |what| move |source| VmError::Setup { what, source };
    let t = Instant::now();
    let kvm = crate::kvm::open(kvm_device)?;
    let vm = kvm.create_vm().map_err(setup("create the floor VM"))?;
    let mem = crate::memory::create(FLOOR_MEMORY)?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| VmError::Host { what: "find floor memory", source: std::io::Error::other(e.to_string()) })?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: FLOOR_MEMORY,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` is a live mapping of FLOOR_MEMORY bytes that outlives `vm` (dropped first).
    unsafe { vm.set_user_memory_region(region) }.map_err(setup("register floor memory"))?;
    arch::paging::write(&mem, FLOOR_MEMORY, 0)?;
    const OUT_IMM8_AL: [u8; 2] = [0xe6, 0xf0];
    mem.write_slice(&OUT_IMM8_AL, GuestAddress(IMAGE_BASE))
        .map_err(|source| arch::ArchError { what: "floor code", source })?;
    let mut vcpu = vm.create_vcpu(0).map_err(setup("create the floor vCPU"))?;
    let cpuid = if query_cpuid {
        kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(setup("get the supported CPUID"))?
    } else {
        arch::cpu::supported_cpuid(&kvm)?
    };
    arch::cpu::setup(&kvm, &vcpu, &cpuid, IMAGE_BASE, STACK_TOP - 8, 0)?;
    match vcpu.run() {
        Ok(VcpuExit::IoOut(..)) => {}
        Ok(other) => {
            return Err(VmError::Host {
                what: "run the floor guest",
                source: std::io::Error::other(format!("unexpected exit {other:?}")),
            });
        }
        Err(e) => return Err(setup("run the floor guest")(e)),
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(t.elapsed())
}
