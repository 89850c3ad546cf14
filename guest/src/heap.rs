//! The heap: every `Free` region of the memory map, managed by the talc allocator.
//!
//! Claiming a region writes only allocator metadata at its edges, so lazily-backed guest
//! memory stays untouched until it is allocated.

use spinning_top::RawSpinlock;
use talc::TalcLock;
use talc::source::Manual;
use wasmvisor_abi::boot::MemoryKind;

use crate::boot::Boot;

#[global_allocator]
static ALLOCATOR: TalcLock<RawSpinlock, Manual> = TalcLock::new(Manual);

/// Hands every free region to the allocator. Panics if there is none.
pub fn init(boot: &Boot) {
    let mut claimed = 0u64;
    for region in boot.regions().iter().filter(|r| r.kind() == Some(MemoryKind::Free)) {
        // SAFETY: the VMM reports this range as free RAM that nothing else uses; it is
        // identity-mapped and writable, and it is claimed once.
        if unsafe { ALLOCATOR.lock().claim(region.base as *mut u8, region.size as usize) }.is_some() {
            claimed += region.size;
        }
    }
    assert!(claimed > 0, "the memory map has no free region for the heap");
}
