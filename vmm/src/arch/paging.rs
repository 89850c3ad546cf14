//! Identity page tables with the U bit, 4-level.
//!
//! The first 2 MiB use 4 KiB pages (PT0) so that each VMM-owned page gets its own
//! permissions: the null page and the stack guard are absent, system structures are
//! supervisor-only, BootInfo is read-only to the guest. RAM above 2 MiB uses 2 MiB pages
//! (read, write, execute for the guest) and the MMIO window is mapped uncached and
//! no-execute. Accessed and dirty bits are pre-set so that the walker never writes.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::layout::{
    ARTIFACT_GPA, ARTIFACT_PD_GPA, BOOT_DATA_END, BOOT_INFO_GPA, EXCEPTION_STACK_TOP, EXCEPTION_STUBS_GPA, GDT_GPA,
    LARGE_PAGE_SIZE, MMIO_BASE, MMIO_SIZE, PAGE_SIZE, PD_COUNT, PD_GPA, PDPT_GPA, PML4_GPA, PT0_GPA, STACK_BOTTOM,
    STACK_TOP,
};

use super::ArchError;

/// Present.
pub const PRESENT: u64 = 1 << 0;
/// Writable.
pub const WRITABLE: u64 = 1 << 1;
/// Accessible from CPL 3.
pub const USER: u64 = 1 << 2;
/// Write-through.
pub const PWT: u64 = 1 << 3;
/// Cache disabled.
pub const PCD: u64 = 1 << 4;
/// Accessed.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty.
pub const DIRTY: u64 = 1 << 6;
/// Large page (in a page-directory entry).
pub const HUGE: u64 = 1 << 7;
/// No-execute.
pub const NO_EXECUTE: u64 = 1 << 63;

const TABLE: u64 = PRESENT | WRITABLE | USER | ACCESSED;
const ENTRIES: u64 = 512;

/// The PT0 entry (4 KiB page) for guest-physical `addr` below 2 MiB.
pub fn low_page_entry(addr: u64) -> u64 {
    let leaf = PRESENT | ACCESSED | DIRTY;
    let flags = if addr < GDT_GPA {
        0 // null page
    } else if addr == EXCEPTION_STUBS_GPA {
        leaf // supervisor code
    } else if addr < EXCEPTION_STACK_TOP {
        // GDT/TSS/IDT, page tables, exception stacks: supervisor data.
        leaf | WRITABLE | NO_EXECUTE
    } else if (BOOT_INFO_GPA..BOOT_DATA_END).contains(&addr) {
        leaf | USER | NO_EXECUTE
    } else if (STACK_BOTTOM..STACK_TOP).contains(&addr) {
        leaf | USER | WRITABLE | NO_EXECUTE
    } else {
        0 // unused, including the stack guard page
    };
    if flags == 0 { 0 } else { addr | flags }
}

/// The page-directory entry for the 2 MiB at guest-physical `addr` (>= 2 MiB), given the RAM
/// size (a multiple of 2 MiB).
pub fn large_page_entry(addr: u64, memory_size: u64) -> u64 {
    let leaf = PRESENT | WRITABLE | USER | ACCESSED | DIRTY | HUGE;
    if addr < memory_size {
        addr | leaf
    } else if (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&addr) {
        addr | leaf | PCD | PWT | NO_EXECUTE
    } else {
        0
    }
}

/// The page-directory entry for the 2 MiB at `addr` in the artifact window, given the
/// artifact's length: read-only and executable for the guest.
pub fn artifact_page_entry(addr: u64, artifact_len: u64) -> u64 {
    if addr < ARTIFACT_GPA + artifact_len { addr | PRESENT | USER | ACCESSED | DIRTY | HUGE } else { 0 }
}

/// Writes PML4, PDPT, the page directories and PT0. `memory_size` must be a multiple of
/// 2 MiB and at most `MAX_MEMORY`; `artifact_len` (0 for none) at most `ARTIFACT_MAX_SIZE`.
pub fn write(mem: &GuestMemoryMmap, memory_size: u64, artifact_len: u64) -> Result<(), ArchError> {
    let err = |what| move |source| ArchError { what, source };
    let entries = |f: &dyn Fn(u64) -> u64| -> Vec<u8> { (0..ENTRIES).flat_map(|i| f(i).to_le_bytes()).collect() };

    mem.write_obj(PDPT_GPA | TABLE, GuestAddress(PML4_GPA)).map_err(err("PML4"))?;
    for pd in 0..PD_COUNT {
        let base = pd << 30;
        let used = base < memory_size || base + (1 << 30) > MMIO_BASE;
        if !used {
            continue;
        }
        let pd_gpa = PD_GPA + pd * PAGE_SIZE;
        mem.write_obj(pd_gpa | TABLE, GuestAddress(PDPT_GPA + pd * 8)).map_err(err("PDPT"))?;
        let table = entries(&|i| {
            let addr = base + i * LARGE_PAGE_SIZE;
            if addr == 0 { PT0_GPA | TABLE } else { large_page_entry(addr, memory_size) }
        });
        mem.write_slice(&table, GuestAddress(pd_gpa)).map_err(err("page directory"))?;
    }
    if artifact_len > 0 {
        let slot = ARTIFACT_GPA >> 30;
        mem.write_obj(ARTIFACT_PD_GPA | TABLE, GuestAddress(PDPT_GPA + slot * 8)).map_err(err("PDPT"))?;
        let table = entries(&|i| artifact_page_entry(ARTIFACT_GPA + i * LARGE_PAGE_SIZE, artifact_len));
        mem.write_slice(&table, GuestAddress(ARTIFACT_PD_GPA)).map_err(err("artifact page directory"))?;
    }
    let pt0 = entries(&|i| low_page_entry(i * PAGE_SIZE));
    mem.write_slice(&pt0, GuestAddress(PT0_GPA)).map_err(err("PT0"))
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryBackend;
    use wasmvisor_abi::layout::{EXCEPTION_STACK_GPA, IMAGE_BASE, STACK_GUARD_GPA, TSS_GPA};

    use super::*;

    fn read(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
        mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Walks the tables like the MMU: the leaf entry and the page size for a virtual address.
    fn walk(mem: &GuestMemoryMmap, va: u64) -> Option<(u64, u64)> {
        let pml4e = read(mem, PML4_GPA + ((va >> 39) & 511) * 8);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read(mem, (pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 511) * 8);
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read(mem, (pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 511) * 8);
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & HUGE != 0 {
            return Some((pde, LARGE_PAGE_SIZE));
        }
        let pte = read(mem, (pde & 0x000f_ffff_ffff_f000) + ((va >> 12) & 511) * 8);
        (pte & PRESENT != 0).then_some((pte, PAGE_SIZE))
    }

    fn translate(mem: &GuestMemoryMmap, va: u64) -> Option<u64> {
        walk(mem, va).map(|(e, size)| (e & 0x000f_ffff_ffff_f000 & !(size - 1)) | (va & (size - 1)))
    }

    #[test]
    fn identity_map_with_the_right_permissions() {
        let size = 64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write(&mem, size, 0).unwrap();
        for va in [0x1000, 0x2000, 0x3456, 0x10_008, 0x10_0000, 0x1f_fff8, IMAGE_BASE, size - 8, MMIO_BASE + 0x40] {
            assert_eq!(translate(&mem, va), Some(va), "{va:#x}");
        }
        for va in [0, 8, STACK_GUARD_GPA, 0x20_000, size, MMIO_BASE - 1, 1 << 32] {
            assert_eq!(translate(&mem, va), None, "{va:#x} must not be mapped");
        }
        let user = |va| walk(&mem, va).unwrap().0 & USER != 0;
        let writable = |va| walk(&mem, va).unwrap().0 & WRITABLE != 0;
        assert!(!user(GDT_GPA) && !user(TSS_GPA) && !user(EXCEPTION_STUBS_GPA) && !user(PML4_GPA));
        assert!(!user(EXCEPTION_STACK_GPA));
        assert!(user(BOOT_INFO_GPA) && !writable(BOOT_INFO_GPA));
        assert!(user(STACK_TOP - 8) && writable(STACK_TOP - 8));
        assert!(user(IMAGE_BASE) && writable(IMAGE_BASE));
        assert_ne!(walk(&mem, MMIO_BASE).unwrap().0 & PCD, 0);
        assert_ne!(walk(&mem, MMIO_BASE).unwrap().0 & NO_EXECUTE, 0);
        assert_eq!(walk(&mem, EXCEPTION_STUBS_GPA).unwrap().0 & NO_EXECUTE, 0);
        assert_ne!(walk(&mem, GDT_GPA).unwrap().0 & NO_EXECUTE, 0);
    }

    #[test]
    fn large_memory_uses_more_directories() {
        let size: u64 = 1536 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write(&mem, size, 0).unwrap();
        assert_eq!(translate(&mem, (1 << 30) + 0x1234), Some((1 << 30) + 0x1234));
        assert_eq!(translate(&mem, size - 1), Some(size - 1));
        assert_eq!(translate(&mem, size), None);
        assert!(mem.address_in_range(GuestAddress(size - 1)));
    }

    #[test]
    fn the_artifact_window_is_read_only_and_executable() {
        let size: u64 = 16 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        write(&mem, size, 0).unwrap();
        assert_eq!(translate(&mem, ARTIFACT_GPA), None, "no artifact, no mapping");
        write(&mem, size, 3 << 20).unwrap();
        assert_eq!(translate(&mem, ARTIFACT_GPA + 0x1234), Some(ARTIFACT_GPA + 0x1234));
        assert_eq!(translate(&mem, ARTIFACT_GPA + (3 << 20) + 5), Some(ARTIFACT_GPA + (3 << 20) + 5));
        assert_eq!(translate(&mem, ARTIFACT_GPA + (4 << 20)), None);
        let (entry, _) = walk(&mem, ARTIFACT_GPA).unwrap();
        assert_eq!(entry & (USER | WRITABLE | NO_EXECUTE), USER);
    }
}
