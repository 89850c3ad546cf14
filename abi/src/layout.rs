//! Guest-physical memory layout and I/O ports.
//!
//! Guest-physical addresses are identity-mapped to guest-virtual ones. The first 2 MiB are
//! mapped with 4 KiB pages so that the null page and the stack guard are absent and the
//! VMM-owned system pages are supervisor-only; everything above is mapped with 2 MiB pages.
//!
//! ```text
//! 0x0000_0000  null page                       not present
//! 0x0000_1000  GDT, IDT, TSS (+ I/O bitmap)     supervisor
//! 0x0000_2000  exception stubs (CPL 0 code)    supervisor
//! 0x0000_3000  PML4, PDPT, 4 PDs, PT0          supervisor
//! 0x0000_a000  exception stack (2 pages)       supervisor
//! 0x0000_c000  PD for the component artifact   supervisor
//! 0x0001_0000  BootInfo                        user, read-only
//! 0x0001_1000  boot data (args, env)           user, read-only
//! 0x000f_f000  stack guard page                not present
//! 0x0010_0000  stack (1 MiB, grows down)       user
//! 0x0020_0000  guest image (ELF PT_LOAD)       user
//! image end    free memory (heap) .. RAM end   user
//! 0xc000_0000  MMIO window (1 GiB)             user, uncached, no-execute
//! 0x1_0000_0000 component artifact (<= 1 GiB)  user, read-only, executable (a read-only
//!                                              mapping of the host's cache file)
//! ```

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large page (a page-directory entry with PS set).
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// The global descriptor table: null, kernel code/data, user code/data, TSS (two slots).
pub const GDT_GPA: u64 = 0x1000;
/// The interrupt descriptor table: one gate per CPU exception vector.
pub const IDT_GPA: u64 = 0x1100;
/// Number of IDT gates: the 32 architectural exception vectors.
pub const IDT_ENTRIES: u64 = 32;
/// The 64-bit task-state segment: RSP0 points at the exception stack, and its I/O permission
/// bitmap grants the ports below [`IO_BITMAP_PORTS`]. The bitmap is what grants CPL 3 port
/// access under PVM, which does not keep RFLAGS.IOPL = 3 across exits.
pub const TSS_GPA: u64 = 0x1300;
/// Ports `0..IO_BITMAP_PORTS` are open to the guest; the rest raise #GP.
pub const IO_BITMAP_PORTS: u64 = 0x400;
/// CPL 0 stubs that report an exception through [`FAULT_PORT`].
pub const EXCEPTION_STUBS_GPA: u64 = 0x2000;
/// Size of one exception stub; stub `v` starts at `EXCEPTION_STUBS_GPA + v * this`.
pub const EXCEPTION_STUB_SIZE: u64 = 16;
/// Top-level page table.
pub const PML4_GPA: u64 = 0x3000;
/// Page-directory-pointer table for the first 512 GiB.
pub const PDPT_GPA: u64 = 0x4000;
/// Four page directories, one per GiB of the low 4 GiB.
pub const PD_GPA: u64 = 0x5000;
/// Number of page directories.
pub const PD_COUNT: u64 = 4;
/// Page table for the first 2 MiB (4 KiB granularity).
pub const PT0_GPA: u64 = 0x9000;
/// Page directory that maps the component artifact window.
pub const ARTIFACT_PD_GPA: u64 = 0xc000;
/// Where the precompiled component is mapped, read-only (outside RAM).
pub const ARTIFACT_GPA: u64 = 0x1_0000_0000;
/// Largest component artifact.
pub const ARTIFACT_MAX_SIZE: u64 = 0x4000_0000;
/// Lowest address of the exception stack.
pub const EXCEPTION_STACK_GPA: u64 = 0xa000;
/// One past the highest address of the exception stack (its initial RSP).
pub const EXCEPTION_STACK_TOP: u64 = 0xc000;
/// Where the VMM writes [`crate::boot::BootInfo`]; the guest's entry receives this in RDI.
pub const BOOT_INFO_GPA: u64 = 0x1_0000;
/// Start of the boot data area that [`crate::boot::StringTable`]s point into.
pub const BOOT_DATA_GPA: u64 = 0x1_1000;
/// End (exclusive) of the boot data area: args and env together must fit below it.
pub const BOOT_DATA_END: u64 = 0x2_0000;
/// Unmapped page below the stack, so that an overflow faults instead of corrupting memory.
pub const STACK_GUARD_GPA: u64 = 0xf_f000;
/// Lowest address of the guest stack.
pub const STACK_BOTTOM: u64 = 0x10_0000;
/// One past the highest address of the guest stack.
pub const STACK_TOP: u64 = 0x20_0000;
/// The guest image must be linked at or above this address.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Start of the MMIO window (virtio-mmio devices); RAM ends at or below it.
pub const MMIO_BASE: u64 = 0xc000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 0x4000_0000;
/// Largest guest RAM size: RAM may not reach into the MMIO window.
pub const MAX_MEMORY: u64 = MMIO_BASE;
/// Free memory the guest needs after its image, at the least.
pub const MIN_FREE_MEMORY: u64 = 1 << 20;

/// Port the guest writes the guest-physical address of a hypercall block to (`out dx, eax`).
pub const HYPERCALL_PORT: u16 = 0xf0;
/// Port the CPL 0 exception stubs write to (`out imm8, al`); the frame is at the stub's RSP.
pub const FAULT_PORT: u16 = 0xf1;
/// First port of the COM1 16550 UART (debug console); it spans 8 ports.
pub const COM1_PORT: u16 = 0x3f8;

/// Selector of the kernel code segment used by the exception gates.
pub const KERNEL_CS: u16 = 0x10;
/// Selector of the kernel data segment.
pub const KERNEL_DS: u16 = 0x18;
/// Selector of the user data segment (RPL 3); the Linux host value that PVM requires.
pub const USER_DS: u16 = 0x2b;
/// Selector of the 64-bit user code segment (RPL 3); the Linux host value that PVM requires.
pub const USER_CS: u16 = 0x33;
/// Selector of the task-state segment.
pub const TSS_SELECTOR: u16 = 0x40;

// The layout's invariants, checked at compile time.
const _: () = {
    const GDT_SIZE: u64 = 10 * 8;
    const TSS_SIZE: u64 = 104 + IO_BITMAP_PORTS / 8 + 1;
    assert!(GDT_GPA + GDT_SIZE <= IDT_GPA);
    assert!(IDT_GPA + IDT_ENTRIES * 16 <= TSS_GPA);
    assert!(TSS_GPA + TSS_SIZE <= EXCEPTION_STUBS_GPA);
    assert!(COM1_PORT as u64 + 8 <= IO_BITMAP_PORTS && (HYPERCALL_PORT as u64) < IO_BITMAP_PORTS);
    assert!(EXCEPTION_STUBS_GPA + IDT_ENTRIES * EXCEPTION_STUB_SIZE <= PML4_GPA);
    assert!(PD_GPA + PD_COUNT * PAGE_SIZE <= PT0_GPA);
    assert!(PT0_GPA + PAGE_SIZE <= EXCEPTION_STACK_GPA);
    assert!(EXCEPTION_STACK_TOP <= ARTIFACT_PD_GPA);
    assert!(ARTIFACT_PD_GPA + PAGE_SIZE <= BOOT_INFO_GPA);
    // The artifact window is the fifth GiB: PDPT slot 4.
    assert!(ARTIFACT_GPA == PD_COUNT << 30 && ARTIFACT_MAX_SIZE == 1 << 30);
    assert!(BOOT_DATA_END <= STACK_GUARD_GPA);
    assert!(STACK_GUARD_GPA + PAGE_SIZE == STACK_BOTTOM);
    assert!(STACK_TOP <= IMAGE_BASE);
    // The whole fine-grained area fits in PT0's 2 MiB.
    assert!(STACK_TOP <= LARGE_PAGE_SIZE);
    assert!(MMIO_BASE + MMIO_SIZE == PD_COUNT << 30);
    // PVM requires the host's user selectors; the GDT index is the selector >> 3.
    assert!(USER_CS == (6 << 3) | 3 && USER_DS == (5 << 3) | 3);
    // The TSS descriptor is 16 bytes and sits at the end of the 10-slot GDT.
    assert!(TSS_SELECTOR >> 3 == 8);
};
