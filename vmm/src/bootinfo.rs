//! Building the `BootInfo` hand-off and the string tables it points to.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::boot::{BootInfo, MemoryKind, StringTable};
use wasmvisor_abi::layout::{
    BOOT_DATA_END, BOOT_DATA_GPA, BOOT_INFO_GPA, IMAGE_BASE, MMIO_BASE, MMIO_SIZE, STACK_BOTTOM, STACK_TOP,
};

/// Why the boot hand-off could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    /// A string has a NUL byte, which the table format cannot carry.
    #[error("{what} {value:?} contains a NUL byte")]
    Nul {
        /// "argument" or "environment variable".
        what: &'static str,
        /// The offending string.
        value: String,
    },
    /// An environment entry is not `KEY=VALUE` with a non-empty key.
    #[error("environment variable {0:?} is not of the form KEY=VALUE")]
    BadEnv(String),
    /// Args and env do not fit the boot data area.
    #[error("arguments and environment take {len} bytes; at most {max} fit")]
    TooLarge {
        /// Bytes needed.
        len: usize,
        /// Bytes available.
        max: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write BootInfo into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Args and env laid out for the boot data area, validated once per launch.
#[derive(Clone, Debug, Default)]
pub struct BootStrings {
    data: Vec<u8>,
    args: StringTable,
    env: StringTable,
}

impl BootStrings {
    /// Packs `args` and `env` (`KEY=VALUE` strings).
    pub fn new(args: &[String], env: &[String]) -> Result<Self, BootInfoError> {
        let mut data = Vec::new();
        let mut table = |items: &[String], what: &'static str| -> Result<StringTable, BootInfoError> {
            let start = data.len() as u64;
            for item in items {
                if item.contains('\0') {
                    return Err(BootInfoError::Nul { what, value: item.clone() });
                }
                data.extend_from_slice(item.as_bytes());
                data.push(0);
            }
            let len = data.len() as u64 - start;
            Ok(StringTable { gpa: BOOT_DATA_GPA + start, len, count: items.len() as u64 })
        };
        let args = table(args, "argument")?;
        if let Some(bad) = env.iter().find(|kv| kv.split_once('=').is_none_or(|(k, _)| k.is_empty())) {
            return Err(BootInfoError::BadEnv(bad.clone()));
        }
        let env = table(env, "environment variable")?;
        let max = BOOT_DATA_END - BOOT_DATA_GPA;
        if data.len() as u64 > max {
            return Err(BootInfoError::TooLarge { len: data.len(), max });
        }
        Ok(Self { data, args, env })
    }
}

/// What the VMM learnt about the machine while setting it up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clocks {
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The guest TSC at `wall_ns`.
    pub boot_tsc: u64,
    /// Nanoseconds since the Unix epoch.
    pub wall_ns: u64,
}

/// The `BootInfo` for a VM of `memory_size` bytes whose image ends at `image_end`.
pub fn build(memory_size: u64, image_end: u64, clocks: Clocks, seed: [u8; 32], strings: &BootStrings) -> BootInfo {
    let mut info = BootInfo::new();
    info.memory_size = memory_size;
    let regions = [
        (0, BOOT_INFO_GPA, MemoryKind::System),
        (BOOT_INFO_GPA, BOOT_DATA_END - BOOT_INFO_GPA, MemoryKind::BootInfo),
        (STACK_BOTTOM, STACK_TOP - STACK_BOTTOM, MemoryKind::Stack),
        (IMAGE_BASE, image_end - IMAGE_BASE, MemoryKind::Image),
        (image_end, memory_size - image_end, MemoryKind::Free),
        (MMIO_BASE, MMIO_SIZE, MemoryKind::Mmio),
    ];
    for (base, size, kind) in regions {
        let pushed = info.push_region(base, size, kind);
        debug_assert!(pushed, "the memory map has room for the fixed regions");
    }
    info.tsc_khz = clocks.tsc_khz;
    info.boot_tsc = clocks.boot_tsc;
    info.boot_wall_ns = clocks.wall_ns;
    info.random_seed = seed;
    info.args = strings.args;
    info.env = strings.env;
    info
}

/// `BootInfo` as guest-memory bytes: it is `repr(C)`, all integers, and has no padding.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct BootInfoBytes(BootInfo);

// SAFETY: BootInfo is repr(C) and made only of integers and integer arrays laid out without
// padding (the abi crate asserts its size), so every byte is initialized and every bit pattern
// is a valid value.
unsafe impl vm_memory::ByteValued for BootInfoBytes {}

/// Writes `info` and the string data into guest memory.
pub fn write(mem: &GuestMemoryMmap, info: &BootInfo, strings: &BootStrings) -> Result<(), BootInfoError> {
    mem.write_obj(BootInfoBytes(*info), GuestAddress(BOOT_INFO_GPA))?;
    mem.write_slice(&strings.data, GuestAddress(BOOT_DATA_GPA))?;
    Ok(())
}

/// 32 bytes from the host's CSPRNG.
pub fn random_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `seed`.
        let n = unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use wasmvisor_abi::boot::split_strings;

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn strings_are_packed_and_read_back() {
        let b = BootStrings::new(&s(&["hello", "", "wörld"]), &s(&["A=1", "B="])).unwrap();
        assert_eq!(b.args.count, 3);
        assert_eq!(b.env.gpa, b.args.gpa + b.args.len);
        let at = |t: StringTable| &b.data[(t.gpa - BOOT_DATA_GPA) as usize..][..t.len as usize];
        let args: Vec<&[u8]> = split_strings(at(b.args)).collect();
        assert_eq!(args, [b"hello" as &[u8], b"", "wörld".as_bytes()]);
        let env: Vec<&[u8]> = split_strings(at(b.env)).collect();
        assert_eq!(env, [b"A=1" as &[u8], b"B="]);
    }

    #[test]
    fn bad_strings_are_refused() {
        assert!(BootStrings::new(&s(&["a\0b"]), &[]).unwrap_err().to_string().contains("NUL"));
        assert!(BootStrings::new(&[], &s(&["NOEQUALS"])).unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(BootStrings::new(&[], &s(&["=v"])).is_err());
        let big = vec!["x".repeat(1000); 100];
        assert!(BootStrings::new(&big, &[]).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn memory_map_covers_the_layout() {
        let info = build(64 << 20, IMAGE_BASE + 0x5000, Clocks::default(), [7; 32], &BootStrings::default());
        assert!(info.is_compatible());
        let regions = info.regions();
        assert!(regions.windows(2).all(|w| w[0].end() <= w[1].base), "sorted, disjoint");
        let free = regions.iter().find(|r| r.kind() == Some(MemoryKind::Free)).unwrap();
        assert_eq!((free.base, free.end()), (IMAGE_BASE + 0x5000, 64 << 20));
        assert_eq!(info.random_seed, [7; 32]);
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(random_seed().unwrap(), random_seed().unwrap());
    }
}
