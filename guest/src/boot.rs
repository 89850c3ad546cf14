//! A checked view of the boot hand-off: memory map, clocks, seed, args and env.

use wasmvisor_abi::boot::{BootInfo, MemoryRegion, StringTable, split_strings};
use wasmvisor_abi::layout::{BOOT_DATA_END, BOOT_DATA_GPA};

/// The `BootInfo` the VMM wrote, known to be of this ABI version.
pub struct Boot {
    info: &'static BootInfo,
}

impl Boot {
    /// Wraps `info` if its magic, version and size match this guest's ABI.
    pub fn new(info: &'static BootInfo) -> Option<Self> {
        info.is_compatible().then_some(Self { info })
    }

    /// The raw structure.
    pub fn info(&self) -> &'static BootInfo {
        self.info
    }

    /// Bytes of RAM.
    pub fn memory_size(&self) -> u64 {
        self.info.memory_size
    }

    /// The memory map.
    pub fn regions(&self) -> &'static [MemoryRegion] {
        self.info.regions()
    }

    /// TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.info.tsc_khz
    }

    /// The tenant's arguments; an argument that is not UTF-8 reads as `"\u{fffd}"`.
    pub fn args(&self) -> impl Iterator<Item = &'static str> {
        strings(&self.info.args)
    }

    /// The tenant's environment as `(key, value)` pairs.
    pub fn env(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        strings(&self.info.env).map(|kv| kv.split_once('=').unwrap_or((kv, "")))
    }
}

/// The strings of a table, which must lie inside the boot data area; a table that does not is
/// read as empty rather than trusted.
fn strings(table: &StringTable) -> impl Iterator<Item = &'static str> {
    let in_area =
        table.gpa >= BOOT_DATA_GPA && table.gpa.checked_add(table.len).is_some_and(|end| end <= BOOT_DATA_END);
    let bytes: &'static [u8] = if in_area && table.len > 0 {
        // SAFETY: the range lies inside the boot data area, which the VMM maps readable
        // (identity-mapped) and never changes while the guest runs.
        unsafe { core::slice::from_raw_parts(table.gpa as *const u8, table.len as usize) }
    } else {
        &[]
    };
    split_strings(bytes).map(|s| core::str::from_utf8(s).unwrap_or("\u{fffd}"))
}
