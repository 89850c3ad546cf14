//! Guest RAM: one lazily-backed anonymous mapping from guest-physical 0, and the count of
//! its pages that are resident (touched by the VMM or the guest).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wasmvisor_abi::layout::{LARGE_PAGE_SIZE, MAX_MEMORY};

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not usable.
    #[error(
        "guest memory of {mib} MiB is not allowed: it must be a multiple of 2 MiB between 2 MiB and {max} MiB",
        max = MAX_MEMORY >> 20
    )]
    BadSize {
        /// The requested size in MiB.
        mib: u64,
    },
    /// The mapping failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// The requested size in MiB.
        mib: u64,
        /// The error from vm-memory.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Checks a RAM size given in MiB and returns it in bytes.
pub fn size_from_mib(mib: u64) -> Result<u64, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).filter(|&b| b > 0 && b <= MAX_MEMORY && b % LARGE_PAGE_SIZE == 0);
    bytes.ok_or(MemoryError::BadSize { mib })
}

/// Maps `size` bytes of private, anonymous, unreserved memory at guest-physical 0. Nothing is
/// backed until it is touched.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize { mib: size >> 20 })?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|source| MemoryError::Map { mib: size >> 20, source })
}

/// Number of 4 KiB pages of guest RAM that are resident in the host.
pub fn resident_pages(mem: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    mem.iter()
        .map(|region| {
            let len = region.len() as usize;
            let mut vec = vec![0u8; len.div_ceil(page)];
            let Ok(slice) = region.get_slice(vm_memory::MemoryRegionAddress(0), len) else {
                return 0;
            };
            // SAFETY: the pointer and length describe one live mapping owned by `region`, and
            // `vec` has one byte per page of it, as mincore requires.
            let rc = unsafe { libc::mincore(slice.ptr_guard_mut().as_ptr().cast(), len, vec.as_mut_ptr()) };
            if rc != 0 {
                return 0;
            }
            vec.iter().filter(|&&b| b & 1 != 0).count() as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_from_mib(64).unwrap(), 64 << 20);
        assert_eq!(size_from_mib(MAX_MEMORY >> 20).unwrap(), MAX_MEMORY);
        for bad in [0, 3, (MAX_MEMORY >> 20) + 2, u64::MAX] {
            let err = size_from_mib(bad).unwrap_err().to_string();
            assert!(err.contains("multiple of 2 MiB"), "{err}");
        }
    }

    #[test]
    fn memory_is_lazy_and_counted() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(resident_pages(&mem), 0);
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(resident_pages(&mem), 2);
    }
}
