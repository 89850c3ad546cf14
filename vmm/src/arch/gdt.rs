//! The GDT and the 64-bit TSS.
//!
//! PVM requires the host Linux user selectors (code 0x33, data 0x2b), so the table follows
//! Linux's layout: kernel code 0x10, kernel data 0x18, 32-bit user code 0x23, user data 0x2b,
//! 64-bit user code 0x33, TSS 0x40. The kernel segments serve only the exception gates.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::layout::{EXCEPTION_STACK_GPA, EXCEPTION_STACK_TOP, GDT_GPA, IO_BITMAP_PORTS, PAGE_SIZE, TSS_GPA};

use super::ArchError;

/// Number of 8-byte slots in the GDT (the TSS descriptor takes the last two).
pub const GDT_SLOTS: usize = 10;
/// Size of the 64-bit TSS proper; the I/O permission bitmap follows it.
const TSS_HEADER: usize = 104;
/// Size of the TSS with its I/O bitmap and the bitmap's terminating all-ones byte.
pub const TSS_SIZE: u64 = TSS_HEADER as u64 + IO_BITMAP_PORTS / 8 + 1;
/// Top of the stack used for double faults (IST1), the lower page of the exception stack.
pub const DOUBLE_FAULT_STACK_TOP: u64 = EXCEPTION_STACK_GPA + PAGE_SIZE;

/// Access byte: present.
const P: u64 = 1 << 47;
/// Access byte: code or data segment (not system).
const S: u64 = 1 << 44;
/// Type: executable.
const EXEC: u64 = 1 << 43;
/// Type: readable (code) / writable (data).
const RW: u64 = 1 << 41;
/// Type: accessed (pre-set so that the CPU never writes the GDT).
const ACCESSED: u64 = 1 << 40;
/// Flags: 64-bit code segment.
const LONG: u64 = 1 << 53;
/// Flags: 32-bit default operand size.
const DB: u64 = 1 << 54;
/// Flags: limit in 4 KiB units.
const GRAN: u64 = 1 << 55;
/// Limit 0xfffff in the two places a descriptor keeps it.
const FLAT_LIMIT: u64 = 0xffff | (0xf << 48);

const fn dpl(level: u64) -> u64 {
    level << 45
}

/// The code and data descriptors, indexed by selector >> 3.
pub const fn descriptors() -> [u64; 8] {
    let code = P | S | EXEC | RW | ACCESSED | GRAN | FLAT_LIMIT;
    let data = P | S | RW | ACCESSED | GRAN | DB | FLAT_LIMIT;
    [
        0,                    // 0x00 null
        0,                    // 0x08 unused
        code | LONG | dpl(0), // 0x10 kernel code
        data | dpl(0),        // 0x18 kernel data
        code | DB | dpl(3),   // 0x23 32-bit user code (unused, Linux's slot)
        data | dpl(3),        // 0x2b user data
        code | LONG | dpl(3), // 0x33 64-bit user code
        0,                    // 0x38 unused
    ]
}

/// The two 8-byte halves of a busy 64-bit TSS descriptor for a TSS at `base`.
pub const fn tss_descriptor(base: u64) -> [u64; 2] {
    const BUSY_TSS: u64 = 0xb << 40;
    let limit = TSS_SIZE - 1;
    let low = P | BUSY_TSS | (limit & 0xffff) | ((base & 0xff_ffff) << 16) | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The TSS: RSP0 is the exception stack, IST1 the double-fault stack, and an I/O bitmap of
/// zeros (ports open) for ports below `IO_BITMAP_PORTS`. PVM drops RFLAGS.IOPL to 0 after the
/// first exit, so the bitmap, not IOPL, is what lets CPL 3 reach the hypercall port there.
pub fn tss() -> [u8; TSS_SIZE as usize] {
    let mut tss = [0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&EXCEPTION_STACK_TOP.to_le_bytes()); // RSP0
    tss[36..44].copy_from_slice(&DOUBLE_FAULT_STACK_TOP.to_le_bytes()); // IST1
    tss[102..104].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes()); // I/O bitmap offset
    // Bitmap bytes stay zero (open); the byte after it must be all ones.
    tss[TSS_SIZE as usize - 1] = 0xff;
    tss
}

/// Writes the GDT and TSS.
pub fn write(mem: &GuestMemoryMmap) -> Result<(), ArchError> {
    let mut gdt = [0u64; GDT_SLOTS];
    gdt[..8].copy_from_slice(&descriptors());
    gdt[8..].copy_from_slice(&tss_descriptor(TSS_GPA));
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    let err = |what| move |source| ArchError { what, source };
    mem.write_slice(&bytes, GuestAddress(GDT_GPA)).map_err(err("GDT"))?;
    mem.write_slice(&tss(), GuestAddress(TSS_GPA)).map_err(err("TSS"))
}

#[cfg(test)]
mod tests {
    use wasmvisor_abi::layout::{KERNEL_CS, KERNEL_DS, TSS_SELECTOR, USER_CS, USER_DS};

    use super::*;

    #[test]
    fn descriptors_match_the_linux_values() {
        let d = descriptors();
        // The well-known flat descriptors, with the accessed bit pre-set.
        assert_eq!(d[usize::from(KERNEL_CS >> 3)], 0x00af_9b00_0000_ffff);
        assert_eq!(d[usize::from(KERNEL_DS >> 3)], 0x00cf_9300_0000_ffff);
        assert_eq!(d[usize::from(USER_DS >> 3)], 0x00cf_f300_0000_ffff);
        assert_eq!(d[usize::from(USER_CS >> 3)], 0x00af_fb00_0000_ffff);
        assert_eq!(d[0], 0);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc_def0);
        assert_eq!(low & 0xffff, TSS_SIZE - 1);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!(low >> 56, 0x9a);
        assert_eq!((low >> 40) & 0xff, 0x8b); // present, DPL 0, busy 64-bit TSS
        assert_eq!(high, 0x1234_5678);
        assert_eq!(usize::from(TSS_SELECTOR >> 3), GDT_SLOTS - 2);
    }

    #[test]
    fn tss_points_at_the_exception_stacks() {
        let t = tss();
        assert_eq!(u64::from_le_bytes(t[4..12].try_into().unwrap()), EXCEPTION_STACK_TOP);
        assert_eq!(u64::from_le_bytes(t[36..44].try_into().unwrap()), DOUBLE_FAULT_STACK_TOP);
        const { assert!(DOUBLE_FAULT_STACK_TOP < EXCEPTION_STACK_TOP) };
        let bitmap_at = usize::from(u16::from_le_bytes([t[102], t[103]]));
        assert_eq!(bitmap_at, TSS_HEADER);
        // The hypercall port and COM1 are open, the terminator closes the rest.
        for port in [wasmvisor_abi::layout::HYPERCALL_PORT, wasmvisor_abi::layout::COM1_PORT + 7] {
            assert_eq!(t[bitmap_at + usize::from(port / 8)] & (1 << (port % 8)), 0);
        }
        assert_eq!(t[t.len() - 1], 0xff);
    }
}
