//! x86-64 machine state for a guest that runs entirely at CPL 3.
//!
//! The VMM is the guest's bootloader: it writes the GDT, TSS and IDT ([`gdt`], [`idt`]) and
//! the identity page tables ([`paging`]) into guest memory, and sets the vCPU's registers
//! ([`cpu`]) so that the first instruction the guest runs is its ELF entry point, at CPL 3.

pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod paging;

use vm_memory::GuestMemoryMmap;

/// Writing a system structure into guest memory failed (the memory is too small).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the {what} into guest memory: {source}")]
pub struct ArchError {
    /// Which structure.
    pub what: &'static str,
    /// The memory error.
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

/// Writes GDT, TSS, IDT, exception stubs and page tables for `memory_size` bytes of RAM and
/// an artifact window of `artifact_len` bytes (0 for none). With `exception_handlers` false
/// the IDT is left empty, so that any exception escalates to a triple fault (tests use this
/// to exercise the shutdown path).
pub fn write_system_structures(
    mem: &GuestMemoryMmap,
    memory_size: u64,
    artifact_len: u64,
    exception_handlers: bool,
) -> Result<(), ArchError> {
    gdt::write(mem)?;
    if exception_handlers {
        idt::write(mem)?;
    }
    paging::write(mem, memory_size, artifact_len)
}
