//! The boot hand-off: what the VMM tells the guest at entry.
//!
//! The VMM writes one [`BootInfo`] at [`crate::layout::BOOT_INFO_GPA`] and enters the guest's
//! ELF entry point with its address in RDI. Strings (args, env) live in the boot data area as
//! [`StringTable`]s: NUL-terminated UTF-8 strings packed back to back.

/// `BootInfo::magic`: "WASMVISR" in little-endian byte order.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"WASMVISR");
/// `BootInfo::version`: bumped on any incompatible change of this module.
pub const BOOT_VERSION: u32 = 3;
/// Capacity of the memory map.
pub const MAX_MEMORY_REGIONS: usize = 16;

/// What a [`MemoryRegion`] holds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// VMM-owned structures (GDT, IDT, page tables, exception stubs and stack): not for the guest.
    System = 1,
    /// The `BootInfo` page and the boot data area (read-only to the guest).
    BootInfo = 2,
    /// The guest stack.
    Stack = 3,
    /// The loaded guest image.
    Image = 4,
    /// Free RAM, for the guest's heap.
    Free = 5,
    /// Device MMIO window (not RAM).
    Mmio = 6,
    /// The precompiled component to run: read-only, executable, exactly the artifact's bytes.
    Component = 7,
}

impl TryFrom<u32> for MemoryKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            1 => Self::System,
            2 => Self::BootInfo,
            3 => Self::Stack,
            4 => Self::Image,
            5 => Self::Free,
            6 => Self::Mmio,
            7 => Self::Component,
            other => return Err(other),
        })
    }
}

/// One entry of the memory map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// A [`MemoryKind`] as `u32`.
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
}

impl MemoryRegion {
    /// The region's kind, or `None` for a value this version does not know.
    pub fn kind(&self) -> Option<MemoryKind> {
        MemoryKind::try_from(self.kind).ok()
    }

    /// One past the last address, saturating.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// A packed list of NUL-terminated strings in guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StringTable {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Total length in bytes, terminators included.
    pub len: u64,
    /// Number of strings.
    pub count: u64,
}

/// Everything the guest learns at boot. Written by the VMM, read by the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// `size_of::<BootInfo>()`, so that the guest can refuse a mismatched VMM.
    pub size: u32,
    /// Bytes of guest RAM, starting at guest-physical address 0.
    pub memory_size: u64,
    /// Number of valid entries in `regions`.
    pub region_count: u64,
    /// The memory map, sorted by address, non-overlapping.
    pub regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    /// TSC frequency in kHz (as KVM reports it for the vCPU).
    pub tsc_khz: u64,
    /// The guest's TSC value at `boot_wall_ns`.
    pub boot_tsc: u64,
    /// Wall-clock time at boot, nanoseconds since the Unix epoch.
    pub boot_wall_ns: u64,
    /// 32 bytes from the host's CSPRNG, to seed the guest's.
    pub random_seed: [u8; 32],
    /// The tenant's arguments.
    pub args: StringTable,
    /// The tenant's environment, as `KEY=VALUE` strings.
    pub env: StringTable,
    /// `BOOT_FLAG_*` bits.
    pub flags: u64,
    /// CPU features the guest must treat as absent although its CPUID has them (bits of a
    /// [`crate::cpu::FeatureSet`]), as a CPU template would: its detection, and so wasmtime's
    /// check of an artifact, leaves them out.
    pub cpu_features_masked: u64,
}

/// `BootInfo::flags`: the guest reports its own phase timings on the console (one line).
pub const BOOT_FLAG_REPORT_PHASES: u64 = 1;
/// The VM has the virtio-vsock device at `vsock::VSOCK_MMIO_GPA` (capabilities reachable).
pub const BOOT_FLAG_VSOCK: u64 = 2;
/// A feature-report boot: the guest sends its [`crate::cpu::CpuReport`] with the `CpuReport`
/// hypercall and exits 0, running nothing else.
pub const BOOT_FLAG_CPU_REPORT: u64 = 4;
/// The component is an HTTP handler (`wasi:http/incoming-handler`): the guest brings the vsock
/// device up at boot, gets the component ready, connects to `vsock::HTTP_PORT` and serves the
/// requests that arrive there, one after another, until the VM is stopped. Needs
/// [`BOOT_FLAG_VSOCK`].
pub const BOOT_FLAG_HTTP: u64 = 8;
/// `BootInfo::flags`: the tenant has preopened directories (`wasi:filesystem` asks the
/// capability broker for them; without the flag the guest lists none and asks nothing).
pub const BOOT_FLAG_PREOPENS: u64 = 16;
/// A pre-booted VM (the daemon's pool): the guest sets up what needs no launch (CPU features,
/// heap, logger), then waits with the `AwaitLaunch` hypercall; when that returns, `BootInfo`
/// has been rewritten for the launch (without this flag) and the guest reads all of it again.
/// Until then it holds no component, no strings and no seed, and the memory map holds RAM only.
pub const BOOT_FLAG_AWAIT_LAUNCH: u64 = 32;
/// The VMM snapshots the guest when its component is ready: the guest makes the `Ready`
/// hypercall once its `InstancePre` exists, before it reads anything of the tenant's (strings,
/// seed, config), and reads `BootInfo` again if the call says it was restored.
pub const BOOT_FLAG_SNAPSHOT: u64 = 64;

/// Size of [`BootInfo`] in bytes; checked at compile time so that the layout cannot drift.
pub const BOOT_INFO_SIZE: usize = 8 + 4 + 4 + 8 + 8 + MAX_MEMORY_REGIONS * 24 + 8 * 3 + 32 + 24 * 2 + 8 + 8;
const _: () = assert!(core::mem::size_of::<BootInfo>() == BOOT_INFO_SIZE);
const _: () = assert!(core::mem::size_of::<MemoryRegion>() == 24);
const _: () = assert!(BOOT_INFO_SIZE as u64 <= crate::layout::BOOT_DATA_GPA - crate::layout::BOOT_INFO_GPA);

impl BootInfo {
    /// An empty, valid-looking `BootInfo` (no regions, no strings).
    pub const fn new() -> Self {
        Self {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            size: BOOT_INFO_SIZE as u32,
            memory_size: 0,
            region_count: 0,
            regions: [MemoryRegion { base: 0, size: 0, kind: 0, reserved: 0 }; MAX_MEMORY_REGIONS],
            tsc_khz: 0,
            boot_tsc: 0,
            boot_wall_ns: 0,
            random_seed: [0; 32],
            args: StringTable { gpa: 0, len: 0, count: 0 },
            env: StringTable { gpa: 0, len: 0, count: 0 },
            flags: 0,
            cpu_features_masked: 0,
        }
    }

    /// Whether magic, version and size are the ones this crate defines.
    pub fn is_compatible(&self) -> bool {
        self.magic == BOOT_MAGIC && self.version == BOOT_VERSION && self.size as usize == BOOT_INFO_SIZE
    }

    /// The valid part of the memory map (the count is clamped to the capacity).
    pub fn regions(&self) -> &[MemoryRegion] {
        let n = usize::try_from(self.region_count).map_or(MAX_MEMORY_REGIONS, |n| n.min(MAX_MEMORY_REGIONS));
        &self.regions[..n]
    }

    /// The first region of `kind`, if any.
    pub fn region(&self, kind: MemoryKind) -> Option<&MemoryRegion> {
        self.regions().iter().find(|r| r.kind() == Some(kind))
    }

    /// Appends a region; `false` if the map is full.
    pub fn push_region(&mut self, base: u64, size: u64, kind: MemoryKind) -> bool {
        let n = self.regions().len();
        if n == MAX_MEMORY_REGIONS {
            return false;
        }
        self.regions[n] = MemoryRegion { base, size, kind: kind as u32, reserved: 0 };
        self.region_count = n as u64 + 1;
        true
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits the bytes of a [`StringTable`] into its strings (terminators removed). Bytes after
/// the last terminator, if any, form a final string: a malformed table cannot hide data.
pub fn split_strings(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    core::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let item = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or(&[]);
        Some(item)
    })
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, version), 8);
        assert_eq!(offset_of!(BootInfo, size), 12);
        assert_eq!(offset_of!(BootInfo, memory_size), 16);
        assert_eq!(offset_of!(BootInfo, region_count), 24);
        assert_eq!(offset_of!(BootInfo, regions), 32);
        assert_eq!(offset_of!(BootInfo, tsc_khz), 32 + 16 * 24);
        assert_eq!(offset_of!(BootInfo, boot_tsc), 424);
        assert_eq!(offset_of!(BootInfo, boot_wall_ns), 432);
        assert_eq!(offset_of!(BootInfo, random_seed), 440);
        assert_eq!(offset_of!(BootInfo, args), 472);
        assert_eq!(offset_of!(BootInfo, env), 496);
        assert_eq!(offset_of!(BootInfo, flags), 520);
        assert_eq!(offset_of!(BootInfo, cpu_features_masked), 528);
        assert_eq!(core::mem::size_of::<BootInfo>(), 536);
        assert_eq!(core::mem::align_of::<BootInfo>(), 8);
        assert_eq!(&BOOT_MAGIC.to_le_bytes(), b"WASMVISR");
    }

    #[test]
    fn new_is_compatible_and_empty() {
        let info = BootInfo::new();
        assert!(info.is_compatible());
        assert!(info.regions().is_empty());
        let mut bad = info;
        bad.version += 1;
        assert!(!bad.is_compatible());
    }

    #[test]
    fn regions_are_clamped_and_bounded() {
        let mut info = BootInfo::new();
        for i in 0..MAX_MEMORY_REGIONS as u64 {
            assert!(info.push_region(i * 0x1000, 0x1000, MemoryKind::Free));
        }
        assert!(!info.push_region(0, 1, MemoryKind::Free));
        info.region_count = u64::MAX; // as a hostile writer might leave it
        assert_eq!(info.regions().len(), MAX_MEMORY_REGIONS);
        assert_eq!(info.regions()[3].kind(), Some(MemoryKind::Free));
        assert_eq!(MemoryRegion { kind: 99, ..Default::default() }.kind(), None);
        assert_eq!(MemoryRegion { base: u64::MAX, size: 2, ..Default::default() }.end(), u64::MAX);
    }

    #[test]
    fn memory_kind_round_trips() {
        for k in [
            MemoryKind::System,
            MemoryKind::BootInfo,
            MemoryKind::Stack,
            MemoryKind::Image,
            MemoryKind::Free,
            MemoryKind::Mmio,
            MemoryKind::Component,
        ] {
            assert_eq!(MemoryKind::try_from(k as u32), Ok(k));
        }
        assert_eq!(MemoryKind::try_from(0), Err(0));
    }

    #[test]
    fn strings_split() {
        let v: [&[u8]; 3] = [b"a", b"", b"bc"];
        assert!(split_strings(b"a\0\0bc\0").eq(v));
        assert!(split_strings(b"").eq(core::iter::empty::<&[u8]>()));
        assert!(split_strings(b"\0").eq([b"" as &[u8]]));
        assert!(split_strings(b"x\0tail").eq([b"x" as &[u8], b"tail"]));
    }
}
